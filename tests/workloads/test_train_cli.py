"""`fireflyer train` as the pods run it: a subprocess with the interface flags, killed and
restarted, with two local ranks of data parallelism, and with input it must refuse in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fireflyer.cli import main
from fireflyer.storage import checkpoint
from fireflyer.workloads.threads import single_intra_op_thread
from fireflyer.workloads.train import parallel
from fireflyer.workloads.train.data import write_shards
from fireflyer.workloads.train.trainer import Trainer
from tests.ports import free_port
from tests.workloads.train_support import (
    REPO,
    config,
    pattern_data,
    read_log,
    run_train,
    tiny_model,
    train_argv,
    train_env,
)

CPU = parallel.Rank(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "seconds"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    return tiny_model(root), pattern_data(root)


def in_process_losses(cfg: Any) -> list[float]:
    with single_intra_op_thread():  # as the subprocesses run (OMP_NUM_THREADS=1)
        return [r.loss for r in Trainer(cfg, CPU).run()]


def get_status(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except OSError:
        return None


def test_interface_flags_write_the_jsonl_and_serve_status(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    port = free_port()
    cfg = config(*inputs, steps=6, log_jsonl=tmp_path / "log.jsonl", status_port=port)
    cfg = replace(cfg, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, schedule="1f1b")
    proc = subprocess.Popen(train_argv(cfg), env=train_env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen: list[dict[str, Any]] = []
    try:
        while proc.poll() is None:
            body = get_status(port)
            if body is not None:
                seen.append(body)
            time.sleep(0.05)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert seen, "the status endpoint never answered"
    assert set(seen[-1]) == {"step", "loss", "lastCheckpointStep", "tokensPerSecond", "phase"}
    assert {b["phase"] for b in seen} <= {"starting", "loading", "training", "finishing", "done"}
    lines = read_log(tmp_path / "log.jsonl")
    assert sorted(lines) == [1, 2, 3, 4, 5, 6]
    assert all(set(line) >= KEYS for line in lines.values())
    assert "step 6 loss" in stderr
    assert checkpoint.list_steps(tmp_path / "ck") == [2, 4, 6]


def test_killed_run_resumes_bit_for_bit(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    cfg = config(*inputs, steps=10, checkpoint_every=2, log_jsonl=log)
    cfg = replace(cfg, checkpoint_dir=tmp_path / "ck")
    expected = in_process_losses(replace(cfg, checkpoint_dir=None, log_jsonl=None))
    proc = subprocess.Popen(
        train_argv(cfg), env=train_env(), cwd=REPO, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = read_log(log) if log.exists() else {}
            if max(done, default=0) >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(read_log(tmp_path / "log.jsonl"))
    assert 5 <= killed_at < 10
    resumed_from = checkpoint.latest_step(tmp_path / "ck")
    assert resumed_from is not None and resumed_from <= killed_at
    result = run_train(cfg)
    assert result.returncode == 0, result.stderr
    assert f"step {resumed_from + 1} loss" in result.stderr
    assert f"step {resumed_from} loss" not in result.stderr
    lines = read_log(tmp_path / "log.jsonl")
    assert [lines[s]["loss"] for s in range(1, 11)] == expected


def test_two_ranks_match_one_rank_with_twice_the_micro_batches(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg = config(*inputs, steps=4, micro_batches=1, log_jsonl=tmp_path / "dp2.jsonl")
    cfg = replace(cfg, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    result = run_train(cfg, NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert result.returncode == 0, result.stderr
    two_ranks = [line["loss"] for _, line in sorted(read_log(tmp_path / "dp2.jsonl").items())]
    one_rank = in_process_losses(config(*inputs, steps=4, micro_batches=2))
    np.testing.assert_allclose(two_ranks, one_rank, rtol=1e-5)
    manifest = json.loads((checkpoint.step_dir(tmp_path / "ck", 4) / "manifest.json").read_text())
    assert manifest["world"] == 2


def test_a_failing_rank_fails_the_process(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    bad = write_shards([np.full(200, 5000)], tmp_path / "bad")  # ids past the tiny vocabulary
    cfg = config(inputs[0], bad, steps=2)
    result = run_train(cfg, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    assert result.returncode != 0
    assert "fireflyer: error: rank" in result.stderr and "vocab_size" in result.stderr


@pytest.fixture
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.mark.usefixtures("quiet_env")
@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--model", "/nonexistent"], {}, "--model /nonexistent: no config.json"),
        (["--pipeline", "2", "--schedule", "1f1b"], {}, "--pipeline 2 does not divide the 1 ranks"),
        (["--steps", "0"], {}, "--steps must be ≥ 1"),
        ([], {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two': not an integer"),
        ([], {"NNODES": "2"}, "NNODES=2: set MASTER_ADDR"),
        (["--seq-len", "5000"], {}, "--seq-len 5000 exceeds the model's 4096 positions"),
    ],
)
def test_bad_input_is_one_line(
    inputs: tuple[Path, Path],
    extra: list[str],
    env: dict[str, str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model, data = inputs
    argv = ["train", "--model", str(model), "--data", str(data), "--steps", "3", "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fireflyer: error: ") and "\n" not in err
    assert message in err


def test_empty_data_is_one_line(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = write_shards([], tmp_path / "empty")
    argv = ["train", "--model", str(inputs[0]), "--data", str(empty), "--steps", "1", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fireflyer: error: {empty}: the data holds no tokens"
