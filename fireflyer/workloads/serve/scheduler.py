"""Continuous batching: chunked prefill mixed with decode, preemption by recomputation.

Each step has a token budget. Running sequences go first, oldest arrival first: one in decode
gets one token, one in prefill the next chunk of its remaining tokens (leaving a token of budget
for every younger running sequence in decode, so a long prompt cannot stall their decoding).
Then waiting sequences are admitted in FIFO order while the budget, `max_num_seqs` and the KV
blocks allow. When a running sequence cannot get a block, the youngest running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed (prompt and generated tokens alike, mostly from the prefix cache) when readmitted.
The oldest running sequence is never preempted by another, so every sequence finishes.

Single-threaded: the engine loop calls add/abort/schedule/update in turn.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

from fireflyer.workloads.serve.block_manager import BlockManager
from fireflyer.workloads.serve.types import (
    FinishReason,
    QueueFullError,
    ScheduledChunk,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: set[int],
        max_waiting: int,
        watermark: float = 0.01,
    ) -> None:
        if min(max_num_seqs, max_num_batched_tokens, max_model_len, max_waiting) < 1:
            raise ValueError(
                "max_num_seqs, max_num_batched_tokens, max_model_len and max_waiting must be ≥ 1 "
                f"(got {max_num_seqs}, {max_num_batched_tokens}, {max_model_len}, {max_waiting})"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # A sequence stops before it needs more blocks than exist, so running alone it always fits.
        self.max_seq_len = min(max_model_len, block_manager.num_blocks * block_manager.block_tokens)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_waiting = max_waiting
        # Free blocks kept back when admitting, so running sequences can grow without thrashing.
        self.watermark_blocks = int(block_manager.num_blocks * watermark)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # by arrival
        self._live: dict[str, Sequence] = {}
        self._arrival: dict[str, int] = {}
        self._next_arrival = 0
        self._aborted: list[Sequence] = []  # reported by the next update()
        self.num_preemptions = 0

    # -- queue -------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        """Sequences to step, or aborted ones update() has yet to report."""
        return bool(self.running or self.waiting or self._aborted)

    def add(self, seq: Sequence) -> None:
        """Queue a new request. Raises QueueFullError when `max_waiting` are waiting, ValueError
        for a request that can never run."""
        self.validate(seq)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_waiting {self.max_waiting})")
        seq.status = SequenceStatus.WAITING
        self._live[seq.request_id] = seq
        self._arrival[seq.request_id] = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(seq)

    def validate(self, seq: Sequence) -> None:
        """ValueError (with the numbers) for a request that can never run here."""
        n = seq.num_tokens
        bm = self.block_manager
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already in the engine")
        if n < 1:
            raise ValueError("the prompt is empty")
        if seq.params.max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, not {seq.params.max_tokens}")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens; max_model_len is {self.max_model_len}, which must leave "
                "room for at least one generated token"
            )
        if n >= self.max_seq_len:
            blocks = -(-n // bm.block_tokens)
            raise ValueError(
                f"the prompt has {n} tokens and needs {blocks} KV blocks of {bm.block_tokens} tokens "
                f"(plus room for a generated token), but the cache has {bm.num_blocks} blocks "
                f"({self.max_seq_len} tokens)"
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a waiting or running request: its blocks are freed now, it is FINISHED with
        ABORT, and the next update() returns it. False if the id is unknown or already finished."""
        seq = self._live.pop(request_id, None)
        if seq is None:
            return False
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._arrival.pop(request_id, None)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        self._aborted.append(seq)
        return True

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        # Running sequences in decode not yet scheduled this step: each keeps a token of budget.
        pending_decodes = sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens == 1)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                pending_decodes -= 1
                length = 1
            else:
                length = min(remaining, budget - pending_decodes)
                if length <= 0:
                    i += 1
                    continue
            while not self.block_manager.ensure_capacity(seq, seq.num_computed_tokens + length):
                # The youngest running sequence is after `seq`, or `seq` itself.
                victim = self.running[-1]
                if victim is not seq and victim.num_tokens - victim.num_computed_tokens == 1:
                    pending_decodes -= 1
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself, the last of the running list
            chunk = ScheduledChunk(seq, seq.num_computed_tokens, length)
            (decodes if length == 1 else prefills).append(chunk)
            budget -= length
            i += 1
        if not preempted:
            self._admit(budget, decodes, prefills)
        return SchedulerOutput(chunks=decodes + prefills, preempted=preempted)

    def _preempt(self, seq: Sequence) -> None:
        assert self.running[-1] is seq, "only the youngest running sequence is preempted"
        self.running.pop()
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, budget: int, decodes: list[ScheduledChunk], prefills: list[ScheduledChunk]) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # With nothing running, the watermark would only keep the largest prompts out forever.
            keep_free = self.watermark_blocks if self.running else 0
            cached_at_arrival = seq.num_cached_tokens
            if not bm.allocate(seq, budget, keep_free=keep_free):
                break
            if seq.num_preemptions:
                # The API reports prompt tokens the cache served on arrival, not on recomputation.
                seq.num_cached_tokens = cached_at_arrival
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: self._arrival[s.request_id])
            length = min(budget, seq.num_tokens - seq.num_computed_tokens)
            chunk = ScheduledChunk(seq, seq.num_computed_tokens, length)
            (decodes if length == 1 else prefills).append(chunk)
            budget -= length

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Account for a computed step: `sampled` holds the token drawn for every chunk whose
        `samples` is true, by request id. Returns the sequences that finished: those of this step
        (STOP or LENGTH, blocks freed) after those aborted since the last update. Chunks of a
        sequence aborted after schedule() are ignored."""
        finished, self._aborted = self._aborted, []
        now = time.monotonic()
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status != SequenceStatus.RUNNING:
                continue
            if chunk.start != seq.num_computed_tokens:
                raise ValueError(
                    f"{seq.request_id}: chunk starts at {chunk.start}, "
                    f"but {seq.num_computed_tokens} tokens are computed"
                )
            samples = chunk.samples  # before the token is appended, which moves the end
            seq.num_computed_tokens += chunk.length
            self.block_manager.commit_full_blocks(seq)
            if not samples:
                continue
            token = sampled.get(seq.request_id)
            if token is None:
                raise ValueError(f"no sampled token for {seq.request_id}, whose chunk samples")
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        del self._live[seq.request_id]
        del self._arrival[seq.request_id]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
