"""Expert parallelism in the model: two processes (gloo), each hosting half of the routed experts
and holding its own tokens, dispatch through `fireflyer.kernels.ep.Dispatcher` and get back what
one process hosting every expert computes."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fireflyer.kernels import fp8
from fireflyer.kernels.ep import Dispatcher
from fireflyer.workloads.model import moe
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.process_exit import exit_process
from tests.ports import free_port
from tests.workloads.moe_config import CONFIG

TOKENS = {0: 40, 1: 0, 2: 300}  # per rank; a rank may have no tokens this step


def _moe(config: ModelConfig, hosted: range) -> moe.MoE:
    """The same weights on every process (seeded), keeping only the hosted experts."""
    layer = moe.MoE(config, dtype=torch.float32, device="cpu", experts=hosted, gemm_backend="torch")
    g = torch.Generator().manual_seed(7)
    layer.gate.weight.data.copy_(torch.randn(layer.gate.weight.shape, generator=g))
    layer.gate.e_score_correction_bias.data.copy_(torch.randn(8, generator=g) * 0.1)
    w13 = torch.randn(8, 2 * config.moe_intermediate_size, config.hidden_size, generator=g) / 12
    w2 = torch.randn(8, config.hidden_size, config.moe_intermediate_size, generator=g) / 12
    experts = layer.experts
    if config.fp8_weights:
        q13, s13 = fp8.quantize_per_block(w13[hosted.start : hosted.stop])
        q2, s2 = fp8.quantize_per_block(w2[hosted.start : hosted.stop])
        assert experts.w13_scale is not None and experts.w2_scale is not None
        experts.w13.data.copy_(q13)
        experts.w13_scale.data.copy_(s13)
        experts.w2.data.copy_(q2)
        experts.w2_scale.data.copy_(s2)
    else:
        experts.w13.data.copy_(w13[hosted.start : hosted.stop])
        experts.w2.data.copy_(w2[hosted.start : hosted.stop])
    assert layer.shared_experts is not None
    for proj in (
        layer.shared_experts.gate_proj,
        layer.shared_experts.up_proj,
        layer.shared_experts.down_proj,
    ):
        weight = torch.randn(proj.weight.shape, generator=g) / 12
        if proj.weight_scale_inv is not None:
            q, scale = fp8.quantize_per_block(weight)
            proj.weight.data.copy_(q)
            proj.weight_scale_inv.data.copy_(scale)
        else:
            proj.weight.data.copy_(weight)
    return layer


def _rank_body(rank: int, world: int, port: int, fp8_weights: bool, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = ModelConfig(**{**CONFIG.__dict__, "fp8_weights": fp8_weights})
        per = 8 // world
        parallel = _moe(config, range(rank * per, (rank + 1) * per))
        parallel.dispatcher = Dispatcher(
            dist.group.WORLD, config.hidden_size, max(TOKENS.values()), 8, mode=mode, transport="portable"
        )
        everything = _moe(config, range(8))
        x = torch.randn(TOKENS[rank], config.hidden_size, generator=torch.Generator().manual_seed(rank))
        got = parallel(x)
        want = everything(x)
        assert got.shape == want.shape
        if len(x):
            # Tokens travel as BF16 (FP8 for FP8 weights) and combine sums in BF16.
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 2e-2, (rank, error)
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, fp8_weights: bool, mode: str, errors: Any) -> None:
    try:
        _rank_body(rank, world, port, fp8_weights, mode)
    except BaseException as exc:  # report to the parent, which asserts
        errors.put(f"rank {rank}: {exc!r}")
        raise
    exit_process(0)  # no interpreter teardown after gloo collectives (see process_exit)


@pytest.mark.parametrize(("fp8_weights", "mode"), [(False, "normal"), (True, "low_latency")])
def test_expert_parallel_moe_equals_one_rank_with_every_expert(fp8_weights: bool, mode: str) -> None:
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    world = 2
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world, port, fp8_weights, mode, errors))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, messages
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
