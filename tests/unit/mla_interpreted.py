"""The BF16-layout MLA decode kernel run by Triton's interpreter on CPU (`TRITON_INTERPRET=1`,
set before triton is imported — so this runs as its own process; see test_mla_schedule.py): the
uniform split-KV path and the length-balanced runs (mla_schedule) against the torch reference.
Prints the largest differences of each case."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fireflyer.kernels import mla
from fireflyer.kernels.mla_schedule import balanced_schedule
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


def main() -> None:
    lens = torch.tensor(LENGTHS, dtype=torch.int32)
    _case("uniform", 2, splits=3)
    _case("runs3", 1, schedule=balanced_schedule(lens, 3, mla.PAGE))
    _case("runs7", 2, schedule=balanced_schedule(lens, 7, mla.PAGE))


if __name__ == "__main__":
    main()
