"""Four local CPU ranks: 1F1B and DualPipe over four stages (one layer each), and two-stage
pipelines composed with two data-parallel replicas, all train as one rank with the whole batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fireflyer.storage import checkpoint
from tests.workloads.pipeline_support import (
    assert_same_weights,
    check_timeline,
    four_layer_model,
    logged_losses,
    pipeline_config,
    reference,
    run_ranks,
    saved_weights,
    timelines,
)
from tests.workloads.train_support import pattern_data


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pp4")
    return four_layer_model(root), pattern_data(root)


@pytest.fixture(scope="module")
def one_stage(inputs: tuple[Path, Path]) -> tuple[list[float], dict]:
    """Eight micro-batches through the whole model: the step of every run below."""
    return reference(pipeline_config(*inputs, micro_batches=8))


@pytest.mark.parametrize(
    ("stages", "schedule", "micro_batches"),
    [(4, "1f1b", 8), (4, "dualpipe", 8), (2, "dualpipe", 4)],  # the last: 2 stages × 2 replicas
)
def test_four_ranks_train_like_one(
    stages: int,
    schedule: str,
    micro_batches: int,
    inputs: tuple[Path, Path],
    one_stage: tuple[list[float], dict],
    tmp_path: Path,
) -> None:
    cfg = pipeline_config(*inputs, micro_batches=micro_batches, pipeline=stages, schedule=schedule)
    cfg = replace(cfg, log_jsonl=tmp_path / "log.jsonl", checkpoint_dir=tmp_path / "ck")
    result = run_ranks(cfg, 4, timeline=tmp_path / "timeline.jsonl")
    assert result.returncode == 0, result.stderr
    losses, weights = one_stage
    np.testing.assert_allclose(logged_losses(tmp_path / "log.jsonl"), losses, rtol=2e-5)
    assert_same_weights(saved_weights(tmp_path / "ck", stages, 3), weights)
    replicas = 4 // stages
    manifest = checkpoint.load(tmp_path / "ck" / f"stage-000-of-{stages:03d}", 3)["trainer"]
    assert manifest["world"] == 4 and manifest["globalBatch"] == 8
    for line in timelines(tmp_path / "timeline.jsonl"):
        check_timeline(line, pipelines=replicas)
