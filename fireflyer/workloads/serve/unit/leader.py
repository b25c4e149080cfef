"""The unit's leader (rank 0): the engine the HTTP API drives when a unit has several ranks.

It looks like one `LLMEngine` to `AsyncEngine`. Each request goes to the data-parallel rank with
the least KV load; every step the leader broadcasts the new requests and aborts, all ranks step
together (ranks without tokens join the MoE collectives with empty batches), and the leader
gathers their tokens and applies them to its own copies of the sequences."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fireflyer.workloads.serve.block_manager import blocks_for
from fireflyer.workloads.serve.engine import EngineConfig, StepEvent
from fireflyer.workloads.serve.eplb_load import LoadWindow
from fireflyer.workloads.serve.types import Sequence, SequenceStatus
from fireflyer.workloads.serve.unit.failures import Phase, collective_backend
from fireflyer.workloads.serve.unit.placement import Placement, PlacementWatch
from fireflyer.workloads.serve.unit.protocol import NewRequest, RankReport, StepCommand
from fireflyer.workloads.serve.unit.rank import RankEngine
from fireflyer.workloads.serve.unit.topology import choose_rank

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0  # how often an idle leader shows the other ranks it is alive
PLACEMENT_POLL_SECONDS = 2.0  # how often the mounted placement file is looked at


@dataclass
class _CacheView:
    """The unit's KV cache as the metrics see it: the sum over ranks (as last reported)."""

    unit: UnitEngine

    def _sum(self, name: str) -> int:
        return sum(int(getattr(report, name)) for report in self.unit.reports)

    @property
    def num_blocks(self) -> int:
        return self._sum("num_blocks")

    @property
    def num_used_blocks(self) -> int:
        return self._sum("used_blocks")

    @property
    def queried_tokens(self) -> int:
        return self._sum("queried_tokens")

    @property
    def hit_tokens(self) -> int:
        return self._sum("hit_tokens")

    @property
    def tier_hit_tokens(self) -> int:
        return self._sum("tier_hit_tokens")


@dataclass
class _QueueView:
    unit: UnitEngine

    @property
    def num_running(self) -> int:
        return sum(report.running for report in self.unit.reports)

    @property
    def num_waiting(self) -> int:
        return sum(report.waiting for report in self.unit.reports) + len(self.unit.pending_adds)


class UnitEngine:
    def __init__(
        self, rank0: RankEngine, control_group: Any, world: int, placement: PlacementWatch | None = None
    ) -> None:
        self.local = rank0
        local = rank0.engine
        self.group = control_group
        self.placement = placement  # the mounted EPLB placement, when the experts are split
        self.world = world
        self.config: EngineConfig = local.config
        self.max_model_len = local.max_model_len
        self.eplb_load: LoadWindow | None = local.eplb_load
        self.pending_adds: list[NewRequest] = []
        self.pending_aborts: list[str] = []
        self.remote: dict[str, tuple[int, Sequence]] = {}
        # Blocks of the requests sent to each rank since its last report (its load in the meantime).
        self.promised = [0] * world
        blocks = local.block_manager.num_blocks
        counted = rank0.gpu_entries()  # every rank starts from none (warm-up is not load)
        zeros = None if counted is None else [0] * len(counted)
        self.reports = [RankReport(rank=r, num_blocks=blocks, gpu_entries=zeros) for r in range(world)]
        self.block_manager = _CacheView(self)
        self.scheduler = _QueueView(self)
        self._assigned = [0] * world  # requests given to each rank, since `take_assigned`
        self._last_exchange = self._last_poll = time.monotonic()
        self._stopped = False
        self.broken = False  # a step failed part-way: the ranks are no longer in step
        self.on_collective_error: Callable[[str], None] | None = None  # given the failed backend
        self._phase = Phase.CONTROL

    # -- what AsyncEngine calls (the engine thread) ------------------------------------------------

    def validate(self, seq: Sequence) -> None:
        self.local.engine.validate(seq)  # every rank runs the same model with the same limits

    def add(self, seq: Sequence) -> None:
        self.validate(seq)
        self.reports[0] = self.local.report([], 0, with_load=False)
        loads = [self.reports[r].kv_load + self.promised[r] for r in range(self.world)]
        running = [report.running for report in self.reports]
        rank = choose_rank(loads, running)
        self.promised[rank] += blocks_for(seq.num_tokens)
        self._assigned[rank] += 1
        if rank == 0:
            self.local.engine.add(seq)
            return
        self.pending_adds.append(
            NewRequest(seq.request_id, list(seq.prompt_ids), seq.params, rank, seq.handoff, seq.kv_target)
        )
        seq.handoff = seq.kv_target = None  # they travel with the command; the rank owns them
        self.remote[seq.request_id] = (rank, seq)

    def abort(self, request_id: str) -> bool:
        if request_id in self.remote:
            self.pending_aborts.append(request_id)
            return True
        return self.local.engine.abort(request_id)

    def step_seconds(self) -> list[float | None]:
        """Each rank's wall time of the last step, as reported (None: it did not step)."""
        return [report.step_seconds for report in self.reports]

    def take_assigned(self) -> list[int]:
        """Requests given to each rank since the last call (for the metrics)."""
        assigned, self._assigned = self._assigned, [0] * self.world
        return assigned

    @property
    def has_work(self) -> bool:
        return bool(
            self.local.engine.has_work
            or self.pending_adds
            or self.pending_aborts
            or any(report.has_work for report in self.reports[1:])
        )

    def gpu_tokens(self) -> list[list[int]] | None:
        """[MoE layer][rank]: (token, expert) pairs each rank's experts computed since start, as
        last reported: the per-GPU load the placement actually produced."""
        rows = [report.gpu_entries for report in self.reports]
        if any(row is None for row in rows):
            return None
        return [list(layer) for layer in zip(*rows, strict=True)]

    @property
    def placement_generation(self) -> int | None:
        """The expert placement generation every rank runs (None: the even split)."""
        return None if self.placement is None else self.placement.generation

    @property
    def placement_error(self) -> str | None:
        """Why the newest mounted placement was refused, if it was."""
        return None if self.placement is None else self.placement.error

    def step(self) -> tuple[list[StepEvent], int]:
        command = StepCommand(
            adds=self.pending_adds, aborts=self.pending_aborts, run=True, placement=self._new_placement()
        )
        self.pending_adds, self.pending_aborts = [], []
        return self._exchange(command)

    def idle(self) -> None:
        placement = self._new_placement()
        if placement is not None or time.monotonic() - self._last_exchange >= HEARTBEAT_SECONDS:
            self._exchange(StepCommand(run=False, placement=placement))
        else:
            self.local.engine.idle()

    def _new_placement(self) -> Placement | None:
        now = time.monotonic()
        if self.placement is None or now - self._last_poll < PLACEMENT_POLL_SECONDS:
            return None
        self._last_poll = now
        return self.placement.poll()

    def close(self) -> None:
        # A unit broken mid-step cannot be told anything: the other ranks may be blocked in that
        # step's collectives. They notice this process exit instead.
        if not self._stopped and not self.broken:
            self._stopped = True
            try:
                dist.broadcast_object_list([StepCommand(run=False, stop=True)], src=0, group=self.group)
            except Exception as error:  # the other ranks are gone already
                log.info("could not tell the unit's ranks to stop: %s", error)
        self.local.engine.close()

    # -- one step of the whole unit ----------------------------------------------------------------

    def _exchange(self, command: StepCommand) -> tuple[list[StepEvent], int]:
        try:
            return self._exchange_once(command)
        except BaseException as error:
            self.broken = True
            distributed = isinstance(error, dist.DistError)
            backend = collective_backend(error, self._phase, distributed_error=distributed)
            if backend is not None and self.on_collective_error is not None:
                self.on_collective_error(backend)
            raise

    def _exchange_once(self, command: StepCommand) -> tuple[list[StepEvent], int]:
        self._phase = Phase.CONTROL
        dist.broadcast_object_list([command], src=0, group=self.group)
        self._phase = Phase.STEP
        if command.placement is not None:
            self.local.switch(command.placement)
        events, preempted = self.local.step(command)
        mine = self.local.report(events, preempted, with_load=False)  # rank 0 counts into the window itself
        gathered: list[Any] = [None] * self.world
        self._phase = Phase.CONTROL
        dist.gather_object(mine, gathered, dst=0, group=self.group)
        self._phase = Phase.REPORTS
        self._last_exchange = time.monotonic()
        for report in gathered[1:]:
            failure = getattr(report, "error", None)
            if failure:
                raise RuntimeError(f"rank {report.rank} of the unit failed: {failure}")
        reports: list[RankReport] = gathered
        self.reports = reports
        self.promised = [0] * self.world
        for report in reports[1:]:
            events += self._remote_events(report)
            preempted += report.preempted
        self._count_remote_load(reports[1:])
        if command.placement is not None and self.placement is not None:
            self.placement.generation = command.placement.generation  # every rank has switched
        return events, preempted

    def _remote_events(self, report: RankReport) -> list[StepEvent]:
        """Apply a rank's tokens to the leader's copies of its sequences (the API streams those)."""
        out: list[StepEvent] = []
        for record in report.events:
            entry = self.remote.get(record.request_id)
            if entry is None:
                continue
            seq = entry[1]
            if record.token is not None:
                seq.token_ids.append(record.token)
                if seq.first_token_time is None:
                    seq.first_token_time = time.monotonic()
            seq.num_cached_tokens = record.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            if record.finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = record.finish_reason
                del self.remote[record.request_id]
            out.append(StepEvent(seq, record.token, record.finished))
        return out

    def _count_remote_load(self, reports: list[RankReport]) -> None:
        """The unit's expert load window counts every rank's tokens: the other ranks' counts are
        added to the leader's counters, which the window reads at its next tick."""
        window = self.eplb_load
        if window is None:
            return
        deltas = [report.load_delta for report in reports if report.load_delta is not None]
        for delta in deltas:
            window.counters += torch.from_numpy(delta).to(window.counters.device)
        if deltas:
            window.tick(stepped=True, flush=not self.has_work)


__all__ = ["UnitEngine"]
