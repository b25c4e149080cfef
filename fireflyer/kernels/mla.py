"""Paged MLA decode (DeepSeek-V3 attention at decode time), FlashMLA's interface.

q [b, s_q, h_q, 576] (512 latent + 64 rope), kv_cache [num_blocks, 64, 1, 576] (the latent is
also the value; or uint8 [num_blocks, 64, 1, 656], the FP8 layout of mla_fp8), block_table
int32 [b, max_blocks], cache_seqlens int32 [b];
out [b, s_q, h_q, 512] BF16 and lse [b, h_q, s_q] fp32 (natural log). For s_q > 1 the queries are
the last s_q positions of the sequence and attend causally.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fireflyer.kernels.backend import Backend, gluon_or_fallback, resolve
from fireflyer.kernels.mla_schedule import StepSchedules

PAGE = 64
D_QK = 576
D_V = 512
D_ROPE = D_QK - D_V  # the rotary part of each cached token: 64


def check_shapes(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    token_width: int = D_QK,
) -> None:
    """`token_width`: a cache row's elements (576 values; 656 bytes in the FP8 layout)."""
    b, s_q, _, d = q.shape
    if d != D_QK or kv_cache.shape[1:] != (PAGE, 1, token_width):
        raise ValueError(
            f"expected q [..., {D_QK}] and kv_cache [blocks, {PAGE}, 1, {token_width}], "
            f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}"
        )
    if block_table.shape[0] != b or cache_seqlens.shape != (b,):
        raise ValueError("block_table and cache_seqlens need one row per sequence")
    if block_table.dtype != torch.int32 or cache_seqlens.dtype != torch.int32:
        raise ValueError("block_table and cache_seqlens must be int32")
    if s_q not in (1, 2):
        raise ValueError(f"s_q must be 1 or 2, got {s_q}")


def num_splits(batch: int, head_blocks: int, max_pages: int, num_sms: int, waves: float = 2.0) -> int:
    """Split the KV sequence so that batch × head blocks × splits fills the GPU about `waves`
    times over; never more splits than pages."""
    programs = max(1, batch * head_blocks)
    splits = max(1, math.ceil(waves * num_sms / programs))
    return max(1, min(splits, max_pages, 64))


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence attention in fp32: the definition of correct."""
    check_shapes(q, kv_cache, block_table, cache_seqlens)
    b, s_q, h_q, _ = q.shape
    out = torch.empty(b, s_q, h_q, D_V, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    flat = kv_cache.view(-1, D_QK)
    for i in range(b):
        n = int(cache_seqlens[i])
        pages = block_table[i, : (n + PAGE - 1) // PAGE].long()
        rows = (pages[:, None] * PAGE + torch.arange(PAGE, device=q.device)).reshape(-1)[:n]
        kv = flat[rows].float()  # [n, 576]
        qi = q[i].float().reshape(s_q * h_q, D_QK)
        scores = (qi @ kv.T) * softmax_scale  # [s_q*h_q, n]
        query_pos = (n - s_q + torch.arange(s_q, device=q.device)).repeat_interleave(h_q)
        mask = torch.arange(n, device=q.device)[None, :] > query_pos[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        # A query with no visible key (sequence shorter than s_q) yields zeros and lse = -inf.
        probs = torch.exp(scores - row_lse.clamp(min=-1e30)[:, None]).nan_to_num(0.0)
        out[i] = (probs @ kv[:, :D_V]).reshape(s_q, h_q, D_V).to(q.dtype)
        lse[i] = row_lse.reshape(s_q, h_q).T
    return out, lse


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    backend: Backend = "auto",
    schedules: StepSchedules | None = None,
    official_schedules: dict[int, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode. softmax_scale is always explicit (DeepSeek-V3: 192^-0.5 × its YaRN
    factor, not 576^-0.5). A uint8 cache is the FP8 layout (fireflyer.kernels.mla_fp8).
    `schedules`: the step's length-balanced schedules (mla_schedule), for a batch of unequal
    lengths; the Gluon and Triton kernels then attend balanced runs instead of uniform splits.
    `official_schedules`: where FlashMLA's split schedules for these lengths are kept, by query
    rows, when the official library runs; the layers of one decode step pass the same dict, so
    the first makes the schedule and the others reuse it."""
    if kv_cache.dtype == torch.uint8:
        from fireflyer.kernels.mla_fp8 import mla_decode_fp8

        return mla_decode_fp8(q, kv_cache, block_table, cache_seqlens, softmax_scale, backend)
    check_shapes(q, kv_cache, block_table, cache_seqlens)
    chosen = resolve(backend, "mla", q.device, rows=q.shape[1] * q.shape[2])
    if chosen == "gluon":
        from fireflyer.kernels import mla_gluon

        def gluon() -> tuple[torch.Tensor, torch.Tensor]:
            tile = mla_gluon.CONFIG["BLOCK_N"]
            schedule = None if schedules is None else schedules.get(mla_gluon.balanced_parts(q), tile)
            return mla_gluon.mla_decode_gluon(
                q, kv_cache, block_table, cache_seqlens, softmax_scale, schedule=schedule
            )

        done = gluon_or_fallback(backend, gluon)
        if done is not None:
            return done
        chosen = "triton"  # `auto` picked it for the shape class; these inputs it cannot run
    if chosen == "triton":
        from fireflyer.kernels.mla_triton import balanced_parts, mla_decode_triton

        schedule = None if schedules is None else schedules.get(balanced_parts(q), PAGE)
        return mla_decode_triton(q, kv_cache, block_table, cache_seqlens, softmax_scale, schedule=schedule)
    if chosen == "official":
        from fireflyer.kernels.mla_official import mla_decode_official

        return mla_decode_official(
            q, kv_cache, block_table, cache_seqlens, softmax_scale, schedules=official_schedules
        )
    return mla_decode_reference(q, kv_cache, block_table, cache_seqlens, softmax_scale)
