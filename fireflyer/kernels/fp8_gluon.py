"""Warp-specialised FP8 block-scaled GEMMs for Hopper (sm_90), written in Gluon.

Same contracts as the Triton kernels in `fp8_triton` (DeepSeek-V3's format: e4m3 activations with
fp32 scales per 1×128 group, e4m3 weights with fp32 scales per 128×128 block, BF16 out, NT layout).

One persistent kernel serves the dense, grouped-contiguous and grouped-masked layouts. Each CTA runs
three partitions over the same tile sequence:

- a producer warp issues TMA loads of the A [BM, 128] and B [BN, 128] tiles of every K step into a
  ring of `stages` shared-memory slots, guarded by ready / empty mbarriers;
- two consumer warpgroups each own half of the tile (split along M or along N). Per K step a
  consumer runs one FP8 wgmma (K = 128) into a fresh fp32 partial, waits for it, frees the slot and
  promotes: acc += partial · a_scale[row] · b_scale[n block, k block]. While one warpgroup promotes
  on the CUDA cores, the other's wgmma keeps the tensor cores busy;
- each consumer writes its BF16 half through shared memory with a TMA store (in the masked layout a
  sub-tile reaching past an expert's row count is stored through pointers, so the rows after it
  stay untouched).

Tiles are visited in grouped (L2-friendly) order, strided over one CTA per SM. Inputs outside what
the kernel supports raise `ValueError`, so a dispatcher can fall back to another backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from fireflyer.kernels.fp8_gluon_kernel import HAVE_GLUON
from fireflyer.kernels.gluon_release import missing_gluon_reason

if HAVE_GLUON:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from fireflyer.kernels.fp8_gluon_kernel import fp8_gemm_kernel

GROUP = 128
DENSE, CONTIGUOUS, MASKED = 0, 1, 2
CONSUMER_REGS = 232  # per consumer thread (setmaxnreg); the producer warp keeps 40


@dataclass(frozen=True)
class GluonConfig:
    """A tile shape. Each of the two consumer warpgroups computes a [sub_m, sub_n] sub-tile; `split`
    says whether they sit one above the other ("m": tile = 2·sub_m × sub_n) or side by side ("n":
    tile = sub_m × 2·sub_n, for few rows)."""

    sub_m: int = 64
    sub_n: int = 128
    split: str = "m"
    stages: int = 4
    group_m: int = 8
    k_per_stage: int = 1  # 128-wide K steps per ring slot (one ready wait and one release each)
    prefetch_scales: bool = False  # load each K step's scales two steps before its promotion
    late_release: bool = False  # free a ring slot after its promotions instead of before them

    @property
    def block_m(self) -> int:
        return self.sub_m * (2 if self.split == "m" else 1)

    @property
    def block_n(self) -> int:
        return self.sub_n * (2 if self.split == "n" else 1)

    @property
    def name(self) -> str:
        flags = ("/p" if self.prefetch_scales else "") + ("/l" if self.late_release else "")
        k = f"/k{self.k_per_stage}" if self.k_per_stage > 1 else ""
        return f"{self.block_m}x{self.block_n}/{self.split}/s{self.stages}{k}{flags}"


CONFIGS = {
    "128x128": GluonConfig(64, 128, "m", 4),
    "128x128s5": GluonConfig(64, 128, "m", 5),
    "128x128s6": GluonConfig(64, 128, "m", 6),
    "128x128s5g16": GluonConfig(64, 128, "m", 5, group_m=16),
    "128x128k2": GluonConfig(64, 128, "m", 3, k_per_stage=2),
    "128x128k2g16": GluonConfig(64, 128, "m", 3, group_m=16, k_per_stage=2),
    "128x128k2p": GluonConfig(64, 128, "m", 3, k_per_stage=2, prefetch_scales=True),
    "128x128k2pl": GluonConfig(64, 128, "m", 3, k_per_stage=2, prefetch_scales=True, late_release=True),
    "128x128k3": GluonConfig(64, 128, "m", 2, k_per_stage=3),
    "128x128k3g16": GluonConfig(64, 128, "m", 2, group_m=16, k_per_stage=3),
    "128x256": GluonConfig(64, 256, "m", 3),
    "64x256": GluonConfig(64, 128, "n", 4),
    "64x128": GluonConfig(64, 64, "n", 6),
    "64x128k2": GluonConfig(64, 64, "n", 3, k_per_stage=2),
    "64x128k2p": GluonConfig(64, 64, "n", 3, k_per_stage=2, prefetch_scales=True),
}


def default_config(m: int) -> GluonConfig:
    """Up to 128 rows: 64×128 tiles, so that more CTAs stream the weight; else 128×128. Both with
    two K steps per ring slot, which halves the warpgroups' barriers per K step, and with each
    step's scales loaded two steps ahead (the best of the sweeps on an H200, docs/benchmarks.md)."""
    return CONFIGS["64x128k2p"] if m <= 128 else CONFIGS["128x128k2pl"]


def shared_bytes(cfg: GluonConfig) -> int:
    """Shared memory the kernel allocates: the load ring plus one BF16 staging tile per consumer."""
    ring = cfg.stages * cfg.k_per_stage * (cfg.block_m + cfg.block_n) * GROUP
    return ring + 2 * cfg.sub_m * cfg.sub_n * 2 + 2 * cfg.stages * 8


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _require_gluon(device: torch.device) -> None:
    if not HAVE_GLUON:
        raise ValueError(missing_gluon_reason())
    if device.type != "cuda" or not _is_hopper(_index(device)):
        raise ValueError("the Gluon FP8 kernels need a Hopper (sm_90) GPU")


def _check_operands(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    fp8 = torch.float8_e4m3fn
    if a.dtype != fp8 or b.dtype != fp8:
        raise ValueError("a and b must be float8_e4m3fn")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("scales must be float32")
    k, n = a.shape[-1], b.shape[-2]
    if b.shape[-1] != k or k % GROUP or k == 0:
        raise ValueError(f"K must match and be a positive multiple of {GROUP}")
    if n % 8:
        raise ValueError(f"N ({n}) must be a multiple of 8 (16-byte output rows for TMA)")
    if a_scale.shape[-1] != k // GROUP or tuple(b_scale.shape[-2:]) != (-(-n // GROUP), k // GROUP):
        raise ValueError("scales must be 1×128 per activation row and 128×128 per weight block")


@functools.cache
def _smem_layout(block: tuple[int, int], fp8: bool) -> Any:
    # Building a layout costs tens of microseconds: more than a small GEMM takes on the GPU.
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.float8e4nv if fp8 else gl.bfloat16)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _descriptor(t: torch.Tensor, block: tuple[int, int]) -> Any:
    layout = _smem_layout(block, t.dtype == torch.float8_e4m3fn)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(block), layout)


# Compiled kernels by (config, mode, device): every argument is exempt from value and alignment
# specialisation, so one binary serves all shapes and later calls skip the JIT's argument binding.
_COMPILED: dict[tuple[GluonConfig, int, int], Any] = {}


def _launch(
    mode: int,
    a2: torch.Tensor,
    a_scale2: torch.Tensor,
    b2: torch.Tensor,
    b_scale: torch.Tensor,
    c2: torch.Tensor,
    idx: torch.Tensor | None,
    rows: int,
    n: int,
    m_max: int,
    groups: int,
    cfg: GluonConfig,
) -> None:
    """a2 [rows, K], b2 [G·N, K], c2 [rows, N], a_scale2 [rows, K/128], b_scale [G, ⌈N/128⌉, K/128]
    (G = 1 for dense). rows = M (dense, contiguous) or G·M_max (masked; per-group tiles)."""
    wide = cfg.sub_n == 256
    if cfg.sub_m != 64 or cfg.sub_n not in (64, 128, 256) or cfg.split not in ("m", "n"):
        raise ValueError(f"unsupported tile {cfg}")
    if wide and (cfg.split != "m" or cfg.k_per_stage != 1):
        raise ValueError("256-column sub-tiles run only split along M, one K step per stage")
    if cfg.k_per_stage not in (1, 2, 3):
        raise ValueError(f"k_per_stage must be 1, 2 or 3, got {cfg.k_per_stage}")
    if shared_bytes(cfg) > 227 * 1024:
        raise ValueError(f"{cfg.name} needs {shared_bytes(cfg)} bytes of shared memory")
    k = a2.shape[1]
    bm, bn = cfg.block_m, cfg.block_n
    num_m = -(-(m_max if mode == MASKED else rows) // bm)
    num_n = -(-n // bn)
    num_tiles = num_m * num_n * (groups if mode == MASKED else 1)
    device = _index(a2.device)
    grid = (max(1, min(num_tiles, _sm_count(device))),)
    b_scale3 = b_scale.reshape(-1, b_scale.shape[-2], b_scale.shape[-1])
    args = (
        _descriptor(a2, (bm, GROUP)),
        _descriptor(b2, (bn, GROUP)),
        _descriptor(c2, (cfg.sub_m, 128 if wide else cfg.sub_n)),
        c2,
        a_scale2,
        b_scale3,
        a_scale2 if idx is None else idx,
        rows,
        n,
        m_max,
        a_scale2.stride(0),
        b_scale3.stride(0),
        b_scale3.stride(1),
        k // GROUP,
        num_m,
        num_n,
        num_tiles,
        cfg.sub_m,
        cfg.sub_n,
        cfg.split == "n",
        cfg.group_m,
        cfg.stages,
        mode,
        cfg.k_per_stage,
        cfg.prefetch_scales,
        cfg.late_release,
        CONSUMER_REGS,
    )
    key = (cfg, mode, device)
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = fp8_gemm_kernel[grid](*args, num_warps=4)
    else:
        compiled[(grid[0], 1, 1)](*args)


def gemm_fp8_gluon(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    config: GluonConfig | None = None,
) -> torch.Tensor:
    """[M, K] × [N, K]ᵀ → [M, N] BF16."""
    _require_gluon(a.device)
    _check_operands(a, a_scale, b, b_scale)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError("dense GEMM takes a [M, K] and b [N, K]")
    m, n = a.shape[0], b.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m == 0:
        return c
    cfg = config or default_config(m)
    _launch(
        DENSE,
        a.contiguous(),
        a_scale.contiguous(),
        b.contiguous(),
        b_scale.contiguous(),
        c,
        None,
        m,
        n,
        m,
        1,
        cfg,
    )
    return c


def grouped_contiguous_gluon(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    m_indices: torch.Tensor,
    config: GluonConfig | None = None,
) -> torch.Tensor:
    """a [M, K] with rows grouped by expert (each group aligned to 128 rows; m_indices −1 for
    padding), b [G, N, K] → [M, N]; padding tiles come out as zeros."""
    _require_gluon(a.device)
    _check_operands(a, a_scale, b, b_scale)
    m, k = a.shape
    groups, n, _ = b.shape
    if m % GROUP:
        raise ValueError(f"contiguous layout needs M ({m}) aligned to {GROUP}")
    cfg = config or CONFIGS["128x128k2p"]
    if GROUP % cfg.block_m:
        raise ValueError("contiguous tiles must not straddle two experts (block_m must divide 128)")
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m == 0:
        return c
    idx = m_indices.to(torch.int32).contiguous()
    _launch(
        CONTIGUOUS,
        a.contiguous(),
        a_scale.contiguous(),
        b.contiguous().view(groups * n, k),
        b_scale.contiguous(),
        c,
        idx,
        m,
        n,
        m,
        groups,
        cfg,
    )
    return c


def grouped_masked_gluon(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    masked_m: torch.Tensor,
    out: torch.Tensor | None = None,
    config: GluonConfig | None = None,
) -> torch.Tensor:
    """a [G, M_max, K], b [G, N, K], masked_m [G] → [G, M_max, N]; rows at or past masked_m[g] are
    zeros (or, with `out`, left as they were)."""
    _require_gluon(a.device)
    _check_operands(a, a_scale, b, b_scale)
    groups, m_max, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.zeros(groups, m_max, n, dtype=torch.bfloat16, device=a.device)
    elif out.shape != (groups, m_max, n) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError("out must be a contiguous BF16 [G, M_max, N] tensor")
    if groups * m_max == 0:
        return out
    cfg = config or (CONFIGS["64x128"] if m_max <= 64 else CONFIGS["128x128"])
    _launch(
        MASKED,
        a.contiguous().view(groups * m_max, k),
        a_scale.contiguous().view(groups * m_max, -1),
        b.contiguous().view(groups * n, k),
        b_scale.contiguous(),
        out.view(groups * m_max, n),
        masked_m.to(torch.int32).contiguous(),
        groups * m_max,
        n,
        m_max,
        groups,
        cfg,
    )
    return out
