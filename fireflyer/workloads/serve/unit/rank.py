"""One rank of a unit: its own engine (data-parallel attention, its own KV cache), driven step by
step by the leader's commands, and the report it sends back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from fireflyer.workloads.model.moe import MoE
from fireflyer.workloads.serve.block_manager import blocks_for
from fireflyer.workloads.serve.engine import LLMEngine, StepEvent
from fireflyer.workloads.serve.types import FinishReason, QueueFullError, Sequence
from fireflyer.workloads.serve.unit.placement import Placement
from fireflyer.workloads.serve.unit.protocol import RankReport, StepCommand, TokenRecord

log = logging.getLogger(__name__)


class RankEngine:
    def __init__(
        self, engine: LLMEngine, rank: int, switch: Callable[[Placement], None] | None = None
    ) -> None:
        self.engine = engine
        self.rank = rank
        self._switch = switch  # applies an expert placement (None: the experts are not split)
        window = engine.eplb_load
        self._load_sent = None if window is None else np.zeros((window.layers, window.experts), np.int64)
        self._refused: list[TokenRecord] = []
        self._step_seconds: float | None = None  # the last step's wall time, until reported

    def apply(self, command: StepCommand) -> None:
        """A new expert placement first (every rank switches before the same step), then the
        requests the leader gave this rank, then the aborts (of any rank: unknown ids are someone
        else's)."""
        if command.placement is not None:
            self.switch(command.placement)
        for add in command.adds:
            if add.rank != self.rank:
                continue
            seq = Sequence(prompt_ids=list(add.prompt_ids), params=add.params, request_id=add.request_id)
            seq.handoff, seq.kv_target = add.handoff, add.kv_target
            try:
                self.engine.add(seq)
            except (QueueFullError, ValueError) as error:  # the leader validated it; a race at most
                log.warning("request %s not admitted on rank %d: %s", add.request_id, self.rank, error)
                self._refused.append(TokenRecord(add.request_id, None, True, FinishReason.ABORT, 0))
        for request_id in command.aborts:
            self.engine.abort(request_id)

    def switch(self, placement: Placement) -> None:
        if self._switch is None:
            raise RuntimeError("an expert placement reached a rank whose experts are not split")
        self._switch(placement)
        log.info("rank %d: expert placement generation %d applied", self.rank, placement.generation)

    def step(self, command: StepCommand) -> tuple[list[StepEvent], int]:
        """Every rank runs a step when the leader says so, with or without tokens of its own (an
        expert-parallel model then still joins each MoE layer's collectives)."""
        if not command.run:
            self.engine.idle()
            return [], 0
        started = time.perf_counter()
        result = self.engine.step()
        self._step_seconds = time.perf_counter() - started
        return result

    def report(self, events: list[StepEvent], preempted: int, *, with_load: bool = True) -> RankReport:
        engine = self.engine
        scheduler, blocks = engine.scheduler, engine.block_manager
        records = self._refused + [
            TokenRecord(
                e.seq.request_id,
                e.token,
                e.finished,
                e.seq.finish_reason if e.finished else None,
                e.seq.num_cached_tokens,
            )
            for e in events
        ]
        self._refused = []
        step_seconds, self._step_seconds = self._step_seconds, None
        promised = sum(blocks_for(seq.num_tokens) for seq in scheduler.waiting)
        return RankReport(
            rank=self.rank,
            events=records,
            preempted=preempted,
            has_work=engine.has_work,
            kv_load=blocks.num_used_blocks + promised,
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
            queried_tokens=blocks.queried_tokens,
            hit_tokens=blocks.hit_tokens,
            tier_hit_tokens=blocks.tier_hit_tokens,
            gpu_entries=self.gpu_entries(),
            load_delta=self._load_delta() if with_load else None,
            step_seconds=step_seconds,
        )

    def gpu_entries(self) -> list[int] | None:
        moes = [block.mlp for block in self.engine.model.blocks if isinstance(block.mlp, MoE)]
        if not moes or moes[0].dispatcher is None:
            return None
        return [moe.dispatched_entries for moe in moes]

    def _load_delta(self) -> np.ndarray | None:
        """Tokens per (MoE layer, expert) counted here since the last report; None if none."""
        window = self.engine.eplb_load
        if window is None or self._load_sent is None:
            return None
        counted = window.counters.cpu().numpy()
        delta = counted - self._load_sent
        if not delta.any():
            return None
        self._load_sent = counted.copy()
        return delta


__all__ = ["RankEngine"]
