"""Rank 0's per-step record: one JSON line per step in --log-jsonl, flushed as it is written, and
one short progress line on stderr; and, with --timeline-jsonl, every rank's pipeline timeline."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where a pipeline runs
    from fireflyer.workloads.train.parallel import Rank
    from fireflyer.workloads.train.pipeline import Pipeline


@dataclass(frozen=True)
class StepRecord:
    step: int  # steps done, 1-based
    loss: float  # mean next-token cross-entropy over the step's global batch
    lr: float
    grad_norm: float  # before clipping
    tokens: int  # tokens trained on so far, every rank together
    seconds: float  # wall time of this step
    balance_loss: float  # sequence-wise balance loss, summed over MoE layers
    step_tokens: int = 0  # tokens of this step (not in the JSON line; `tokens` is the running sum)

    @property
    def tokens_per_second(self) -> float:
        return 0.0 if self.seconds <= 0 else self.step_tokens / self.seconds


def _open_resumed(path: Path, resumed: int) -> IO[str]:
    """Open a JSONL file for a run that resumes after step `resumed`: the lines of steps
    1…resumed stay, the rest go (they are about to be run again), so the file ends up with one
    line per step whatever the restarts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = [line for line in _lines(path) if 0 < _step_of(line) <= resumed]
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)
    return open(path, "a")


class StepLog:
    """The JSONL file of a run (one line per step, see `_open_resumed`)."""

    def __init__(self, path: Path | None, resumed: int) -> None:
        self._file: IO[str] | None = None
        if path is not None:
            self._file = _open_resumed(path, resumed)

    def write(self, record: StepRecord) -> None:
        line: dict[str, float | None] = asdict(record)
        del line["step_tokens"]
        # JSON has no NaN: a diverged loss is written as null.
        line = {k: None if v is not None and not math.isfinite(v) else v for k, v in line.items()}
        if self._file is not None:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
        print(
            f"step {record.step} loss {record.loss:.4f} lr {record.lr:.2e} grad_norm {record.grad_norm:.3f}"
            f" {record.tokens_per_second:.0f} tok/s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TimelineLog:
    """--timeline-jsonl: per step, every rank's executed pipeline operations, gathered to rank 0:
    {"step", "schedule", "stages", "microBatches", "ranks": [[[op, start, end, wait], …] per rank]}
    with times in seconds on the host's monotonic clock (comparable between the ranks of one
    host). `enabled` must be the same on every rank: gathering is a collective."""

    def __init__(self, path: Path | None, resumed: int, enabled: bool) -> None:
        self.enabled = enabled
        self._file: IO[str] | None = None
        if path is not None:
            self._file = _open_resumed(path, resumed)

    def write(self, rank: Rank, step: int, pipeline: Pipeline) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        mine = [[r.op, r.start, r.end, r.wait] for r in pipeline.timeline]
        gathered: list[Any] = [None] * rank.world if rank.is_leader else []
        dist.gather_object(mine, gathered if rank.is_leader else None, dst=0)
        if self._file is None:
            return
        line = {
            "step": step,
            "schedule": pipeline.schedule.name,
            "stages": pipeline.schedule.stages,
            "microBatches": pipeline.schedule.micro_batches,
            "ranks": gathered,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line + "\n" for line in text.splitlines() if line.strip()]


def _step_of(line: str) -> int:
    """The line's step; 0 for a line that has none (cut short by a crash, say)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return 0
    return step if isinstance(step, int) else 0
