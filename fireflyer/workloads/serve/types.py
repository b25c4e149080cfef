"""What the scheduler, the model runner, the engine and the API exchange."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

BLOCK_TOKENS = 64  # KV block size: FlashMLA's page


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's end-of-sequence tokens
    ignore_eos: bool = False


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an end-of-sequence or stop token (or a stop string, decided by the API)
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"  # cancelled: the client went away or a stop string was found


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. `token_ids` is prompt + output so far; the first
    `num_computed_tokens` of them have their KV in the cache blocks listed in `block_table`."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    # Prefill/decode disaggregation (serve/handoff.py): blocks received for this prompt (decode),
    # or where to send its blocks (prefill).
    handoff: Any = field(default=None, repr=False)
    kv_target: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute tokens [start, start + length) of `seq` this step. When the chunk reaches the end
    of `seq.token_ids`, the step samples the sequence's next token."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        return self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decode chunks (length 1) first, then prefill chunks
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


@dataclass(frozen=True)
class TokenEvent:
    """One event of a request's stream: a new token, and on the last event the finish reason."""

    token_id: int | None  # None only on a final event that carries no token (abort)
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int


class QueueFullError(RuntimeError):
    """The engine holds as many requests as it was configured to queue."""


class EngineStoppedError(RuntimeError):
    """The engine's step loop has stopped (its model failed); the server reports itself unhealthy."""
