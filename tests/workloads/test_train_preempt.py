"""A checkpoint requested by signal: `fireflyer train` as a pod runs it gets SIGTERM (the pod is
deleted, as when a preemptible TrainingJob gives its nodes back) or SIGUSR1, finishes its step,
checkpoints it and exits; the resumed run loses no step and repeats the uninterrupted run's
losses exactly."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fireflyer.storage import checkpoint
from fireflyer.workloads.train.config import TrainConfig
from tests.ports import free_port
from tests.workloads.test_train_cli import in_process_losses
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

STEPS = 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("preempt")
    return tiny_model(root), pattern_data(root)


def _signal_after(cfg: TrainConfig, sig: signal.Signals, steps: int, **env: str) -> tuple[int, str]:
    """Run `fireflyer train`, send `sig` to its first process (as the kubelet does) once `steps`
    steps are logged; → (exit status, stderr)."""
    assert cfg.log_jsonl is not None
    proc = subprocess.Popen(
        train_argv(cfg), env=train_env(**env), cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if max(read_log(cfg.log_jsonl) if cfg.log_jsonl.exists() else {}, default=0) >= steps:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


def _resume_and_compare(cfg: TrainConfig, stopped_at: int, expected: list[float]) -> None:
    assert cfg.log_jsonl is not None
    result = run_train(cfg)
    assert result.returncode == 0, result.stderr
    assert f"resumed from the checkpoint of step {stopped_at}" in result.stderr
    lines = read_log(cfg.log_jsonl)
    assert [lines[s]["loss"] for s in range(1, STEPS + 1)] == expected  # zero steps lost or redone


def test_sigterm_checkpoints_the_current_step_and_the_resume_loses_nothing(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    # Checkpoints every 100 steps: the only checkpoint before the end is the requested one.
    cfg = config(*inputs, steps=STEPS, checkpoint_every=100, log_jsonl=tmp_path / "log.jsonl")
    cfg = replace(cfg, checkpoint_dir=tmp_path / "ck")
    expected = in_process_losses(replace(cfg, checkpoint_dir=None, log_jsonl=None))

    code, stderr = _signal_after(cfg, signal.SIGTERM, 3)

    assert code == 143, stderr  # not 0: a pod ended this way is not a finished rank
    stopped_at = max(read_log(tmp_path / "log.jsonl"))
    assert 3 <= stopped_at < STEPS
    assert checkpoint.latest_step(tmp_path / "ck") == stopped_at  # the last completed step
    assert f"checkpointed at step {stopped_at} on request (SIGTERM)" in stderr
    _resume_and_compare(cfg, stopped_at, expected)


def test_sigusr1_stops_every_rank_after_the_same_step(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    steps = 6
    cfg = config(*inputs, steps=steps, micro_batches=1, log_jsonl=tmp_path / "dp2.jsonl")
    cfg = replace(cfg, checkpoint_dir=tmp_path / "ck", checkpoint_every=100)
    ranks = {"NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}

    code, stderr = _signal_after(cfg, signal.SIGUSR1, 2, **ranks)

    assert code == 138, stderr  # 128 + SIGUSR1: stopped before --steps, never a finished rank
    stopped_at = max(read_log(tmp_path / "dp2.jsonl"))
    assert stopped_at < steps
    # A complete checkpoint needs both ranks' records: they stopped after the same step.
    assert checkpoint.latest_step(tmp_path / "ck") == stopped_at
    assert f"checkpointed at step {stopped_at} on request (SIGUSR1)" in stderr
    result = run_train(cfg, **(ranks | {"MASTER_PORT": str(free_port())}))
    assert result.returncode == 0, result.stderr
    lines = read_log(tmp_path / "dp2.jsonl")
    # Two ranks of one micro-batch each train as one rank of two (test_train_cli.py).
    one_rank = in_process_losses(config(*inputs, steps=steps, micro_batches=2))
    np.testing.assert_allclose([lines[s]["loss"] for s in range(1, steps + 1)], one_rank, rtol=1e-5)
