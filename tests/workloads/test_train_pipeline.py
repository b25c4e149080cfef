"""`fireflyer train --pipeline 2` with 1F1B and DualPipe on two local CPU ranks: the logged losses
and the saved weights are the one-stage run's (up to FP32 reduction order), each stage saves its
own weights, and the executed timeline is the schedule's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fireflyer.storage import checkpoint
from fireflyer.workloads.train.layout import stage_dir
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
    root = tmp_path_factory.mktemp("pp2")
    return four_layer_model(root), pattern_data(root)


@pytest.fixture(scope="module")
def one_stage(inputs: tuple[Path, Path]) -> tuple[list[float], dict]:
    return reference(pipeline_config(*inputs, micro_batches=4))


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_two_stages_train_like_one(
    schedule: str, inputs: tuple[Path, Path], one_stage: tuple[list[float], dict], tmp_path: Path
) -> None:
    cfg = pipeline_config(*inputs, micro_batches=4, pipeline=2, schedule=schedule)
    cfg = replace(cfg, log_jsonl=tmp_path / "log.jsonl", checkpoint_dir=tmp_path / "ck")
    result = run_ranks(cfg, 2, timeline=tmp_path / "timeline.jsonl")
    assert result.returncode == 0, result.stderr
    losses, weights = one_stage
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(logged_losses(tmp_path / "log.jsonl"), losses, rtol=2e-5)
    # Each stage saved its own half of the model; together they are the one-stage weights.
    for stage in range(2):
        assert checkpoint.list_steps(stage_dir(tmp_path / "ck", stage, 2)) == [3]
    saved = saved_weights(tmp_path / "ck", 2, 3)
    stage0 = checkpoint.load(stage_dir(tmp_path / "ck", 0, 2), 3)["model"]
    assert "embed_tokens.weight" in stage0 and "lm_head" not in stage0
    assert {n.split(".")[1] for n in stage0 if n.startswith("layers.")} == {"0", "1"}
    assert_same_weights(saved, weights)
    # The timeline: every rank ran its list in order, waiting only where the schedule says.
    lines = timelines(tmp_path / "timeline.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert line["schedule"] == schedule and line["stages"] == 2
        check_timeline(line)


def test_a_pipeline_needs_a_schedule_and_a_world_it_divides(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = pipeline_config(*inputs, micro_batches=4, pipeline=2, schedule="1f1b")
    result = run_ranks(replace(cfg, pipeline=4), 2)
    assert result.returncode == 2
    assert "fireflyer: error: --pipeline 4 does not divide the 2 ranks" in result.stderr
