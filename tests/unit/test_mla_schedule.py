"""Length-balanced MLA decode work (mla_schedule): every KV tile attended once, programs of equal
work whatever the lengths, partial slots that never collide; and the Triton kernel over such a
schedule in Triton's interpreter against the torch reference."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import mla  # noqa: E402
from fireflyer.kernels.mla_schedule import balanced_schedule, runs_of, worth_balancing  # noqa: E402
from fireflyer.workloads.serve.batch_builder import build_step  # noqa: E402
from fireflyer.workloads.serve.types import SamplingParams, ScheduledChunk, Sequence  # noqa: E402
from tests.unit.interpreted import run_interpreted  # noqa: E402

TILE = mla.PAGE


def _tiles(lengths: list[int]) -> list[int]:
    return [math.ceil(n / TILE) for n in lengths]


CASES = [
    ([4096, 1, 0, 150, 64, 65], 5),
    ([0, 0, 0], 4),  # nothing to attend
    ([1], 1),
    ([70, 0, 300, 1, 0], 16),  # more runs than tiles: the last runs are empty
    ([32768] + [512] * 127, 132),  # one long sequence in a decode batch
    ([129, 7000, 64, 63, 20000, 1], 3),
]


@pytest.mark.parametrize(("lengths", "parts"), CASES)
def test_every_tile_is_attended_once_into_its_sequences_own_slots(lengths: list[int], parts: int) -> None:
    lens = torch.tensor(lengths, dtype=torch.int32)
    schedule = balanced_schedule(lens, parts, TILE)
    assert schedule.parts == parts
    covered: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(lengths))}
    slots_used: list[int] = []
    for pieces in runs_of(schedule, lens):
        for seq, begin, end, slot in pieces:
            covered[seq].append((begin, end))
            slots_used.append(slot)
            first, count = int(schedule.split_offset[seq]), int(schedule.split_count[seq])
            assert first <= slot < first + count, (seq, slot)
    for seq, tiles in enumerate(_tiles(lengths)):
        ranges = sorted(covered[seq])
        # Consecutive runs, no gap, no overlap, the whole sequence.
        assert [t for r in ranges for t in range(*r)] == list(range(tiles)), (seq, ranges)
        assert int(schedule.split_count[seq]) == len(ranges)
    assert len(slots_used) == len(set(slots_used)), "two pieces wrote one partial slot"
    assert sum(schedule.split_count.tolist()) <= len(lengths) + parts - 1
    assert max(slots_used, default=-1) < schedule.slots


@pytest.mark.parametrize(("lengths", "parts"), CASES)
def test_no_program_attends_more_than_its_equal_share(lengths: list[int], parts: int) -> None:
    lens = torch.tensor(lengths, dtype=torch.int32)
    share = max(1, math.ceil(sum(_tiles(lengths)) / parts))
    for pieces in runs_of(balanced_schedule(lens, parts, TILE), lens):
        assert sum(end - begin for _, begin, end, _ in pieces) <= share


def test_a_long_sequence_no_longer_sets_the_decode_steps_time() -> None:
    # One 32K-token sequence among 127 of 512 on an H200's 132 SMs, 64-row query tiles (h_q 64):
    # uniform splits give every sequence the same count, so the long one's programs each walk a
    # long stretch while the short ones' are done.
    lengths, sms = [32768] + [512] * 127, 132
    uniform_splits = mla.num_splits(len(lengths), 1, max(_tiles(lengths)), sms, waves=1.0)
    uniform_longest = math.ceil(max(_tiles(lengths)) / uniform_splits)
    balanced_longest = math.ceil(sum(_tiles(lengths)) / sms)
    lens = torch.tensor(lengths, dtype=torch.int32)
    runs = runs_of(balanced_schedule(lens, sms, TILE), lens)
    longest = max(sum(end - begin for _, begin, end, _ in pieces) for pieces in runs)
    assert longest == balanced_longest
    assert longest * 10 < uniform_longest, (longest, uniform_longest)


def test_a_step_balances_unequal_lengths_only() -> None:
    assert worth_balancing([32768] + [1024] * 127)
    assert worth_balancing([4096, 8192])  # longest 1.33 x the mean
    assert not worth_balancing([4096] * 128)
    assert not worth_balancing([4000, 4096, 4200])
    assert not worth_balancing([70000])  # one sequence: its uniform splits are balanced already


def _decode_chunk(length: int, first_block: int) -> ScheduledChunk:
    """A sequence of `length` tokens whose last one is decoded this step."""
    seq = Sequence(prompt_ids=list(range(3, 3 + length)), params=SamplingParams())
    seq.block_table = list(range(first_block, first_block + math.ceil(length / TILE)))
    return ScheduledChunk(seq, length - 1, 1)


def test_a_decode_step_of_unequal_lengths_shares_one_schedule_across_layers() -> None:
    cpu = torch.device("cpu")
    step = build_step([_decode_chunk(2000, 0), _decode_chunk(30, 40), _decode_chunk(90, 50)], cpu)
    schedules = step.meta.decode_schedules
    assert schedules is not None and schedules.cache_seqlens is step.meta.decode_seqlens
    first = schedules.get(5, TILE)
    assert schedules.get(5, TILE) is first  # the next layer reuses it
    want = balanced_schedule(torch.tensor([2000, 30, 90], dtype=torch.int32), 5, TILE)
    assert torch.equal(first.runs, want.runs) and torch.equal(first.split_offset, want.split_offset)
    assert schedules.get(5, 32).tile_tokens == 32  # another kernel's tiles get their own
    equal = build_step([_decode_chunk(500, 0), _decode_chunk(500, 10)], cpu)
    assert equal.meta.decode_schedules is None
    # An engine started with --no-balance-decode builds its steps without schedules.
    uniform = build_step([_decode_chunk(2000, 0), _decode_chunk(30, 40)], cpu, balance=False)
    assert uniform.meta.decode_schedules is None


def test_serve_balances_decode_unless_told_not_to() -> None:
    import argparse

    from fireflyer.workloads.serve import server

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    assert parser.parse_args(["--model", "m"]).balance_decode is True
    assert parser.parse_args(["--model", "m", "--no-balance-decode"]).balance_decode is False


def test_bad_arguments_are_refused() -> None:
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="positive"):
        balanced_schedule(lens, 0, TILE)
    with pytest.raises(ValueError, match="one length per sequence"):
        balanced_schedule(torch.zeros(0, dtype=torch.int32), 2, TILE)
    pytest.importorskip("triton")
    from fireflyer.kernels.mla_triton import mla_decode_triton

    q = torch.zeros(1, 1, 16, mla.D_QK)
    cache = torch.zeros(1, mla.PAGE, 1, mla.D_QK)
    table = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="64-token tiles of these 1 sequences"):
        mla_decode_triton(q, cache, table, lens, 1.0, schedule=balanced_schedule(lens, 2, 32))


def test_triton_kernels_in_the_interpreter_equal_the_references_uniform_balanced_and_schedule() -> None:
    pytest.importorskip("triton")
    errors = run_interpreted("tests.unit.mla_interpreted")
    # The one-launch schedule (what a CUDA device runs) equals the tensor-operation one.
    assert errors.pop("schedule_cases") == 76 and errors.pop("schedule_mismatches") == 0
    cases = ("uniform", "runs3", "runs7")
    assert set(errors) == {f"{case}_{what}" for case in cases for what in ("out", "lse")}
    # fp32 throughout: only the summation order differs.
    assert max(errors.values()) <= 1e-4, errors
