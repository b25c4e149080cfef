"""Pipeline schedules as data: for every pipeline rank, the ordered operations of one step.

The model is cut by layers into P stages. A micro-batch flows forward through stages 0 … P−1 and
its gradient flows back P−1 … 0. Two schedules:

- 1F1B: rank s holds stage s. Warm up with P−s−1 forwards, then alternate one forward and one
  backward, then drain the remaining backwards. Idle time per rank (the bubble): (P−1)(F+B).
- DualPipe (DeepSeek-V3 report §3.2.1): rank r holds two chunks, stage r and stage P−1−r (P even;
  the parameters are held twice). Half of the M micro-batches enter at rank 0 (direction 0), the
  other half at rank P−1 (direction 1) and run through the mirrored stage order, so every rank has
  work from both ends. In the steady phase a rank runs the forward
  of one chunk together with the backward of the other as one overlapped F&B operation, which lets
  one chunk's communication hide behind the other chunk's compute. With part of the backwards'
  weight gradients deferred (W split out) and F = B − W, the largest idle time of a rank is the
  report's (P/2−1)(F&B+B−3W). The trainer does not split W (PyTorch computes
  input and weight gradients in one backward call); without the split the largest idle time of a
  rank is (P/2−1)(F&B+B) − F when B = 2F. DualPipe needs M ≥ 2P micro-batches.

A pass is F (forward), B (backward: input and weight gradients), I (input gradient only) or W
(the weight gradient of an earlier I). An operation is one pass, or an (F, B) pair run as one
overlapped operation. `simulate` runs a schedule with given costs, respecting every dependency,
and reports when each operation starts and ends and how long every rank sits idle.

Pure Python (no torch): the trainer executes exactly these lists, and the tests check them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fireflyer.errors import FireflyerError

SCHEDULES = ("1f1b", "dualpipe")
FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD = "F", "B", "I", "W"
KINDS = (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD)


class ScheduleError(FireflyerError):
    """A schedule that cannot be built for these sizes, or one that breaks a dependency."""


@dataclass(frozen=True, order=True)
class Pass:
    kind: str  # F, B, I or W
    micro: int  # index among the micro-batches of its direction, 0-based
    direction: int = 0  # 0: enters at rank 0; 1: enters at rank P−1 (DualPipe's reverse half)

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}{'r' if self.direction else ''}"

    @property
    def phase(self) -> str:
        """F, B or W: an I is the backward pass of its micro-batch, like a B."""
        return BACKWARD if self.kind == INPUT_GRAD else self.kind


@dataclass(frozen=True)
class Op:
    """One pass, or a forward and a backward run as one overlapped operation (F&B)."""

    passes: tuple[Pass, ...]

    def __str__(self) -> str:
        return "&".join(str(p) for p in self.passes)

    @property
    def overlapped(self) -> bool:
        return len(self.passes) > 1


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int  # P: pipeline ranks, and stages of the model
    micro_batches: int  # M: per step and pipeline, both directions together
    directions: int  # 1, or 2 for DualPipe
    ranks: tuple[tuple[Op, ...], ...]  # ranks[r]: rank r's operations in order

    @property
    def per_direction(self) -> int:
        return self.micro_batches // self.directions

    def stage(self, rank: int, direction: int) -> int:
        """The stage rank `rank` runs for micro-batches of `direction`."""
        return rank if direction == 0 else self.stages - 1 - rank

    def rank_of(self, stage: int, direction: int) -> int:
        return stage if direction == 0 else self.stages - 1 - stage

    def global_micro(self, p: Pass) -> int:
        """The micro-batch's index in the step's batch: direction 0 takes the first half."""
        return p.direction * self.per_direction + p.micro

    def chunks(self, rank: int) -> tuple[int, ...]:
        """The stages rank `rank` holds, by direction (one for 1F1B, two for DualPipe)."""
        return tuple(self.stage(rank, d) for d in range(self.directions))


# --- 1F1B -----------------------------------------------------------------------------------------


def one_f_one_b(stages: int, micro_batches: int) -> Schedule:
    """The classic one-forward-one-backward schedule (PipeDream-Flush)."""
    _check_sizes(stages, micro_batches)
    ranks = []
    for rank in range(stages):
        warmup = min(stages - rank - 1, micro_batches)
        ops = [_single(FORWARD, m) for m in range(warmup)]
        backward = 0
        for forward in range(warmup, micro_batches):
            ops += [_single(FORWARD, forward), _single(BACKWARD, backward)]
            backward += 1
        ops += [_single(BACKWARD, m) for m in range(backward, micro_batches)]
        ranks.append(tuple(ops))
    return Schedule("1f1b", stages, micro_batches, 1, tuple(ranks))


# --- DualPipe -------------------------------------------------------------------------------------


@dataclass
class _DualPipeRank:
    """Builds one rank's DualPipe list. Its 'near' direction is the one in which it is stage
    h = min(r, P−1−r) (direction 0 for the upper half of the ranks, 1 for the lower half); the
    'far' direction is the other, in which it is stage P−1−h. Micro-batches run in order within a
    direction; deferred weight gradients run first in, first out."""

    near: int
    far: int
    split: bool  # whether this schedule defers weight gradients at all
    ops: list[Op] = field(default_factory=list)
    forwards: dict[int, int] = field(default_factory=dict)
    backwards: dict[int, int] = field(default_factory=dict)
    deferred: list[Pass] = field(default_factory=list)

    def _next(self, counters: dict[int, int], direction: int) -> int:
        micro = counters.get(direction, 0)
        counters[direction] = micro + 1
        return micro

    def forward(self, direction: int) -> Pass:
        return Pass(FORWARD, self._next(self.forwards, direction), direction)

    def backward(self, direction: int, defer_weights: bool = False) -> Pass:
        micro = self._next(self.backwards, direction)
        if defer_weights and self.split:
            self.deferred.append(Pass(WEIGHT_GRAD, micro, direction))
            return Pass(INPUT_GRAD, micro, direction)
        return Pass(BACKWARD, micro, direction)

    def add(self, *passes: Pass) -> None:
        self.ops.append(Op(passes))

    def weights(self) -> None:
        """The oldest deferred weight gradient (nothing when W is not split out)."""
        if self.split:
            self.add(self.deferred.pop(0))


def dualpipe(stages: int, micro_batches: int, split_weights: bool = False) -> Schedule:
    """DualPipe for P = `stages` ranks (even) and M = `micro_batches` (even, ≥ 2P): M/2 micro-
    batches per direction. Per rank, with h = min(r, P−1−r) and H = P/2, eight phases:

    1. 2(H−h−1) forwards of the near chunk;
    2. h+1 times: a near forward, a far forward;
    3. H−h−1 times: a far backward (its weight gradient deferred, then run), a far forward;
    4. M/2−P+h+1 times: near F & far B overlapped, then far F & near B overlapped (on the two
       middle ranks the very first near F and far B run one after the other, so the near forward's
       output leaves before the backward);
    5. H−h−1 times: a far backward, then far F & near B overlapped;
    6. h+1 times: a far backward, a near backward (with W split, the later half defer their
       weight gradients);
    7. H−h−1 times: a deferred weight gradient, a near backward (deferring its own);
    8. the remaining deferred weight gradients.

    Without the W split (`split_weights=False`, what the trainer runs) every backward is a full B
    and phases 3, 7 and 8 lose their W operations. Bubbles (largest idle time of a rank, from the
    simulator; the tests check both for P = 4 … 10):

    - split, F = B − W: (P/2−1)(F&B + B − 3W), the DeepSeek-V3 report's formula;
    - not split, B = 2F: (P/2−1)(F&B + B) − F.
    """
    _check_sizes(stages, micro_batches)
    if stages % 2:
        raise ScheduleError(f"DualPipe needs an even number of pipeline stages, not {stages}")
    if micro_batches % 2 or micro_batches < 2 * stages:
        raise ScheduleError(
            f"DualPipe with {stages} stages needs an even number of micro-batches ≥ {2 * stages},"
            f" not {micro_batches}"
        )
    half_ranks, half_micro = stages // 2, micro_batches // 2
    ranks = []
    for rank in range(stages):
        h = min(rank, stages - 1 - rank)
        near = 0 if rank < half_ranks else 1
        b = _DualPipeRank(near=near, far=1 - near, split=split_weights)
        tail = half_ranks - h - 1  # ranks between this one and the middle
        for _ in range(2 * tail):
            b.add(b.forward(b.near))
        for _ in range(h + 1):
            b.add(b.forward(b.near))
            b.add(b.forward(b.far))
        for _ in range(tail):
            b.add(b.backward(b.far, defer_weights=True))
            b.weights()
            b.add(b.forward(b.far))
        for i in range(half_micro - stages + h + 1):
            if i == 0 and h == half_ranks - 1:
                b.add(b.forward(b.near))
                b.add(b.backward(b.far))
            else:
                b.add(b.forward(b.near), b.backward(b.far))
            b.add(b.forward(b.far), b.backward(b.near))
        for _ in range(tail):
            b.add(b.backward(b.far))
            b.add(b.forward(b.far), b.backward(b.near))
        # Phase 6: from its middle on, backwards defer their weight gradients, so the W work fills
        # the drain at the end; on ranks with odd h the far backward of the middle pair defers too.
        middle = (h + 1) // 2
        for i in range(h + 1):
            b.add(b.backward(b.far, defer_weights=i > middle or (i == middle and h % 2 == 1)))
            b.add(b.backward(b.near, defer_weights=i >= middle))
        for _ in range(tail):
            b.weights()
            b.add(b.backward(b.near, defer_weights=True))
        while b.deferred:
            b.weights()
        ranks.append(tuple(b.ops))
    return Schedule("dualpipe", stages, micro_batches, 2, tuple(ranks))


def build(name: str, stages: int, micro_batches: int) -> Schedule:
    """The schedule the trainer runs for `--schedule name` (weight gradients not split out)."""
    if name == "1f1b":
        return one_f_one_b(stages, micro_batches)
    if name == "dualpipe":
        return dualpipe(stages, micro_batches)
    raise ScheduleError(f"unknown pipeline schedule {name!r} (one of {', '.join(SCHEDULES)})")


def _single(kind: str, micro: int, direction: int = 0) -> Op:
    return Op((Pass(kind, micro, direction),))


def _check_sizes(stages: int, micro_batches: int) -> None:
    if stages < 1 or micro_batches < 1:
        raise ScheduleError(f"need ≥ 1 stage and ≥ 1 micro-batch, not {stages} and {micro_batches}")


# --- dependencies ---------------------------------------------------------------------------------


def upstream(schedule: Schedule, rank: int, p: Pass) -> int | None:
    """The rank whose output this pass consumes (activation or gradient), or None when it needs
    none: the first stage's forward reads tokens, the last stage's backward starts at the loss,
    and a W reads what its I left on this rank."""
    stage = schedule.stage(rank, p.direction)
    if p.kind == FORWARD:
        return None if stage == 0 else schedule.rank_of(stage - 1, p.direction)
    if p.kind in (BACKWARD, INPUT_GRAD):
        return None if stage == schedule.stages - 1 else schedule.rank_of(stage + 1, p.direction)
    return None


def downstream(schedule: Schedule, rank: int, p: Pass) -> int | None:
    """The rank this pass sends its output to (activation forward, input gradient backward)."""
    stage = schedule.stage(rank, p.direction)
    if p.kind == FORWARD:
        return None if stage == schedule.stages - 1 else schedule.rank_of(stage + 1, p.direction)
    if p.kind in (BACKWARD, INPUT_GRAD):
        return None if stage == 0 else schedule.rank_of(stage - 1, p.direction)
    return None


def check(schedule: Schedule) -> None:
    """Every stage of every direction runs each of its micro-batches' forward once and backward
    once (a B, or an I and later its W), forward before backward before W, and within a direction
    micro-batches in order (the trainer's point-to-point channels are first in, first out)."""
    for rank, ops in enumerate(schedule.ranks):
        seen: dict[tuple[str, int, int], int] = {}
        for index, op in enumerate(ops):
            if op.overlapped and sorted(p.phase for p in op.passes) != [BACKWARD, FORWARD]:
                raise ScheduleError(f"rank {rank} op {index} {op}: only an F and a B overlap")
            for p in op.passes:
                if not 0 <= p.direction < schedule.directions or not 0 <= p.micro < schedule.per_direction:
                    raise ScheduleError(f"rank {rank} op {index}: {p} is outside the step")
                key = (p.phase, p.micro, p.direction)
                if key in seen:
                    raise ScheduleError(f"rank {rank}: {p} runs twice")
                seen[key] = index
        for direction in range(schedule.directions):
            for micro in range(schedule.per_direction):
                at = [seen.get((phase, micro, direction)) for phase in (FORWARD, BACKWARD)]
                if at[0] is None or at[1] is None:
                    raise ScheduleError(f"rank {rank}: micro-batch {micro} direction {direction} incomplete")
                if at[0] > at[1]:
                    raise ScheduleError(f"rank {rank}: backward of {micro} before its forward")
                kinds = {
                    p.kind for op in ops for p in op.passes if (p.micro, p.direction) == (micro, direction)
                }
                split = INPUT_GRAD in kinds
                if split != (WEIGHT_GRAD in kinds) or (split and BACKWARD in kinds):
                    raise ScheduleError(f"rank {rank}: micro-batch {micro} mixes B with I/W")
                if split and seen[(WEIGHT_GRAD, micro, direction)] <= at[1]:
                    raise ScheduleError(f"rank {rank}: W of {micro} before its I")
            for phase in (FORWARD, BACKWARD, WEIGHT_GRAD):
                order = [
                    p.micro for op in ops for p in op.passes if p.phase == phase and p.direction == direction
                ]
                if order != sorted(order):
                    raise ScheduleError(f"rank {rank}: {phase} passes of direction {direction} out of order")


# --- simulation -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Unit costs: F, full B, its W part (0: not split out), and an overlapped F&B (None: F + B)."""

    forward: float = 1.0
    backward: float = 2.0
    weight: float = 0.0
    overlapped: float | None = None

    def of(self, op: Op) -> float:
        if op.overlapped and self.overlapped is not None:
            return self.overlapped
        return sum(self._pass(p) for p in op.passes)

    def _pass(self, p: Pass) -> float:
        return {
            FORWARD: self.forward,
            BACKWARD: self.backward,
            INPUT_GRAD: self.backward - self.weight,
            WEIGHT_GRAD: self.weight,
        }[p.kind]


@dataclass(frozen=True)
class Slot:
    op: Op
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    schedule: Schedule
    slots: tuple[tuple[Slot, ...], ...]  # per rank, in its order

    @property
    def makespan(self) -> float:
        return max((s[-1].end for s in self.slots if s), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(s.end - s.start for s in self.slots[rank])

    def idle(self, rank: int) -> float:
        """Time rank `rank` waits during the step (from 0 to the makespan)."""
        return self.makespan - self.busy(rank)

    @property
    def bubble(self) -> float:
        """The largest idle time of any rank: what the formulas in the papers count."""
        return max(self.idle(r) for r in range(self.schedule.stages))


def simulate(
    schedule: Schedule, costs: Costs | None = None, durations: list[list[float]] | None = None
) -> Simulation:
    """Run every rank's list in order; an operation starts once the rank is free and every pass in
    it has its input (the upstream rank's pass done; communication is free). `durations[r][i]`
    replaces the cost of rank r's i-th operation (replaying measured times). Raises ScheduleError
    when the ranks wait on each other in a cycle."""
    check(schedule)
    costs = costs or Costs()
    ranks = schedule.ranks
    done: dict[tuple[int, str, int, int], float] = {}  # (rank, phase, micro, direction) → end time
    slots: list[list[Slot]] = [[] for _ in ranks]
    position = [0] * len(ranks)
    free = [0.0] * len(ranks)
    remaining = sum(len(ops) for ops in ranks)
    while remaining:
        progressed = False
        for rank, ops in enumerate(ranks):
            while position[rank] < len(ops):
                op = ops[position[rank]]
                ready = _inputs_ready(schedule, rank, op, done)
                if ready is None:
                    break
                start = max(free[rank], ready)
                cost = durations[rank][position[rank]] if durations is not None else costs.of(op)
                end = start + cost
                slots[rank].append(Slot(op, start, end))
                for p in op.passes:
                    done[(rank, p.phase, p.micro, p.direction)] = end
                free[rank] = end
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(
                f"rank {r}: {ops[position[r]]}" for r, ops in enumerate(ranks) if position[r] < len(ops)
            )
            raise ScheduleError(f"{schedule.name}: the ranks wait on each other ({stuck})")
    return Simulation(schedule, tuple(tuple(s) for s in slots))


def _inputs_ready(
    schedule: Schedule, rank: int, op: Op, done: dict[tuple[int, str, int, int], float]
) -> float | None:
    """When every input of `op` is available, or None when one is not produced yet."""
    ready = 0.0
    for p in op.passes:
        source = upstream(schedule, rank, p)
        if source is None:
            continue
        end = done.get((source, p.phase, p.micro, p.direction))
        if end is None:
            return None
        ready = max(ready, end)
    return ready


def dependencies(schedule: Schedule, rank: int, op: Op) -> Iterator[tuple[int, str, int, int]]:
    """(rank, phase, micro, direction) of the passes on other ranks whose output `op` waits for."""
    for p in op.passes:
        source = upstream(schedule, rank, p)
        if source is not None:
            yield source, p.phase, p.micro, p.direction


def passes(ops: Iterable[Op]) -> list[Pass]:
    return [p for op in ops for p in op.passes]
