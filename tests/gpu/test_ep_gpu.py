"""EP dispatch/combine on GPUs: the CPU checks again over NCCL (portable) and over the NVLink
transport, the two transports against each other, and CUDA-graph capture of the low-latency
mode. Needs at least two GPUs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fireflyer.kernels.ep import Dispatcher
from fireflyer.kernels.fp8 import dequantize_per_token_group, quantize_per_token_group
from tests.unit import test_ep as checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices"),
]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _worlds() -> list[int]:
    count = torch.cuda.device_count()
    return sorted({2, min(4, count), min(8, count)}) if count >= 2 else [2]


@pytest.mark.parametrize("transport", ["portable", "nvlink"])
@pytest.mark.parametrize("world", _worlds())
def test_dispatch_and_combine(world: int, transport: str) -> None:
    checks._spawn(world, checks._all_checks, backend="nccl", transport=transport)


def _transports_agree(rank: int, world: int) -> None:
    """Same tokens through both transports: the same entries in the same order, bit for bit,
    and the same combined output."""
    experts, phy2log = checks._placement(world)
    x, topk_idx, weights = checks._routing(rank, experts)
    q, scales = quantize_per_token_group(x)
    for mode in ("normal", "low_latency"):
        results = {}
        for transport in ("portable", "nvlink"):
            dispatcher = checks._dispatcher(experts, phy2log, mode=mode, transport=transport)
            assert dispatcher.transport == transport
            # A small batch first, then the full one twice: the output sized from the small
            # batch falls short and is redone; the third round reuses everything.
            for tokens in (3, checks.TOKENS, checks.TOKENS):
                batch = (q[:tokens], scales[:tokens])
                received, handle = dispatcher.dispatch(batch, topk_idx[:tokens], weights[:tokens])
                assert received.scales is not None
                out = dispatcher.combine(dequantize_per_token_group(received.x, received.scales), handle)
            entries = int(received.tokens_per_expert.sum())
            results[transport] = (received, entries, out)
        (portable, n, out_p), (nvlink, n2, out_n) = results["portable"], results["nvlink"]
        assert n == n2
        assert torch.equal(portable.tokens_per_expert, nvlink.tokens_per_expert)
        assert torch.equal(portable.x[:n].view(torch.uint8), nvlink.x[:n].view(torch.uint8))
        assert portable.scales is not None and nvlink.scales is not None
        assert torch.equal(portable.scales[:n], nvlink.scales[:n])
        torch.testing.assert_close(out_p, out_n, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("world", _worlds())
def test_the_nvlink_transport_matches_the_portable_one(world: int) -> None:
    checks._spawn(world, _transports_agree, backend="nccl")


def _graph_capture(rank: int, world: int) -> None:
    experts, phy2log = checks._placement(world)
    dispatcher = checks._dispatcher(experts, phy2log, mode="low_latency")
    x, topk_idx, weights = checks._routing(rank, experts)
    static_x, static_idx, static_w = x.clone(), topk_idx.clone(), weights.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph, as CUDA graphs require
            received, handle = dispatcher.dispatch(static_x, static_idx, static_w)
            dispatcher.combine(received.x, handle)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        received, handle = dispatcher.dispatch(static_x, static_idx, static_w)
        static_out = dispatcher.combine(received.x, handle)
    # New routing and tokens, replayed through the captured graph, twice.
    for seed in (17, 29):
        x2, idx2, w2 = checks._routing(rank + seed, experts)
        static_x.copy_(x2)
        static_idx.copy_(idx2)
        static_w.copy_(w2)
        graph.replay()
        torch.cuda.synchronize()
        expected = x2.float() * w2.sum(1, keepdim=True)
        torch.testing.assert_close(static_out.float(), expected, rtol=2e-2, atol=2e-2)
    dist.barrier()


@pytest.mark.parametrize("transport", ["portable", "nvlink"])
def test_low_latency_mode_is_cuda_graph_capturable(transport: str) -> None:
    checks._spawn(2, _graph_capture, backend="nccl", transport=transport)


def test_nvlink_is_what_auto_picks_on_one_host() -> None:
    checks._spawn(2, _auto_picks_nvlink, backend="nccl")


def _auto_picks_nvlink(rank: int, world: int) -> None:
    dispatcher = Dispatcher(dist.group.WORLD, checks.HIDDEN, 8, 4 * world, device=checks.DEVICE)
    assert dispatcher.transport == "nvlink"
