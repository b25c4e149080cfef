"""RMSNorm, rotary embeddings with YaRN, and linear layers over BF16 or DeepSeek FP8 weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fireflyer.kernels import fp8
from fireflyer.kernels.backend import Backend
from fireflyer.workloads.model.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and round before the weight, as the checkpoint's own code does.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dimensions and the factor YaRN applies to cos/sin."""
    dim, base, rope = config.qk_rope_head_dim, config.rope_theta, config.rope_scaling
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rope.is_yarn:
        return freqs, 1.0

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # Low frequencies (ramp 1) are interpolated by the factor, high ones kept (extrapolated).
    freqs = freqs / rope.factor * ramp + freqs * (1 - ramp)
    if rope.attention_factor is not None:
        attention = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention = yarn_mscale(rope.factor)
    return freqs, attention


class Rotary(nn.Module):
    """cos/sin per position, applied to DeepSeek's interleaved pairs (x0, x1), (x2, x3), …; the
    rotated halves come out de-interleaved, the same for queries and keys, which leaves q·k intact."""

    def __init__(self, config: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        freqs, attention = rope_inv_freq(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, freqs)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", (angles.cos() * attention).to(device), persistent=False)
        self.register_buffer("sin", (angles.sin() * attention).to(device), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, ..., rope_dim], positions [T]."""
        shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        cos = self.cos[positions].view(shape).to(x.dtype)
        sin = self.sin[positions].view(shape).to(x.dtype)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


class Linear(nn.Module):
    """y = x Wᵀ over a BF16/FP32 weight, or over an e4m3 weight with 128×128 block scales
    (`weight_scale_inv`), activations then quantised per 1×128 group as DeepSeek-V3 runs them."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        fp8_weight: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend: Backend = backend
        self.fp8 = fp8_weight
        weight_dtype = fp8.FP8 if fp8_weight else dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=weight_dtype, device=device), requires_grad=False
        )
        self.weight_scale_inv: nn.Parameter | None = None
        if fp8_weight:
            blocks = (-(-out_features // fp8.GROUP), -(-in_features // fp8.GROUP))
            self.weight_scale_inv = nn.Parameter(
                torch.empty(blocks, dtype=torch.float32, device=device), requires_grad=False
            )

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        return fp8.dequantize_per_block(self.weight, self.weight_scale_inv).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            return F.linear(x, self.weight)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        q, scale = fp8.quantize_per_token_group(flat)
        out = fp8.gemm_fp8(q, scale, self.weight, self.weight_scale_inv, backend=self.backend)
        return out.to(x.dtype).view(*shape[:-1], self.out_features)
