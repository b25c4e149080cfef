"""MLA decode through FlashMLA (`backend="official"`), with `fireflyer.kernels.mla`'s contract.

Two FlashMLA interfaces have DeepSeek-V3's dense paged decode on Hopper:

- releases before 1.0 (`flash-mla`): `get_mla_metadata(seqlens, s_q·h_q, h_k)` returns the
  split schedule, which the decode call takes;
- the SGLang fork (`sgl-flash-mla`, a prebuilt wheel): upstream's current kernels (SM100) plus,
  in a second extension, the ones upstream dropped in 1.0 (SM90, dense decode). The module has
  `has_legacy()`; the decode call takes an empty `FlashMLASchedMeta`, which it fills, and
  `use_legacy=True`.

FlashMLA gives a query with no visible key (a sequence shorter than s_q) an lse of +inf; our
contract is −inf (and zeros out, which FlashMLA also gives).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from fireflyer.kernels.mla import D_V


def new_schedule(flash_mla: ModuleType, cache_seqlens: torch.Tensor, rows: int) -> Any:
    """FlashMLA's split schedule for these lengths and s_q·h_q rows. A caller may pass one to
    every call over the same lengths (the layers of a decode step) instead of making it in each:
    at b = 128 it costs a launch of tens of microseconds. The fork's is filled by its first call."""
    if hasattr(flash_mla, "has_legacy"):
        return flash_mla.get_mla_metadata()[0]
    return flash_mla.get_mla_metadata(cache_seqlens, rows, 1)


def decode_with(
    flash_mla: ModuleType,
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    schedule: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode call through the `flash_mla` module given (either interface); `schedule`:
    one from `new_schedule` over the same lengths, else a fresh one is made."""
    if schedule is None:
        schedule = new_schedule(flash_mla, cache_seqlens, q.shape[1] * q.shape[2])
    if hasattr(flash_mla, "has_legacy"):
        out, lse = flash_mla.flash_mla_with_kvcache(
            q, kv_cache, block_table, cache_seqlens, D_V, schedule,
            softmax_scale=softmax_scale, causal=True, use_legacy=True,
        )  # fmt: skip
    else:
        meta, splits = schedule
        out, lse = flash_mla.flash_mla_with_kvcache(
            q, kv_cache, block_table, cache_seqlens, D_V, meta, splits,
            softmax_scale=softmax_scale, causal=True,
        )  # fmt: skip
    return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))


def mla_decode_official(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    schedules: dict[int, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`mla.mla_decode`'s contract through the installed FlashMLA. `schedules`: split schedules
    over these lengths by query rows (s_q·h_q), filled here at first use and reused after."""
    import flash_mla

    schedule = None
    if schedules is not None:
        rows = q.shape[1] * q.shape[2]
        if rows not in schedules:
            schedules[rows] = new_schedule(flash_mla, cache_seqlens, rows)
        schedule = schedules[rows]
    return decode_with(flash_mla, q, kv_cache, block_table, cache_seqlens, softmax_scale, schedule)
