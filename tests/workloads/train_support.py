"""What the trainer tests share: the tiny checkpoint, a repeated-pattern data set, a config
builder and `fireflyer train` as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.train.config import TrainConfig
from fireflyer.workloads.train.data import write_shards

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
PATTERN_LEN = 23  # shorter than a sequence: after one period the rest is predictable


def tiny_model(root: Path) -> Path:
    return init_checkpoint(root / "tiny", preset="tiny", seed=0)


def pattern_data(root: Path, documents: int = 40, shard_tokens: int = 1000) -> Path:
    """Documents cut from one repeated random pattern (ids 2…999), split over several shards."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(2, 1000, size=PATTERN_LEN)
    stream = np.tile(pattern, 40)
    docs = [stream[i : i + 200] for i in range(documents)]
    return write_shards(docs, root / "data", shard_tokens=shard_tokens, eos_id=1)


def config(model: Path, data: Path, **overrides: Any) -> TrainConfig:
    """A small CPU run: 2 micro-batches of 2 sequences of SEQ_LEN tokens, FP32."""
    base: dict[str, Any] = {
        "model": model,
        "data": data,
        "steps": 8,
        "micro_batches": 2,
        "micro_batch_size": 2,
        "seq_len": SEQ_LEN,
        "lr": 1e-3,
        "warmup_steps": 2,
        "device": "cpu",
        "dtype": "fp32",
    }
    return TrainConfig(**(base | overrides))


def train_argv(cfg: TrainConfig) -> list[str]:
    """The `fireflyer train` command line of a config (the interface flags first)."""
    argv = [sys.executable, "-m", "fireflyer.cli", "train"]
    argv += ["--model", str(cfg.model), "--data", str(cfg.data)]
    argv += ["--steps", str(cfg.steps), "--micro-batches", str(cfg.micro_batches)]
    if cfg.checkpoint_dir is not None:
        argv += ["--checkpoint-dir", str(cfg.checkpoint_dir), "--checkpoint-every", str(cfg.checkpoint_every)]
    argv += ["--pipeline", str(cfg.pipeline), "--schedule", cfg.schedule]
    if cfg.log_jsonl is not None:
        argv += ["--log-jsonl", str(cfg.log_jsonl)]
    argv += ["--micro-batch-size", str(cfg.micro_batch_size), "--seq-len", str(cfg.seq_len)]
    argv += ["--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup), "--device", cfg.device]
    argv += ["--dtype", cfg.dtype, "--keep", str(cfg.keep)]
    if cfg.status_port:
        argv += ["--status-port", str(cfg.status_port), "--status-host", "127.0.0.1"]
    return argv


def train_env(**extra: str) -> dict[str, str]:
    """One intra-op thread per rank: the numbers then match the in-process runs bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | extra


def run_train(cfg: TrainConfig, timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_argv(cfg), env=train_env(**env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def read_log(path: Path) -> dict[int, dict[str, Any]]:
    """The JSONL lines by step (a line cut short by a kill is skipped)."""
    lines = {}
    for raw in path.read_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        lines[line["step"]] = line
    return lines
