"""Expert-parallel dispatch/combine across processes with gloo (the portable transport on CPU)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fireflyer.kernels.ep import Dispatcher
from fireflyer.kernels.fp8 import dequantize_per_token_group, quantize_per_token_group
from fireflyer.workloads.process_exit import exit_process
from tests.ports import free_port

HIDDEN = 256
TOKENS = 24
TOP_K = 4


DEVICE = torch.device("cpu")  # set per process: cuda:<rank> under NCCL
TRANSPORT = "portable"  # set per process: GPU tests run the checks over each transport
DOUBLES = Path(__file__).resolve().parents[1] / "doubles"  # deep_ep where it cannot be installed


def _worker(
    rank: int,
    world: int,
    port: int,
    body: Callable[..., None],
    args: tuple[Any, ...],
    backend: str = "gloo",
    transport: str = "portable",
) -> None:
    global DEVICE, TRANSPORT
    TRANSPORT = transport
    if transport == "official" and backend == "gloo":
        sys.path.insert(0, str(DOUBLES))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()
    exit_process(0)  # no interpreter teardown after gloo collectives (see process_exit)


def _spawn(
    world: int, body: Callable[..., None], *args: Any, backend: str = "gloo", transport: str = "portable"
) -> None:
    mp.spawn(_worker, args=(world, free_port(), body, args, backend, transport), nprocs=world, join=True)


def _dispatcher(num_experts: int, phy2log: list[int] | None = None, **kwargs: Any) -> Dispatcher:
    kwargs.setdefault("transport", TRANSPORT)
    return Dispatcher(dist.group.WORLD, HIDDEN, TOKENS, num_experts, phy2log, device=DEVICE, **kwargs)


def _routing(
    rank: int, num_experts: int, tokens: int = TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each rank's tokens and top-k choice, reproducible on every process from the rank alone."""
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, HIDDEN, generator=generator).to(torch.bfloat16)
    scores = torch.rand(tokens, num_experts, generator=generator)
    topk_idx = scores.topk(TOP_K, dim=1).indices
    topk_idx[::5, -1] = -1  # some tokens use fewer experts
    weights = torch.rand(tokens, TOP_K, generator=generator)
    weights = torch.where(topk_idx >= 0, weights, torch.zeros_like(weights))
    return x.to(DEVICE), topk_idx.to(DEVICE), weights.to(DEVICE)


def _placement(world: int) -> tuple[int, list[int]]:
    """8 logical experts in 8 + 4 slots: experts 0–3 have two replicas each."""
    experts = 8
    slots = [*range(experts), 0, 1, 2, 3]
    per_rank = len(slots) // world
    assert per_rank * world == len(slots)
    return experts, slots


def _identity_round_trip(rank: int, world: int, mode: str) -> None:
    experts, phy2log = _placement(world)
    dispatcher = _dispatcher(experts, phy2log, mode=mode)
    assert dispatcher.transport == TRANSPORT
    x, topk_idx, weights = _routing(rank, experts)
    received, handle = dispatcher.dispatch(x, topk_idx, weights)
    out = dispatcher.combine(received.x, handle)
    expected = x.float() * weights.sum(1, keepdim=True)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    if mode == "low_latency":
        assert received.masked_x is not None
        masked_out = dispatcher.combine(received.masked_x, handle, masked=True)
        torch.testing.assert_close(masked_out, out)
        # Each expert's block starts with its tokens, in the grouped order.
        start = 0
        for expert, count in enumerate(received.tokens_per_expert.cpu().tolist()):
            block = received.x[start : start + count]
            start += count
            valid = block[:count]
            assert torch.equal(received.masked_x[expert, :count], valid)


def _expected_counts(world: int, rank: int, phy2log: list[int], experts: int) -> torch.Tensor:
    """Per local slot, the (token, expert) pairs it receives — computed on one process."""
    per_rank = len(phy2log) // world
    counts = torch.zeros(per_rank, dtype=torch.long)
    for source in range(world):
        _, topk_idx, _ = _routing(source, experts)
        for expert in topk_idx.flatten().tolist():
            if expert < 0:
                continue
            replicas = [s for s, e in enumerate(phy2log) if e == expert]
            slot = replicas[source % len(replicas)]
            if slot // per_rank == rank:
                counts[slot % per_rank] += 1
    return counts


def _counts(rank: int, world: int, mode: str) -> None:
    experts, phy2log = _placement(world)
    dispatcher = _dispatcher(experts, phy2log, mode=mode)
    x, topk_idx, weights = _routing(rank, experts)
    layout = dispatcher.layout(topk_idx)
    received, _ = dispatcher.dispatch(x, topk_idx, weights)
    expected = _expected_counts(world, rank, phy2log, experts)
    assert received.tokens_per_expert.cpu().tolist() == expected.tolist()
    # layout(): each token counted once per destination rank.
    assert layout.tokens_per_rank.tolist() == layout.token_in_rank.sum(0).tolist()
    assert int(layout.tokens_per_expert.sum()) == int((topk_idx >= 0).sum())


def _replica_split(rank: int, world: int) -> None:
    # 2 logical experts, expert 0 replicated on every rank, expert 1 only on rank 0.
    phy2log = [0, 1] + [0, 0] * (world - 1)
    dispatcher = _dispatcher(2, phy2log)
    x = torch.ones(TOKENS, HIDDEN, dtype=torch.bfloat16, device=DEVICE)
    topk_idx = torch.zeros(TOKENS, 1, dtype=torch.long, device=DEVICE)  # every token picks expert 0
    received, _ = dispatcher.dispatch(x, topk_idx, torch.ones(TOKENS, 1, device=DEVICE))
    replicas = [s for s, e in enumerate(phy2log) if e == 0]
    mine = [s for s in replicas if s // 2 == rank]
    expected_sources = [src for src in range(world) if replicas[src % len(replicas)] in mine]
    assert int(received.tokens_per_expert.sum()) == TOKENS * len(expected_sources)


def _fp8_round_trip(rank: int, world: int, mode: str) -> None:
    experts, phy2log = _placement(world)
    dispatcher = _dispatcher(experts, phy2log, mode=mode)
    x, topk_idx, weights = _routing(rank, experts)
    q, scales = quantize_per_token_group(x)
    received, handle = dispatcher.dispatch((q, scales), topk_idx, weights)
    assert received.x.dtype == torch.float8_e4m3fn and received.scales is not None
    expert_out = dequantize_per_token_group(received.x, received.scales).to(torch.bfloat16)
    out = dispatcher.combine(expert_out, handle)
    expected = x.float() * weights.sum(1, keepdim=True)
    # FP8 E4M3 keeps 3 mantissa bits: relative error per element up to 2^-4.
    error = (out.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.07, error


def _bad_input(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match="do not split evenly"):
        Dispatcher(dist.group.WORLD, HIDDEN, TOKENS, 5, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="every logical expert"):
        Dispatcher(dist.group.WORLD, HIDDEN, TOKENS, 2, [0] * (2 * world))
    dispatcher = Dispatcher(dist.group.WORLD, HIDDEN, 4, 4 * world, device=DEVICE, transport=TRANSPORT)  # type: ignore[arg-type]
    idx = torch.zeros(5, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="exceed max_tokens_per_rank"):
        dispatcher.dispatch(torch.zeros(5, HIDDEN, device=DEVICE), idx, torch.ones(5, 1, device=DEVICE))
    q = torch.zeros(2, HIDDEN, dtype=torch.float8_e4m3fn, device=DEVICE)
    with pytest.raises(ValueError, match="scales"):
        dispatcher.dispatch(q, idx[:2], torch.ones(2, 1, device=DEVICE))
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="'nvlink' is not available: the device is cpu"):
            Dispatcher(dist.group.WORLD, HIDDEN, 4, 4 * world, transport="nvlink")
    if TRANSPORT != "official":
        with pytest.raises(ValueError, match="needs DeepEP's deep_ep package"):
            Dispatcher(dist.group.WORLD, HIDDEN, 4, 4 * world, transport="official")


def _layers_share_a_transport(rank: int, world: int, mode: str) -> None:
    """Two MoE layers with different placements: one transport (its buffers) serves both, and a
    layer's combine still works after the next layer has dispatched."""
    experts, phy2log = _placement(world)
    shifted = phy2log[1:] + phy2log[:1]  # the same experts, other slots
    first = _dispatcher(experts, phy2log, mode=mode)
    second = _dispatcher(experts, shifted, mode=mode)
    assert (first._nvlink, first._official) == (second._nvlink, second._official)
    x, topk_idx, weights = _routing(rank, experts)
    received_1, handle_1 = first.dispatch(x, topk_idx, weights)
    received_2, handle_2 = second.dispatch(x * 2, topk_idx, weights)
    out_1 = first.combine(received_1.x, handle_1)
    out_2 = second.combine(received_2.x, handle_2)
    expected = x.float() * weights.sum(1, keepdim=True)
    torch.testing.assert_close(out_1.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out_2.float(), 2 * expected, rtol=2e-2, atol=4e-2)


def _all_checks(rank: int, world: int) -> None:
    # Process start-up (torch import) dominates on CPU, so one group runs every check.
    for mode in ("normal", "low_latency"):
        _identity_round_trip(rank, world, mode)  # dispatch → identity expert → combine = x · Σw
        _counts(rank, world, mode)  # per-expert counts = a reference computed on one process
        _fp8_round_trip(rank, world, mode)  # FP8 payload within quantisation error
        _layers_share_a_transport(rank, world, mode)  # per-layer dispatchers, one set of buffers
    _replica_split(rank, world)  # replicas share tokens by source rank
    _bad_input(rank, world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_dispatch_and_combine_across_processes(world: int) -> None:
    _spawn(world, _all_checks)


@pytest.mark.parametrize("world", [2, 3])
def test_the_deep_ep_backend_passes_the_same_checks(world: int) -> None:
    # DeepEP cannot be installed here: tests/doubles/deep_ep.py keeps its API and contract.
    _spawn(world, _all_checks, transport="official")
