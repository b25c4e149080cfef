"""What the unit's leader tells every rank before a step, and what each rank tells it after.

Both travel as pickled objects over the unit's gloo control group (one broadcast and one gather
per step); the tensors of the model travel over the expert-parallel group inside the step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fireflyer.workloads.serve.types import FinishReason, SamplingParams


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    rank: int  # the data-parallel rank that runs it
    handoff: Any = None  # KV blocks a prefill unit sent for it (decode role)
    kv_target: Any = None  # where to send its KV blocks (prefill role)


@dataclass(frozen=True)
class StepCommand:
    adds: list[NewRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    run: bool = True  # False: a heartbeat while the unit is idle (no model step)
    stop: bool = False  # the leader is shutting down: every rank exits
    placement: Any = None  # an expert placement every rank switches to before this step


@dataclass(frozen=True)
class TokenRecord:
    """One `StepEvent` of a rank, without the sequence object (the leader holds its own copy)."""

    request_id: str
    token: int | None
    finished: bool
    finish_reason: FinishReason | None
    num_cached_tokens: int


@dataclass(frozen=True)
class RankReport:
    rank: int
    events: list[TokenRecord] = field(default_factory=list)
    preempted: int = 0
    has_work: bool = False
    kv_load: int = 0  # blocks in use plus the blocks its waiting requests need
    running: int = 0
    waiting: int = 0
    used_blocks: int = 0
    num_blocks: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0
    tier_hit_tokens: int = 0
    gpu_entries: list[int] | None = None  # per MoE layer: (token, expert) pairs computed here, since start
    load_delta: Any = None  # tokens per (MoE layer, expert) since the last report (numpy), or None
    step_seconds: float | None = None  # wall time of this rank's model step (None: it did not step)
    error: str | None = None


__all__ = ["NewRequest", "RankReport", "StepCommand", "TokenRecord"]
