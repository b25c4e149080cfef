"""The stream-K fix-up kernel run by Triton's interpreter on CPU (`TRITON_INTERPRET=1`, its own
process; see test_fp8_stream_k.py). The GEMM's side is emulated in torch from the plan: each CTA's
fragments of the stream-K tiles go to their workspace slots, whole tiles straight to C; the fix-up
must then complete C to the full product. Prints the largest error and how many tiles were split."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from fireflyer.kernels.fp8_stream_k import contributors, fragments, plan_stream_k
from fireflyer.kernels.fp8_stream_k_triton import fix_up

BM, BN, BK, GROUP_M = 16, 16, 8, 3


def tile_origin(t: int, num_m: int, num_n: int) -> tuple[int, int]:
    """The GEMM's grouped tile order (fp8_gluon_tiles.tile_at, dense layout)."""
    span = GROUP_M * num_n
    first_m = (t // span) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return (first_m + (t % span) % size_m) * BM, ((t % span) // size_m) * BN


def emulate(m: int, n: int, k: int, sms: int) -> tuple[float, int]:
    g = torch.Generator().manual_seed(m * 31 + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    num_m, num_n = -(-m // BM), -(-n // BN)
    plan = plan_stream_k(num_m * num_n, k // BK, sms)
    assert plan.sk_steps > 0, (m, n, k, sms)
    programs = plan.programs
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    a_pad = torch.zeros(num_m * BM, k)
    a_pad[:m] = a
    b_pad = torch.zeros(num_n * BN, k)
    b_pad[:n] = b
    for t in range(plan.dp_tiles):
        r, col = tile_origin(t, num_m, num_n)
        full = a_pad[r : r + BM] @ b_pad[col : col + BN].T
        c[r : r + BM, col : col + BN] = full[: m - r, : n - col].to(torch.bfloat16)
    workspace = torch.full((2 * programs, BM, BN), float("nan"))
    for program in range(programs):
        for frag in fragments(plan, program):
            r, col = tile_origin(plan.dp_tiles + frag.tile, num_m, num_n)
            ks = slice(frag.k_begin * BK, frag.k_end * BK)
            part = a_pad[r : r + BM, ks] @ b_pad[col : col + BN, ks].T
            if frag.slot is None:
                c[r : r + BM, col : col + BN] = part[: m - r, : n - col].to(torch.bfloat16)
            else:
                workspace[frag.slot] = part
    fix_up(plan, workspace, c, num_m, num_n, GROUP_M)
    ref = (a @ b.T).to(torch.bfloat16).float()
    error = ((c.float() - ref).abs() / (ref.abs() + 1)).max().item()
    split = sum(1 for tile in range(plan.sk_tiles) if contributors(plan, tile))
    return error, split


def main() -> None:
    # Ragged edges (rows and columns past a tile), runs shorter and longer than a tile, tiles split
    # over two and over many CTAs.
    worst, split = 0.0, 0
    for m, n, k, sms in [(20, 72, 256, 16), (30, 40, 96, 11), (16, 16, 256, 4), (40, 16, 200, 9)]:
        error, count = emulate(m, n, k, sms)
        # NaN marks an element that nothing wrote: as bad as any error.
        worst, split = max(worst, error if error == error else float("inf")), split + count
    print(f"max_error={worst:.6f} split_tiles={split}")


if __name__ == "__main__":
    main()
