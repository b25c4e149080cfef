"""Rank 0's per-step record: one JSON line per step in --log-jsonl, flushed as it is written, and
one short progress line on stderr."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO


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


class StepLog:
    """The JSONL file of a run. Opening it for a run that resumes after step `resumed` keeps the
    lines of steps 1…resumed and drops the rest (they are about to be trained again), so the file
    ends up with one line per step whatever the restarts."""

    def __init__(self, path: Path | None, resumed: int) -> None:
        self._file: IO[str] | None = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _lines(path) if 0 < _step_of(line) <= resumed]
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)
        self._file = open(path, "a")  # noqa: SIM115 — open for the whole run, closed by close()

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
