"""Multi-head latent attention: low-rank queries, one compressed latent per token in the paged
cache, the expanded form for prefill and the absorbed form over the latent for decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from fireflyer.kernels import mla, mla_fp8
from fireflyer.kernels.backend import Backend
from fireflyer.workloads.model.batch import BatchMetadata
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.model.layers import Linear, RMSNorm, Rotary


class MLA(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        gemm_backend: Backend = "auto",
        attention_backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        self.attention_backend: Backend = attention_backend

        def linear(i: int, o: int) -> Linear:
            return Linear(
                i, o, dtype=dtype, device=device, fp8_weight=config.fp8_weights, backend=gemm_backend
            )

        hidden, q_out = config.hidden_size, self.heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = linear(hidden, q_out)
        else:
            self.q_a_proj = linear(hidden, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps, dtype, device)
            self.q_b_proj = linear(config.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = linear(hidden, config.latent_dim)
        self.kv_a_layernorm = RMSNorm(self.rank, config.rms_norm_eps, dtype, device)
        self.kv_b_proj = linear(self.rank, self.heads * (self.nope + self.v_dim))
        self.o_proj = linear(self.heads * self.v_dim, hidden)
        # The paged kernel's fixed widths (512 latent + 64 rope); other shapes decode expanded.
        self.absorbed_decode = self.rank == mla.D_V and config.latent_dim == mla.D_QK
        self.w_uk: torch.Tensor | None = None  # [heads, nope, rank]
        self.w_uv: torch.Tensor | None = None  # [heads, v, rank]

    def prepare(self) -> None:
        """After loading: the absorbed decode multiplies queries into the latent space with
        kv_b_proj's key part and outputs out of it with its value part."""
        w = self.kv_b_proj.dequantized(self.activation_dtype).view(
            self.heads, self.nope + self.v_dim, self.rank
        )
        self.w_uk = w[:, : self.nope].contiguous()
        self.w_uv = w[:, self.nope :].contiguous()

    @property
    def activation_dtype(self) -> torch.dtype:
        norm = self.kv_a_layernorm.weight
        return norm.dtype

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        cache: torch.Tensor,
        meta: BatchMetadata,
    ) -> torch.Tensor:
        """x [T, hidden]; cache [blocks, 64, latent_dim] of this layer, written in place (or uint8
        [blocks, 64, 656]: the FP8 layout, quantised on write)."""
        tokens = x.shape[0]
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(tokens, self.heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = rotary(q_pe, positions)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        entry = torch.cat([self.kv_a_layernorm(latent), rotary(k_pe, positions)], dim=-1)
        flat_cache = cache.view(-1, cache.shape[-1])
        fp8_cache = mla_fp8.is_fp8_cache(cache)
        flat_cache[meta.slot_mapping] = mla_fp8.quantize_latent(entry) if fp8_cache else entry.to(cache.dtype)

        def latents(rows: torch.Tensor) -> torch.Tensor:
            """The cache rows' latent + RoPE entries [n, latent_dim]."""
            return mla_fp8.dequantize_latent(flat_cache[rows], x.dtype) if fp8_cache else flat_cache[rows]

        out = x.new_empty(tokens, self.heads, self.v_dim)
        decodes = meta.num_decode
        if decodes:
            if self.absorbed_decode:
                out[:decodes] = self._decode_absorbed(q_nope[:decodes], q_pe[:decodes], cache, meta)
            else:
                for i in range(decodes):
                    rows = _rows(meta, i)
                    out[i : i + 1] = self._attend_expanded(
                        q_nope[i : i + 1], q_pe[i : i + 1], latents(rows), len(rows) - 1
                    )
        for span in meta.prefills:
            window = slice(span.start, span.start + span.length)
            out[window] = self._attend_expanded(
                q_nope[window], q_pe[window], latents(span.kv_rows), span.context
            )
        return self.o_proj(out.reshape(tokens, self.heads * self.v_dim))

    def _attend_expanded(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, context: int
    ) -> torch.Tensor:
        """Queries at positions [context, context + n) against the expanded keys and values of
        positions [0, context + n)."""
        n_q, n_kv, dtype = q_nope.shape[0], kv.shape[0], q_nope.dtype
        latent, k_pe = kv.to(dtype).split([self.rank, self.rope_dim], dim=-1)
        k_nope, v = (
            self.kv_b_proj(latent)
            .view(n_kv, self.heads, self.nope + self.v_dim)
            .split([self.nope, self.v_dim], dim=-1)
        )
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, self.heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        # After a cached prefix, query i sits at position context + i: causal from the lower right.
        # A bias object rather than a mask tensor, so the fused kernels still apply.
        mask = causal_lower_right(n_q, n_kv) if context else None
        if q.is_cuda and self.v_dim < q.shape[-1]:
            # Flash attention wants one head width for q, k and v: pad v and drop the pad after.
            v = F.pad(v, (0, q.shape[-1] - self.v_dim))
        # [1, heads, tokens, dim]: the fused (flash, memory-efficient) kernels take 4-D inputs only.
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=not context,
            scale=self.scale,
        )
        return attn[0].transpose(0, 1)[..., : self.v_dim]

    def _decode_absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: BatchMetadata
    ) -> torch.Tensor:
        assert self.w_uk is not None and self.w_uv is not None, "prepare() runs after loading"
        assert meta.decode_block_table is not None and meta.decode_seqlens is not None
        q_latent = torch.einsum("bhd,hdr->bhr", q_nope, self.w_uk)
        # The query in the cache's dtype; over the FP8 cache in the activations' (the kernel
        # dequantises the latent to it).
        q_dtype = q_nope.dtype if mla_fp8.is_fp8_cache(cache) else cache.dtype
        q = torch.cat([q_latent, q_pe], dim=-1).to(q_dtype)[:, None]  # [b, 1, heads, 576]
        paged = cache.view(cache.shape[0], mla.PAGE, 1, cache.shape[-1])
        out, _ = mla.mla_decode(
            q,
            paged,
            meta.decode_block_table,
            meta.decode_seqlens,
            self.scale,
            backend=self.attention_backend,
            schedules=meta.decode_schedules,
            official_schedules=meta.decode_official_schedules,
        )
        return torch.einsum("bhr,hvr->bhv", out[:, 0].to(q_nope.dtype), self.w_uv)


def _rows(meta: BatchMetadata, i: int) -> torch.Tensor:
    """Flat cache rows of decode sequence i's positions [0, seqlen)."""
    assert meta.decode_block_table is not None and meta.decode_seqlens is not None
    n = int(meta.decode_seqlens[i])
    pages = meta.decode_block_table[i, : -(-n // mla.PAGE)].long()
    return (pages[:, None] * mla.PAGE + torch.arange(mla.PAGE, device=pages.device)).reshape(-1)[:n]
