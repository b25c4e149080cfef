"""`fireflyer train --expert-parallel 2` on two local CPU ranks: each rank holds half of every MoE
layer's routed experts and exchanges tokens through the differentiable dispatcher, yet the logged
losses and the saved weights are those of one rank with every expert; the checkpoint holds each
expert once, resumes, and loads into a serving model."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fireflyer.storage import checkpoint
from fireflyer.workloads.model.loader import load_model, load_tensors
from fireflyer.workloads.model.model import Parallel
from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.export import serving_tensors
from fireflyer.workloads.train.layout import Layout
from tests.ports import free_port
from tests.workloads.pipeline_support import (
    assert_same_weights,
    logged_losses,
    pipeline_config,
    reference,
)
from tests.workloads.train_support import REPO, pattern_data, read_log, tiny_model, train_argv, train_env

EXPERT_WEIGHT = "layers.1.mlp.experts.w13"  # the tiny preset: 16 experts, MoE from layer 1


def run_expert_parallel(cfg: TrainConfig, ranks: int) -> subprocess.CompletedProcess[str]:
    argv = [*train_argv(cfg), "--seq-aux-alpha", str(cfg.seq_aux_alpha)]
    argv += ["--expert-parallel", str(cfg.expert_parallel)]
    env = train_env(NPROC_PER_NODE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ep")
    return tiny_model(root), pattern_data(root)


def test_two_expert_parallel_ranks_train_like_one_rank_with_every_expert(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, _ = inputs
    # Two ranks of two micro-batches see the samples of one rank with four.
    losses, weights = reference(pipeline_config(*inputs, micro_batches=4))
    cfg = pipeline_config(*inputs, micro_batches=2, expert_parallel=2, checkpoint_every=2)
    cfg = replace(cfg, log_jsonl=tmp_path / "log.jsonl", checkpoint_dir=tmp_path / "ck")
    result = run_expert_parallel(cfg, 2)
    assert result.returncode == 0, result.stderr
    assert losses[-1] < losses[0]
    logged = logged_losses(tmp_path / "log.jsonl")
    np.testing.assert_allclose(logged, losses, rtol=2e-5)

    # Each rank saved its half of the experts; loaded whole, the checkpoint is the one-rank model.
    assert checkpoint.list_steps(tmp_path / "ck") == [2, 3]
    manifest = (checkpoint.step_dir(tmp_path / "ck", 3) / checkpoint.MANIFEST).read_text()
    assert "shard-00001-of-00002" in manifest
    saved = checkpoint.load(tmp_path / "ck", 3)
    assert saved["model"][EXPERT_WEIGHT].shape[0] == 16
    assert saved["optim"][EXPERT_WEIGHT]["exp_avg"].shape[0] == 16
    assert_same_weights(saved["model"], weights)
    assert saved["trainer"]["expertParallel"] == 2

    # Resume: without step 3, the run continues from step 2 and repeats step 3 bit for bit.
    shutil.rmtree(checkpoint.step_dir(tmp_path / "ck", 3))
    result = run_expert_parallel(cfg, 2)
    assert result.returncode == 0, result.stderr
    assert "resumed from the checkpoint of step 2" in result.stderr
    assert read_log(tmp_path / "log.jsonl")[3]["loss"] == logged[2]
    again = checkpoint.load(tmp_path / "ck", 3)["model"]
    for name, tensor in saved["model"].items():
        assert torch.equal(again[name], tensor), name

    # Serving: rank 1 of a two-rank expert-parallel model takes experts 8…15 of the trained weights.
    served = load_model(model_dir, dtype=torch.float32, parallel=Parallel(expert_rank=1, expert_size=2))
    used = load_tensors(served, serving_tensors(saved["model"]))
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in used
    assert "model.layers.1.mlp.experts.0.up_proj.weight" not in used
    served_params = dict(served.named_parameters())
    assert torch.equal(served_params[EXPERT_WEIGHT], saved["model"][EXPERT_WEIGHT][8:])
    assert torch.equal(
        served_params["layers.0.self_attn.o_proj.weight"], saved["model"]["layers.0.self_attn.o_proj.weight"]
    )


def test_expert_groups_and_replicas() -> None:
    """World 8 = 4 data-parallel ranks × 2 pipeline stages, experts over 2 of the replicas."""
    layout = Layout(world=8, pipeline=2, schedule="1f1b", expert=2)
    assert layout.expert_group(0) == (0, 2) and layout.expert_group(5) == (5, 7)
    assert layout.expert_replicas(0) == (0, 4) and layout.expert_replicas(3) == (3, 7)
    assert [layout.expert_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert len(layout.expert_groups()) == 4 and len(layout.expert_replica_groups()) == 4
    with pytest.raises(TrainError, match="--expert-parallel 3 does not divide the 4 data-parallel ranks"):
        Layout(world=8, pipeline=2, expert=3)


def test_unsupported_combinations_are_refused(inputs: tuple[Path, Path]) -> None:
    with pytest.raises(TrainError, match="--expert-parallel with --pipeline 2 is not supported yet"):
        pipeline_config(*inputs, pipeline=2, schedule="1f1b", expert_parallel=2).validate()
    with pytest.raises(TrainError, match="does not divide the model's 16 routed experts"):
        pipeline_config(*inputs, expert_parallel=3).check_inputs()
