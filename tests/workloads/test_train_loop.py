"""The training loop in this process (one rank, CPU, FP32): it learns, its checkpoints resume bit
for bit, retention keeps --keep checkpoints, and the status endpoint answers."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fireflyer.storage import checkpoint
from fireflyer.workloads.threads import single_intra_op_thread
from fireflyer.workloads.train import parallel
from fireflyer.workloads.train.config import TrainConfig
from fireflyer.workloads.train.metrics import StepRecord
from fireflyer.workloads.train.status import Status, StatusServer
from fireflyer.workloads.train.trainer import Trainer
from tests.workloads.train_support import config, pattern_data, read_log, tiny_model

CPU = parallel.Rank(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with single_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loop")
    return tiny_model(root), pattern_data(root)


def train(cfg: TrainConfig, stop_after: int | None = None, status: Status | None = None) -> list[StepRecord]:
    return Trainer(cfg, CPU, status).run(stop_after=stop_after)


def test_loss_decreases_on_a_repeated_pattern(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = config(*inputs, steps=30, log_jsonl=tmp_path / "log.jsonl")
    records = train(cfg)
    losses = [r.loss for r in records]
    assert losses[0] > 6.0  # about ln(vocab) at the start
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    logged = read_log(tmp_path / "log.jsonl")
    assert sorted(logged) == list(range(1, 31))
    assert set(logged[30]) >= {"step", "loss", "lr", "grad_norm", "tokens", "seconds"}
    assert logged[30]["loss"] == losses[-1]
    assert logged[30]["tokens"] == 30 * 4 * 32


def test_stop_and_resume_repeats_the_uninterrupted_run(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = config(*inputs, steps=8, checkpoint_every=3, keep=2, seq_aux_alpha=1e-2)
    uninterrupted = [r.loss for r in train(replace(cfg, checkpoint_dir=tmp_path / "a"))]
    interrupted = replace(cfg, checkpoint_dir=tmp_path / "b", log_jsonl=tmp_path / "b.jsonl")
    first = train(interrupted, stop_after=7)  # as if killed after step 7: the last checkpoint is 6
    assert [r.loss for r in first] == uninterrupted[:7]
    assert checkpoint.latest_step(tmp_path / "b") == 6
    second = train(interrupted)
    assert [r.step for r in second] == [7, 8]
    assert [r.loss for r in second] == uninterrupted[6:]  # bit for bit
    logged = read_log(tmp_path / "b.jsonl")
    assert [logged[s]["loss"] for s in range(1, 9)] == uninterrupted  # one line per step
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 8
    # --keep 2: steps 6 and 8 (the final checkpoint) remain; the router biases are saved too.
    assert checkpoint.list_steps(tmp_path / "b") == [6, 8]
    saved = checkpoint.load(tmp_path / "b", 8)
    assert any(name.endswith("e_score_correction_bias") for name in saved["model"])
    assert saved["trainer"]["samples"] == 8 * 4
    assert train(interrupted) == []  # done: nothing left to train


def test_status_endpoint_answers(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    status = Status()
    server = StatusServer(status, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert json.load(response)["phase"] == "starting"
        cfg = config(*inputs, steps=3, checkpoint_every=2, checkpoint_dir=tmp_path / "ck")
        records = train(cfg, status=status)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["phase"] == "done"
        assert body["step"] == 3 and body["loss"] == records[-1].loss
        assert body["lastCheckpointStep"] == 3
        assert body["tokensPerSecond"] > 0
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
    finally:
        server.close()
    # "message" is served only once a run stopped on request; nothing else joins the fields.
    assert "message" not in body
    status.update(phase="stopped", message="checkpointed at step 3 on request (SIGTERM)")
    assert status.snapshot()["message"].startswith("checkpointed at step 3")
    with pytest.raises(KeyError, match="unknown status fields"):
        status.update(note="x")
