"""The BF16-layout MLA decode kernel run by Triton's interpreter on CPU (`TRITON_INTERPRET=1`,
set before triton is imported — so this runs as its own process; see test_mla_schedule.py): the
uniform split-KV path and the length-balanced runs (mla_schedule) against the torch reference,
and the one-launch schedule against the tensor-operation one. Prints the largest differences of
each case and the count of schedules that differ."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fireflyer.kernels import mla
from fireflyer.kernels.mla_schedule import balanced_schedule, balanced_schedule_torch
from fireflyer.kernels.mla_schedule_triton import balanced_schedule_triton
from fireflyer.kernels.mla_triton import mla_decode_triton
from tests.unit.test_mla_fp8 import paged_entries

SCALE = 192**-0.5
# A long sequence among short ones, an empty one, one token, a page's tail: runs that end,
# cover and start sequences, runs with no tiles (7 runs for 9 tiles), a sequence in 4 runs.
LENGTHS = [300, 1, 0, 70, 130, 5]


def _case(name: str, s_q: int, **kwargs: object) -> None:
    q, cache, table, lens = paged_entries(len(LENGTHS), s_q, 16, LENGTHS, seed=s_q)
    # The interpreter's tl.dot misreads BF16 operands: fp32 queries and cache (the GPU tests run
    # BF16); the tiling, masks, slots and the combine are what is checked here.
    q = q.float()
    out, lse = mla_decode_triton(q, cache, table, lens, SCALE, config={"BLOCK_H": 32}, **kwargs)  # type: ignore[arg-type]
    ref_out, ref_lse = mla.mla_decode_reference(q, cache, table, lens, SCALE)
    finite = ref_lse.isfinite()
    assert torch.equal(finite, lse.isfinite()), f"{name}: the kernel and the reference disagree on empty rows"
    out_err = (out.float() - ref_out.float()).abs().max().item()
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item()
    print(f"{name}_out={out_err:.6f} {name}_lse={lse_err:.6f}")


def _schedule_cases() -> list[tuple[list[int], int]]:
    """Edge cases (empty sequences and batches, one tile, more runs than tiles, one long sequence)
    and seeded random batches of up to 200 sequences."""
    g = torch.Generator().manual_seed(0)
    cases = [
        ([4096, 1, 0, 150, 64, 65], 5),
        ([0, 0, 0], 4),
        ([0], 3),
        ([1], 1),
        ([5, 5], 1),
        ([70, 0, 300, 1, 0], 16),
        ([32768] + [512] * 127, 132),
        ([129, 7000, 64, 63, 20000, 1], 3),
    ]
    for _ in range(30):
        b = int(torch.randint(1, 200, (1,), generator=g))
        edge = torch.tensor([0, 1, 63, 64, 65])[torch.randint(0, 5, (b,), generator=g)]
        spread = torch.randint(0, 40000, (b,), generator=g)
        lengths = torch.where(torch.rand(b, generator=g) < 0.3, edge, spread)
        cases.append((lengths.tolist(), int(torch.randint(1, 300, (1,), generator=g))))
    return cases


def _schedule_mismatches() -> None:
    """The one-launch Triton schedule against the tensor-operation one, field by field."""
    cases = mismatches = 0
    for lengths, parts in _schedule_cases():
        for tile in (mla.PAGE, 32):
            lens = torch.tensor(lengths, dtype=torch.int32)
            want = balanced_schedule_torch(lens, parts, tile)
            got = balanced_schedule_triton(lens, parts, tile)
            fields = ("runs", "split_offset", "split_count", "first_run")
            cases += 1
            mismatches += any(not torch.equal(getattr(want, f), getattr(got, f)) for f in fields)
    print(f"schedule_cases={cases} schedule_mismatches={mismatches}")


def main() -> None:
    _schedule_mismatches()
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    _case("uniform", 2, splits=3)
    _case("runs3", 1, schedule=balanced_schedule(lens, 3, mla.PAGE))
    _case("runs7", 2, schedule=balanced_schedule(lens, 7, mla.PAGE))


if __name__ == "__main__":
    main()
