"""Pipeline schedules (pure): every pass runs once per stage in dependency order, and the simulated
bubbles follow the formulas — 1F1B's (P−1)(F+B), DualPipe's from the DeepSeek-V3 report with W
split out, and the one our unsplit DualPipe achieves."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from fireflyer.workloads.train import schedules
from fireflyer.workloads.train.schedules import (
    Costs,
    Op,
    Pass,
    Schedule,
    ScheduleError,
    dualpipe,
    one_f_one_b,
    simulate,
)

SIZES = [(2, 4), (4, 8), (4, 12), (6, 12), (8, 16), (8, 20)]


def all_schedules() -> list[Schedule]:
    out = []
    for stages, micro in SIZES:
        out += [
            one_f_one_b(stages, micro),
            dualpipe(stages, micro),
            dualpipe(stages, micro, split_weights=True),
        ]
    return [*out, one_f_one_b(4, 2), one_f_one_b(1, 3), one_f_one_b(3, 5)]


def stage_passes(schedule: Schedule) -> dict[tuple[int, int], list[Pass]]:
    """(stage, direction) → the passes run for it, in order."""
    out: dict[tuple[int, int], list[Pass]] = {}
    for rank, ops in enumerate(schedule.ranks):
        for p in schedules.passes(ops):
            out.setdefault((schedule.stage(rank, p.direction), p.direction), []).append(p)
    return out


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: f"{s.name}-{s.stages}x{s.micro_batches}")
def test_every_micro_batch_runs_forward_and_backward_once_per_stage(schedule: Schedule) -> None:
    per_stage = stage_passes(schedule)
    assert sorted(per_stage) == [(s, d) for s in range(schedule.stages) for d in range(schedule.directions)]
    micro = range(schedule.per_direction)
    for (_, direction), run in per_stage.items():
        count = Counter((p.phase, p.micro) for p in run)
        assert count == Counter(
            [("F", m) for m in micro]
            + [("B", m) for m in micro]
            + [("W", p.micro) for p in run if p.kind == "W"]
        )
        for m in micro:
            kinds = [p.kind for p in run if p.micro == m]
            assert kinds in (["F", "B"], ["F", "I", "W"])  # forward, then backward, then its W
        assert all(p.direction == direction for p in run)
    # Both directions together carry the step's M micro-batches, each exactly once per stage.
    for stage in range(schedule.stages):
        forwards = [
            schedule.global_micro(p)
            for d in range(schedule.directions)
            for p in per_stage[(stage, d)]
            if p.kind == "F"
        ]
        assert sorted(forwards) == list(range(schedule.micro_batches))


@pytest.mark.parametrize("schedule", all_schedules(), ids=lambda s: f"{s.name}-{s.stages}x{s.micro_batches}")
def test_the_simulation_respects_every_dependency(schedule: Schedule) -> None:
    sim = simulate(schedule, Costs(forward=1.0, backward=2.0, weight=0.5 if "I" in str(schedule) else 0.0))
    ends: dict[tuple[int, str, int, int], float] = {}
    for rank, slots in enumerate(sim.slots):
        assert [s.op for s in slots] == list(schedule.ranks[rank])  # run in the listed order
        assert all(a.end <= b.start for a, b in itertools.pairwise(slots))  # one at a time
        for slot in slots:
            for p in slot.op.passes:
                ends[(rank, p.phase, p.micro, p.direction)] = slot.end
    for rank, slots in enumerate(sim.slots):
        for slot in slots:
            for p in slot.op.passes:
                stage = schedule.stage(rank, p.direction)
                last = schedule.stages - 1
                if p.kind == "F" and stage > 0:  # the activation comes from the previous stage
                    source = schedule.rank_of(stage - 1, p.direction)
                    assert ends[(source, "F", p.micro, p.direction)] <= slot.start
                if p.phase == "B":
                    assert ends[(rank, "F", p.micro, p.direction)] <= slot.start
                    if stage < last:  # the gradient comes from the next stage
                        source = schedule.rank_of(stage + 1, p.direction)
                        assert ends[(source, "B", p.micro, p.direction)] <= slot.start
                if p.kind == "W":
                    assert ends[(rank, "B", p.micro, p.direction)] < slot.end


@pytest.mark.parametrize("stages", [2, 3, 4, 8])
@pytest.mark.parametrize("costs", [Costs(1, 2), Costs(1, 1), Costs(2, 3), Costs(0.5, 2)])
def test_1f1b_idles_p_minus_1_times_f_plus_b(stages: int, costs: Costs) -> None:
    for micro in (stages, 2 * stages, 2 * stages + 3):
        sim = simulate(one_f_one_b(stages, micro), costs)
        for rank in range(stages):
            assert sim.idle(rank) == pytest.approx((stages - 1) * (costs.forward + costs.backward))
        assert sim.makespan == pytest.approx((micro + stages - 1) * (costs.forward + costs.backward))


@pytest.mark.parametrize("stages", [2, 4, 6, 8, 10])
@pytest.mark.parametrize(("forward", "weight"), [(1.0, 1.0), (2.0, 1.0), (1.0, 0.5)])
def test_dualpipe_with_w_split_matches_the_reports_formula(
    stages: int, forward: float, weight: float
) -> None:
    backward = forward + weight  # the report's figures: F = B − W
    for overlapped in (backward, backward + forward / 2, backward + forward):
        costs = Costs(forward, backward, weight, overlapped)
        for micro in (2 * stages, 2 * stages + 2, 4 * stages):
            sim = simulate(dualpipe(stages, micro, split_weights=True), costs)
            expected = (stages / 2 - 1) * (overlapped + backward - 3 * weight)
            assert sim.bubble == pytest.approx(expected), (micro, costs)


@pytest.mark.parametrize("stages", [2, 4, 6, 8, 10])
@pytest.mark.parametrize("forward", [1.0, 2.5])
def test_dualpipe_without_w_split_idles_as_documented(stages: int, forward: float) -> None:
    backward = 2 * forward
    for overlapped in (backward, backward + forward / 2, backward + forward):
        costs = Costs(forward, backward, 0.0, overlapped)
        for micro in (2 * stages, 2 * stages + 2, 4 * stages):
            sim = simulate(dualpipe(stages, micro), costs)
            expected = max(0.0, (stages / 2 - 1) * (overlapped + backward) - forward)
            assert sim.bubble == pytest.approx(expected), (micro, costs)


@pytest.mark.parametrize("stages", [4, 8])
@pytest.mark.parametrize(
    "costs",
    [Costs(1, 2), Costs(1, 2, overlapped=2.5), Costs(1, 1), Costs(1, 3), Costs(2, 3, overlapped=4)],
)
def test_dualpipe_bubbles_less_than_1f1b(stages: int, costs: Costs) -> None:
    micro = 2 * stages  # two micro-batches per stage
    one = simulate(one_f_one_b(stages, micro), costs)
    dual = simulate(dualpipe(stages, micro), costs)
    assert dual.bubble < one.bubble
    assert dual.makespan < one.makespan
    split = Costs(costs.forward, costs.backward, costs.backward / 3, costs.overlapped)
    assert simulate(dualpipe(stages, micro, split_weights=True), split).bubble <= dual.bubble


def test_dualpipe_shape_on_four_ranks() -> None:
    """The phases as listed: the upper ranks start with the near direction, the two middle ranks
    run their first near F and far B apart, and every rank ends on backwards."""
    s = dualpipe(4, 8)
    text = [" ".join(map(str, ops)) for ops in s.ranks]
    assert text[0] == "F0 F1 F2 F0r B0r F1r F3&B1r F2r&B0 B2r F3r&B1 B3r B2 B3"
    assert text[1] == "F0 F0r F1 F1r F2 B0r F2r&B0 F3&B1r F3r&B1 B2r B2 B3r B3"
    for rank in range(4):  # rank P−1−r runs rank r's list with the directions swapped
        flipped = [
            Op(tuple(Pass(p.kind, p.micro, 1 - p.direction) for p in op.passes)) for op in s.ranks[rank]
        ]
        assert tuple(flipped) == s.ranks[3 - rank]
    assert s.chunks(0) == (0, 3) and s.chunks(2) == (2, 1)
    overlapped = [op for ops in s.ranks for op in ops if op.overlapped]
    assert all(sorted(p.phase for p in op.passes) == ["B", "F"] for op in overlapped)
    assert all(ops[-1].passes[0].phase == "B" for ops in s.ranks)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: dualpipe(3, 6), "even number of pipeline stages"),
        (lambda: dualpipe(4, 6), "micro-batches ≥ 8"),
        (lambda: dualpipe(4, 9), "even number of micro-batches"),
        (lambda: one_f_one_b(0, 4), "≥ 1 stage"),
        (lambda: schedules.build("gpipe", 2, 4), "unknown pipeline schedule"),
    ],
)
def test_impossible_sizes_are_refused(build: object, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        build()  # type: ignore[operator]


def test_broken_schedules_are_caught() -> None:
    good = one_f_one_b(2, 2)

    def with_rank1(ops: list[Op]) -> Schedule:
        return Schedule("broken", 2, 2, 1, (good.ranks[0], tuple(ops)))

    f = [Op((Pass("F", m),)) for m in range(2)]
    b = [Op((Pass("B", m),)) for m in range(2)]
    with pytest.raises(ScheduleError, match="incomplete"):
        simulate(with_rank1([f[0], b[0], f[1]]))
    with pytest.raises(ScheduleError, match="runs twice"):
        simulate(with_rank1([f[0], b[0], f[1], b[1], b[1]]))
    with pytest.raises(ScheduleError, match="out of order"):
        simulate(with_rank1([f[1], b[1], f[0], b[0]]))
    with pytest.raises(ScheduleError, match="before its forward"):
        simulate(with_rank1([b[0], f[0], f[1], b[1]]))
    # Rank 0 waits for rank 1's gradient of 0, which rank 1 computes only after the forward of 1,
    # which waits for rank 0's forward of 1, listed after its backward of 0: a cycle.
    simulate(Schedule("fine", 2, 2, 1, ((f[0], b[0], f[1], b[1]), (f[0], b[0], f[1], b[1]))))
    cycle = Schedule("cycle", 2, 2, 1, ((f[0], b[0], f[1], b[1]), (f[0], f[1], b[0], b[1])))
    with pytest.raises(ScheduleError, match="wait on each other"):
        simulate(cycle)
