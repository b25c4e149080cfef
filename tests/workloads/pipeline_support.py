"""What the pipeline tests share: a four-layer tiny model, `fireflyer train` over several local
ranks, the one-stage reference run in this process, the stages' saved weights, and the check that
an executed timeline follows its schedule."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fireflyer.storage import checkpoint
from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.threads import single_intra_op_thread
from fireflyer.workloads.train import parallel, schedules
from fireflyer.workloads.train.config import TrainConfig
from fireflyer.workloads.train.layout import stage_dir
from fireflyer.workloads.train.trainer import Trainer
from tests.ports import free_port
from tests.workloads.train_support import REPO, config, read_log, train_argv, train_env

CPU = parallel.Rank(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def four_layer_model(root: Path) -> Path:
    """The tiny preset with four layers: one per stage at P = 4 (MoE in layers 1–3)."""
    return init_checkpoint(root / "tiny4", preset="tiny", seed=0, overrides={"num_hidden_layers": 4})


def pipeline_config(model: Path, data: Path, **overrides: Any) -> TrainConfig:
    """A short run: sequences of 16 tokens, one per micro-batch, a balance loss large enough to
    matter, and a final checkpoint."""
    base: dict[str, Any] = {
        "steps": 3,
        "micro_batch_size": 1,
        "seq_len": 16,
        "seq_aux_alpha": 1e-2,
        "checkpoint_every": 0,
    }
    return config(model, data, **(base | overrides))


def run_ranks(
    cfg: TrainConfig, ranks: int, timeline: Path | None = None, timeout: float = 240.0
) -> subprocess.CompletedProcess[str]:
    """`fireflyer train` with `ranks` local ranks (one intra-op thread each)."""
    argv = [*train_argv(cfg), "--seq-aux-alpha", str(cfg.seq_aux_alpha)]  # not among the interface flags
    argv += ["--timeline-jsonl", str(timeline)] if timeline else []
    env = train_env(NPROC_PER_NODE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def logged_losses(path: Path) -> list[float]:
    return [line["loss"] for _, line in sorted(read_log(path).items())]


def reference(cfg: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One rank, one stage, in this process: (losses, final weights)."""
    cfg = replace(cfg, pipeline=1, schedule="none", checkpoint_dir=None, log_jsonl=None)
    with single_intra_op_thread():
        trainer = Trainer(cfg, CPU)
        losses = [r.loss for r in trainer.run()]
    assert trainer.model is not None
    return losses, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def saved_weights(root: Path, stages: int, step: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from the stages' checkpoints of `step` (each stage once)."""
    out: dict[str, torch.Tensor] = {}
    for stage in range(stages):
        model = checkpoint.load(stage_dir(root, stage, stages), step)["model"]
        assert not set(model) & set(out), "a weight saved by two stages"
        out |= model
    return out


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal up to FP32 reduction order (the runs differ by about 1e-6 after three steps)."""
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=5e-5, msg=name)


def timelines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_timeline(line: dict[str, Any], pipelines: int = 1) -> list[float]:
    """The executed operations of every rank are the schedule's, in its order; each starts after
    the operations it depends on (by the host clock) and, apart from the message's latency, right
    when the last of them (or its rank's previous operation) ends — the executed waits are the
    simulator's. → the latencies."""
    schedule = schedules.build(line["schedule"], line["stages"], line["microBatches"])
    ranks = line["ranks"]
    assert len(ranks) == pipelines * schedule.stages
    latencies = []
    for replica in range(pipelines):
        mine = ranks[replica * schedule.stages : (replica + 1) * schedule.stages]
        ends: dict[tuple[int, str, int, int], float] = {}
        for position, records in enumerate(mine):
            assert [r[0] for r in records] == [str(op) for op in schedule.ranks[position]]
            for record, op in zip(records, schedule.ranks[position], strict=True):
                assert record[1] <= record[2]
                for p in op.passes:
                    ends[(position, p.phase, p.micro, p.direction)] = record[2]
        for position, records in enumerate(mine):
            previous = None
            for record, op in zip(records, schedule.ranks[position], strict=True):
                start = record[1]
                inputs = [ends[d] for d in schedules.dependencies(schedule, position, op)]
                assert all(end <= start for end in inputs), (position, record)
                ready = max([*inputs, *([previous] if previous is not None else [])], default=start)
                latencies.append(start - ready)
                previous = record[2]
    # The sole source of waiting beyond the model is delivery (loopback, a busy host): small.
    assert float(np.median(latencies)) < 0.01, latencies
    return latencies
