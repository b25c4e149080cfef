"""The FP8-cache MLA decode kernel run by Triton's interpreter on CPU (`TRITON_INTERPRET=1`, set
before triton is imported — so this runs as its own process; see test_mla_fp8.py). Prints the
largest differences from the torch reference over the FP8 cache."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fireflyer.kernels import mla_fp8
from fireflyer.kernels.mla_fp8_triton import mla_decode_fp8_triton
from tests.unit.test_mla_fp8 import fp8_paged

SCALE = 192**-0.5


def main() -> None:
    # Two query positions, a sequence shorter than a page and one across 3 pages, 2 splits:
    # the causal mask, a page's tail, the split combine and an empty split all take part.
    q, cache, table, lens = fp8_paged(b=3, s_q=2, h_q=16, seqlens=[70, 1, 150], seed=1)
    # The interpreter's tl.dot misreads BF16 operands; with an fp32 query the kernel dequantises
    # to fp32 and the FP8 loads, scales and layout are what is checked (the GPU test runs BF16).
    q = q.float()
    out, lse = mla_decode_fp8_triton(q, cache, table, lens, SCALE, splits=2, config={"BLOCK_H": 32})
    ref_out, ref_lse = mla_fp8.mla_decode_fp8_reference(q, cache, table, lens, SCALE)
    finite = ref_lse.isfinite()
    assert torch.equal(finite, lse.isfinite()), "the kernel and the reference disagree on empty rows"
    out_err = (out.float() - ref_out.float()).abs().max().item()
    lse_err = (lse[finite] - ref_lse[finite]).abs().max().item()
    print(f"out_err={out_err:.6f} lse_err={lse_err:.6f}")


if __name__ == "__main__":
    main()
