"""ZeRO-1 (`--zero 1`): AdamW state sharded over the data-parallel ranks. Its updates are plain
AdamW's on the averaged gradients, each rank keeps half the state on two ranks, and `fireflyer
train --zero 1` on two local CPU ranks logs the losses of unsharded data parallelism, saves the
state sharded, and resumes bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fireflyer.storage import checkpoint
from fireflyer.workloads.train import optim
from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.parallel import Rank
from fireflyer.workloads.train.trainer import Trainer
from fireflyer.workloads.train.zero import ShardedAdamW, shard_bounds
from tests.ports import free_port
from tests.workloads.pipeline_support import (
    CPU,
    assert_same_weights,
    logged_losses,
    pipeline_config,
    reference,
)
from tests.workloads.train_support import REPO, pattern_data, read_log, tiny_model, train_argv, train_env

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]  # 65 values: the slices differ in length
HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _named(seed: int) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", nn.Parameter(torch.randn(*shape, generator=g))) for i, shape in enumerate(SHAPES)]


def _grads(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(*shape, generator=g) for shape in SHAPES]


def _compare_with_adamw(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sharded_named, plain_named = _named(0), _named(0)
        zero = ShardedAdamW(sharded_named, Rank(rank, world, rank, torch.device("cpu")), **HYPER)
        plain = optim.build_optimizer(plain_named, **HYPER)  # type: ignore[arg-type]
        plain_params = [p for _, p in plain_named]
        for step in range(3):
            for p, g in zip((p for _, p in sharded_named), _grads(rank, step), strict=True):
                p.grad = g
            zero.reduce_gradients()
            norm = zero.clip(1.0)
            zero.step()
            # The reference: every rank's gradients averaged, clipped, one AdamW over all weights.
            every = [_grads(r, step) for r in range(world)]
            for i, p in enumerate(plain_params):
                p.grad = sum(g[i] for g in every) / world
            assert norm == pytest.approx(optim.clip_gradients(plain_params, 1.0), rel=1e-6)
            plain.step()
            for (name, got), (_, want) in zip(sharded_named, plain_named, strict=True):
                torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=1e-6, msg=name)
        # Each rank keeps its slice of the state: half of plain AdamW's on two ranks.
        total = sum(p.numel() for _, p in plain_named)
        full_bytes = sum(
            t.numel() * t.element_size() for s in plain.state.values() for t in s.values() if t.dim()
        )
        start, stop = shard_bounds(total, rank, world)
        assert zero.state_bytes() == 2 * 4 * (stop - start)
        assert abs(zero.state_bytes() - full_bytes / world) <= 8
        # Restoring from plain AdamW's per-weight state gives the same slices.
        restored = ShardedAdamW(_named(0), Rank(rank, world, rank, torch.device("cpu")), **HYPER)
        restored.load(optim.optimizer_state(plain, plain_named))
        assert torch.allclose(restored.exp_avg, zero.exp_avg, atol=1e-7)
        assert restored.step_count == 3
    finally:
        dist.destroy_process_group()


def test_sharded_adamw_is_adamw_on_the_averaged_gradients() -> None:
    port = free_port()
    # Forked: the children need no second import of torch.
    mp.start_processes(_compare_with_adamw, args=(2, port), nprocs=2, join=True, start_method="fork")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zero")
    return tiny_model(root), pattern_data(root)


def run_zero(cfg: TrainConfig, ranks: int) -> subprocess.CompletedProcess[str]:
    argv = [*train_argv(cfg), "--seq-aux-alpha", str(cfg.seq_aux_alpha), "--zero", str(cfg.zero)]
    env = train_env(NPROC_PER_NODE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


def test_zero_trains_like_unsharded_data_parallelism_and_resumes_exactly(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    # Two ranks of two micro-batches see the samples of one rank with four.
    losses, weights = reference(pipeline_config(*inputs, micro_batches=4))
    cfg = pipeline_config(*inputs, micro_batches=2, zero=1, checkpoint_every=2)
    cfg = replace(cfg, log_jsonl=tmp_path / "log.jsonl", checkpoint_dir=tmp_path / "ck")
    result = run_zero(cfg, 2)
    assert result.returncode == 0, result.stderr
    logged = logged_losses(tmp_path / "log.jsonl")
    np.testing.assert_allclose(logged, losses, rtol=2e-5)
    saved = checkpoint.load(tmp_path / "ck", 3)
    assert_same_weights(saved["model"], weights)
    # The AdamW state is one flat vector over both ranks: each wrote its half.
    total = sum(w.numel() for name, w in weights.items() if not name.endswith("e_score_correction_bias"))
    assert int(saved["optim"]["zero"]["numel"]) == total
    assert saved["optim"]["zero"]["exp_avg"].shape == (total,)
    half = checkpoint.load(tmp_path / "ck", 3, rank=1, world=2)["optim"]["zero"]["exp_avg"]
    assert half.shape[0] == total - shard_bounds(total, 0, 2)[1]

    # Resume from step 2: step 3 and its state repeat bit for bit.
    shutil.rmtree(checkpoint.step_dir(tmp_path / "ck", 3))
    result = run_zero(cfg, 2)
    assert result.returncode == 0, result.stderr
    assert "resumed from the checkpoint of step 2" in result.stderr
    assert read_log(tmp_path / "log.jsonl")[3]["loss"] == logged[2]
    again = checkpoint.load(tmp_path / "ck", 3)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(again["optim"]["zero"][key], saved["optim"]["zero"][key])
    for name, tensor in saved["model"].items():
        assert torch.equal(again["model"][name], tensor), name

    # The checkpoint's state is sharded: a run without --zero cannot take it.
    with pytest.raises(TrainError, match="written with --zero 1; resume it with --zero 1"):
        Trainer(replace(cfg, zero=0, steps=4, log_jsonl=None), CPU)


def test_zero_with_a_pipeline_is_refused(inputs: tuple[Path, Path]) -> None:
    with pytest.raises(TrainError, match="--zero with --pipeline 2 is not supported yet"):
        pipeline_config(*inputs, pipeline=2, schedule="1f1b", zero=1).validate()
    with pytest.raises(TrainError, match="--zero must be 0"):
        pipeline_config(*inputs, zero=2).validate()
