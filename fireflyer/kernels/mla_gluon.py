"""Warp-specialised paged MLA decode for Hopper, written in Gluon (Triton's lower-level dialect).

Each program attends one 64-row tile of queries (s_q·h_q rows of one sequence) to one split of
that sequence's KV pages. A one-warp loader partition walks the block table and issues TMA loads
of each KV tile into a ring of shared-memory stages (ready/empty mbarriers), so HBM traffic runs
ahead of the math; the math partition is two warpgroups (8 warps) that split every product along
N: S = Q·Kᵀ with wgmma (Q resident in shared memory, loaded once), the online softmax in fp32
with exp2, and O += P·V where V is the first 512 columns of the same tile (no second load), each
warpgroup holding 256 of O's 512 fp32 columns. Split-KV partials merge through the Triton
`combine_splits`. Same contract as `mla_decode_triton`; BF16 cache only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fireflyer.kernels.gluon_release import gluon_release_supported, missing_gluon_reason
from fireflyer.kernels.mla import D_QK, D_ROPE, D_V, PAGE, check_shapes
from fireflyer.kernels.mla_schedule import MlaSchedule

try:  # Gluon's Hopper API as shipped in Triton 3.6; absent or different elsewhere.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    # The Hopper API that mla_gluon_parts uses: its absence makes HAVE_GLUON false here.
    from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: F401
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = gluon_release_supported(triton.__version__)
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BLOCK_M = 64  # query rows per program: one wgmma M tile
# BLOCK_N: KV tokens per pipeline stage (a divisor of the 64-token page); STAGES: ring depth.
# Shared memory: Q 72 KiB + STAGES × BLOCK_N × 1152 B (≤ 227 KiB on an H200).
# SEESAW: the math warpgroups take turns leading KV tiles and each owns half of O
# (`mla_gluon_seesaw`) instead of splitting every tile between them. With a loader warp (SEESAW 1)
# it needs 32-token tiles: with 64 there is room for two stages only and the turns wait for their
# loads. SEESAW 2 (`mla_gluon_seesaw64`) runs 64-token tiles without a loader warp: each
# warpgroup refills the parts of the two stages it has finished reading.
CONFIGS: dict[str, dict[str, int]] = {
    "n64s2": {"BLOCK_N": 64, "STAGES": 2},
    "n32s3": {"BLOCK_N": 32, "STAGES": 3},
    "n32s4": {"BLOCK_N": 32, "STAGES": 4},
    "w32s4": {"BLOCK_N": 32, "STAGES": 4, "SEESAW": 1},
    "w64s2": {"BLOCK_N": 64, "STAGES": 2, "SEESAW": 2},
}
CONFIG = CONFIGS["n64s2"]
LOADER_REGS = 40


def one_wave_splits(programs: int, num_sms: int, max_tiles: int) -> int:
    """Splits of each sequence's KV so that `programs` (sequences × M tiles) × splits fills the
    GPU once without a second, partial wave: this kernel runs one program per SM (its shared
    memory), and on an H200 with b = 128 one unsplit wave beat 2–8 splits (3.9 vs ≤ 3.6 TB/s at
    s_k 16384), the partials' fp32 round trip costing more than the idle SMs. Never more splits
    than KV tiles, nor than 64."""
    return max(1, min(num_sms // max(1, programs), max_tiles, 64))


def supported(q: torch.Tensor, kv_cache: torch.Tensor) -> str | None:
    """Why this kernel cannot run these inputs, or None when it can."""
    if not HAVE_GLUON:
        return missing_gluon_reason()
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs a Hopper (sm_90) GPU"
    if kv_cache.dtype != torch.bfloat16 or q.dtype != torch.bfloat16:
        return "needs BF16 queries and a BF16 cache"
    if not kv_cache.is_contiguous():
        return "needs a contiguous cache"
    return None


if HAVE_GLUON:
    from fireflyer.kernels.mla_gluon_parts import (
        LOADER_REGS_C,
        _attend,
        _kv_ring,
        _load_kv,
        _release_ring,
        _split_tiles,
    )

    @gluon.jit
    def _mla_gluon_partial(
        Q,
        nope_desc,
        rope_desc,
        BT,
        SEQ,
        OP,
        LP,
        scale_log2,
        stride_qb,
        stride_btb,
        stride_opb,
        stride_ops,
        stride_lpb,
        stride_lps,
        S_Q: gl.constexpr,
        H_Q: gl.constexpr,
        NUM_SPLITS: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        pid_m = gl.program_id(0)
        pid_s = gl.program_id(1)
        pid_b = gl.program_id(2)
        seqlen, first, n_tiles = _split_tiles(SEQ, pid_b, pid_s, NUM_SPLITS, BLOCK_N)

        q_nope, q_rope, kv_nope, kv_rope, ready, empty = _kv_ring(nope_desc, rope_desc, BLOCK_N, STAGES)
        gl.warp_specialize(
            [
                (
                    _attend,
                    (
                        Q,
                        OP + pid_b * stride_opb + pid_s * stride_ops,
                        LP + pid_b * stride_lpb + pid_s * stride_lps,
                        q_nope,
                        q_rope,
                        kv_nope,
                        kv_rope,
                        ready,
                        empty,
                        pid_m,
                        pid_b,
                        seqlen,
                        first,
                        n_tiles,
                        0,
                        scale_log2,
                        stride_qb,
                        S_Q,
                        H_Q,
                        BLOCK_N,
                        STAGES,
                        NUM_SPLITS == 1,
                    ),
                ),
                (
                    _load_kv,
                    (
                        nope_desc,
                        rope_desc,
                        kv_nope,
                        kv_rope,
                        ready,
                        empty,
                        BT,
                        pid_b,
                        stride_btb,
                        first,
                        n_tiles,
                        0,
                        BLOCK_N,
                        STAGES,
                    ),
                ),
            ],
            [1],
            [LOADER_REGS_C],
        )
        _release_ring(ready, empty, STAGES)


@functools.cache
def kv_layouts(block_n: int) -> tuple[Any, Any]:
    """Shared layouts of one stage's latent [block_n, 512] and rope [block_n, 64] tiles (128-byte
    swizzle; the latent box is split into 64-column TMA messages by the compiler). Cached: building
    a layout costs tens of microseconds."""
    nope = gl.NVMMASharedLayout.get_default_for([block_n, D_V], gl.bfloat16)
    rope = gl.NVMMASharedLayout.get_default_for([block_n, D_ROPE], gl.bfloat16)
    return nope, rope


@functools.cache
def half_layout() -> Any:
    """Shared layout of half a 64-token latent tile, [64, 256] (the 64-token seesaw's loads)."""
    return gl.NVMMASharedLayout.get_default_for([PAGE, D_V // 2], gl.bfloat16)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def balanced_parts(q: torch.Tensor) -> int:
    """Runs for a balanced schedule: one program per SM (query tiles × runs), as the uniform
    splits' single wave."""
    m_tiles = -(-q.shape[1] * q.shape[2] // BLOCK_M)
    return max(1, _sm_count(_device_index(q)) // m_tiles)


def _device_index(q: torch.Tensor) -> int:
    return q.device.index if q.device.index is not None else torch.cuda.current_device()


# Compiled kernels, launched directly on later calls (the JIT's argument binding costs more than a
# short decode step), keyed by what the JIT specialised them on: the constexprs, the device, each
# pointer's 16-byte alignment and each integer's divisibility by 16 and equality to 1.
_COMPILED: dict[tuple[Any, ...], Any] = {}


def _launch(
    kernel: Any, device: int, grid: tuple[int, ...], args: tuple[Any, ...], num_warps: int, constexprs: int
) -> None:
    """Launch through the JIT the first time, then the compiled kernel directly; the last
    `constexprs` arguments are the kernel's constexprs."""
    specialised = tuple(
        a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1)
        for a in args
        if isinstance(a, (torch.Tensor, int))
    )
    key = (kernel, device, specialised, *args[-constexprs:])
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, num_warps=num_warps)
    else:
        # A compiled kernel's launcher reads all three grid dimensions.
        compiled[(*grid, 1, 1)[:3]](*args)


def mla_decode_gluon(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    splits: int | None = None,
    config: dict[str, int] | None = None,
    schedule: MlaSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode (mla.py's contract) on a Hopper GPU; ValueError for inputs it does not
    support, so that a dispatcher can fall back to the Triton kernel. With one split per sequence
    the kernel writes the final output and lse itself; with more, the Triton combine merges them.
    `schedule` (mla_schedule.balanced_schedule over the config's BLOCK_N-token tiles): runs of
    equal length in place of `splits` uniform splits per sequence (not with the seesaw)."""
    check_shapes(q, kv_cache, block_table, cache_seqlens)
    reason = supported(q, kv_cache)
    if reason is not None:
        raise ValueError(f"mla_decode_gluon: {reason}")
    from fireflyer.kernels.mla_triton import LOG2E, combine_splits

    cfg = {**CONFIG, **(config or {})}
    block_n, stages, seesaw = cfg["BLOCK_N"], cfg["STAGES"], bool(cfg.get("SEESAW", 0))
    if PAGE % block_n or block_n < 16:
        raise ValueError(f"mla_decode_gluon: BLOCK_N must divide {PAGE} and be ≥ 16, got {block_n}")
    b, s_q, h_q, _ = q.shape
    q = q.contiguous()
    block_table = block_table.contiguous()
    rows = s_q * h_q
    m_tiles = -(-rows // BLOCK_M)
    device = _device_index(q)
    flat = kv_cache.view(-1, D_QK)
    nope_layout, rope_layout = kv_layouts(block_n)
    nope_desc = TensorDescriptor(flat, [flat.shape[0], D_V], [D_QK, 1], [block_n, D_V], nope_layout)
    rope = flat[:, D_V:]
    rope_desc = TensorDescriptor(rope, [rope.shape[0], D_ROPE], [D_QK, 1], [block_n, D_ROPE], rope_layout)
    if schedule is not None:
        if seesaw or schedule.tile_tokens != block_n or schedule.split_count.shape[0] != b:
            raise ValueError(
                f"mla_decode_gluon: the schedule must be over {block_n}-token tiles of these {b} "
                "sequences, with a config other than the seesaw"
            )
        out = torch.empty(schedule.slots, rows, D_V, dtype=torch.float32, device=q.device)
        lse = torch.empty(schedule.slots, rows, dtype=torch.float32, device=q.device)
        from fireflyer.kernels.mla_gluon_runs import mla_runs_kernel

        runs_args = (
            q, nope_desc, rope_desc, block_table, cache_seqlens, schedule.runs, schedule.split_offset,
            schedule.first_run, out, lse, softmax_scale * LOG2E, q.stride(0), block_table.stride(0),
            s_q, h_q, block_n, stages,
        )  # fmt: skip
        _launch(mla_runs_kernel, device, (m_tiles, schedule.parts), runs_args, num_warps=8, constexprs=4)
        return combine_splits(out, lse, s_q, h_q, q.dtype, schedule)
    if splits is None:
        splits = one_wave_splits(b * m_tiles, _sm_count(device), block_table.shape[1] * (PAGE // block_n))
    if splits == 1:
        out = torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
        out_strides = (out.stride(0), 0)
        lse_strides = (lse.stride(0), 0)
    else:
        out = torch.empty(b, splits, rows, D_V, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, splits, rows, dtype=torch.float32, device=q.device)
        out_strides = (out.stride(0), out.stride(1))
        lse_strides = (lse.stride(0), lse.stride(1))
    args = (
        q,
        nope_desc,
        rope_desc,
        block_table,
        cache_seqlens,
        out,
        lse,
        softmax_scale * LOG2E,
        q.stride(0),
        block_table.stride(0),
        *out_strides,
        *lse_strides,
        s_q,
        h_q,
        splits,
        block_n,
        stages,
    )
    if cfg.get("SEESAW") == 2:
        from fireflyer.kernels.mla_gluon_seesaw64 import mla_seesaw64_kernel

        half_box = [block_n, D_V // 2]
        half_desc = TensorDescriptor(flat, [flat.shape[0], D_V], [D_QK, 1], half_box, half_layout())
        args = (args[0], half_desc, *args[2:])
        _launch(mla_seesaw64_kernel, device, (m_tiles, splits, b), args, num_warps=4, constexprs=5)
    elif seesaw:
        from fireflyer.kernels.mla_gluon_seesaw import mla_seesaw_kernel

        _launch(mla_seesaw_kernel, device, (m_tiles, splits, b), args, num_warps=4, constexprs=5)
    else:
        _launch(_mla_gluon_partial, device, (m_tiles, splits, b), args, num_warps=8, constexprs=5)
    if splits == 1:
        return out, lse
    return combine_splits(out, lse, s_q, h_q, q.dtype)
