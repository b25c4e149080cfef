"""Checkpoints of a two-stage DualPipe run: each stage keeps --keep of them, a resume after a crash
that left one stage a checkpoint ahead goes back to the newest step every stage saved and then
repeats the uninterrupted run bit for bit, and another --pipeline is refused."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fireflyer.cli import main
from fireflyer.storage import checkpoint
from fireflyer.workloads.train.layout import stage_dir
from tests.workloads.pipeline_support import four_layer_model, logged_losses, pipeline_config, run_ranks
from tests.workloads.train_support import pattern_data, read_log


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ppresume")
    return four_layer_model(root), pattern_data(root)


def test_resume_after_a_stage_fell_behind_repeats_the_run(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck, log = tmp_path / "ck", tmp_path / "log.jsonl"
    cfg = pipeline_config(*inputs, steps=6, micro_batches=4, pipeline=2, schedule="dualpipe")
    cfg = replace(cfg, checkpoint_dir=ck, checkpoint_every=2, keep=2, log_jsonl=log)
    first = run_ranks(cfg, 2)
    assert first.returncode == 0, first.stderr
    uninterrupted = logged_losses(log)
    assert len(uninterrupted) == 6 and uninterrupted[-1] < uninterrupted[0]
    stages = [stage_dir(ck, s, 2) for s in range(2)]
    assert [checkpoint.list_steps(d) for d in stages] == [[4, 6], [4, 6]]  # --keep 2 per stage
    step6 = checkpoint.load(stages[0], 6)["model"]

    # A crash while stage 1 was still writing step 6: its step 6 has no manifest yet.
    (checkpoint.step_dir(stages[1], 6) / checkpoint.MANIFEST).unlink()
    shutil.copy(log, tmp_path / "first.jsonl")
    second = run_ranks(cfg, 2)
    assert second.returncode == 0, second.stderr
    assert "resumed from the checkpoint of step 4" in second.stderr
    assert "step 5 loss" in second.stderr and "step 4 loss" not in second.stderr
    assert logged_losses(log) == uninterrupted  # steps 5 and 6 again, bit for bit
    assert sorted(read_log(log)) == [1, 2, 3, 4, 5, 6]
    assert [checkpoint.list_steps(d) for d in stages] == [[4, 6], [4, 6]]
    again = checkpoint.load(stages[0], 6)["model"]
    assert all(torch.equal(again[name], step6[name]) for name in step6)

    # The stages' checkpoints do not fit one rank holding the whole model.
    argv = ["train", "--model", str(cfg.model), "--data", str(cfg.data), "--steps", "7"]
    assert main([*argv, "--device", "cpu", "--checkpoint-dir", str(ck)]) == 2
    assert "holds a run of --pipeline 2" in capsys.readouterr().err
