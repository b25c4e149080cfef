"""The feed-forward blocks: dense MLP, the sigmoid router with group-limited top-k, routed
experts over grouped (FP8) GEMMs, and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fireflyer.kernels import fp8
from fireflyer.kernels.backend import Backend
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.model.layers import Linear

# Above this many tokens the experts run on the contiguous layout (rows per expert padded to 128);
# at or below it on the masked layout, which needs no host synchronisation (decode, CUDA graphs).
MASKED_MAX_TOKENS = 256


class MLP(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        intermediate: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        gemm_backend: Backend = "auto",
    ) -> None:
        super().__init__()

        def linear(i: int, o: int) -> Linear:
            return Linear(
                i, o, dtype=dtype, device=device, fp8_weight=config.fp8_weights, backend=gemm_backend
            )

        self.gate_proj = linear(config.hidden_size, intermediate)
        self.up_proj = linear(config.hidden_size, intermediate)
        self.down_proj = linear(intermediate, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid scores; the bias only steers the choice (DeepSeek's auxiliary-loss-free balancing);
    experts are chosen within the `topk_group` groups whose two best biased scores sum highest."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.config = config
        experts = config.n_routed_experts
        self.weight = nn.Parameter(
            torch.empty(experts, config.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(experts, dtype=torch.float32, device=device), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (weights [T, k] fp32, expert ids [T, k] int64)."""
        c = self.config
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias
        if c.n_group > 1:
            grouped = biased.view(-1, c.n_group, c.n_routed_experts // c.n_group)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = group_scores.topk(c.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = biased.masked_fill(
                ~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf")
            )
        ids = biased.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids


class Experts(nn.Module):
    """The routed experts this rank hosts, stacked: w13 = [gate; up] [E, 2I, H], w2 [E, H, I]
    (e4m3 with per-128×128 scales for FP8 checkpoints)."""

    def __init__(
        self,
        config: ModelConfig,
        experts: range,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        gemm_backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.experts = experts
        self.fp8 = config.fp8_weights
        self.gemm_backend: Backend = gemm_backend
        e, h, i = len(experts), config.hidden_size, config.moe_intermediate_size
        weight_dtype = fp8.FP8 if self.fp8 else dtype
        self.w13 = nn.Parameter(
            torch.empty(e, 2 * i, h, dtype=weight_dtype, device=device), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(e, h, i, dtype=weight_dtype, device=device), requires_grad=False)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if self.fp8:
            if i % fp8.GROUP or h % fp8.GROUP:
                raise ValueError(
                    f"FP8 experts need hidden ({h}) and moe_intermediate_size ({i}) in multiples of 128"
                )
            g = fp8.GROUP
            self.w13_scale = nn.Parameter(
                torch.empty(e, 2 * i // g, h // g, device=device), requires_grad=False
            )
            self.w2_scale = nn.Parameter(torch.empty(e, h // g, i // g, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]) for the experts hosted here (others add 0)."""
        local = ids - self.experts.start
        hosted = (local >= 0) & (local < len(self.experts))
        local = torch.where(hosted, local, len(self.experts))  # a sink slot past the last expert
        small = x.shape[0] <= MASKED_MAX_TOKENS
        rows = self._masked(x, local) if small else self._contiguous(x, local)
        contrib = rows * (weights * hosted).unsqueeze(-1).to(rows.dtype)
        return contrib.sum(1).to(x.dtype)

    def _masked(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Entries (t, k) laid out as [experts, T, H] (an expert sees a token at most once), with
        no host synchronisation; returns each entry's output [T, k, H]."""
        tokens, top_k = local.shape
        n = len(self.experts)
        flat = local.reshape(-1)
        counts = torch.zeros(n + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=x.device) - starts[flat[order]]
        slot = flat * tokens + rank  # sink entries land in expert n's rows, dropped below
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
        layout = x.new_zeros((n + 1) * tokens, x.shape[1])
        layout[slot] = x[token_of]
        out = self._run_masked(layout.view(n + 1, tokens, -1)[:n], counts[:n])
        padded = torch.cat([out.reshape(n * tokens, -1), out.new_zeros(tokens, out.shape[-1])])
        return padded[slot].view(tokens, top_k, -1)

    def _contiguous(self, x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Entries grouped by expert, each group padded to 128 rows (the grouped GEMM's tile)."""
        tokens, top_k = local.shape
        n = len(self.experts)
        flat = local.reshape(-1)
        counts = torch.bincount(flat, minlength=n + 1)[:n]
        padded_counts = (counts + fp8.GROUP - 1) // fp8.GROUP * fp8.GROUP
        starts = torch.cumsum(padded_counts, 0) - padded_counts
        total = int(padded_counts.sum())
        order = torch.argsort(flat, stable=True)
        hosted = order[flat[order] < n]
        sorted_e = flat[hosted]
        first = torch.cumsum(counts, 0) - counts
        position = starts[sorted_e] + torch.arange(len(hosted), device=x.device) - first[sorted_e]
        m_indices = torch.full((total,), -1, dtype=torch.long, device=x.device)
        m_indices[position] = sorted_e
        layout = x.new_zeros(total, x.shape[1])
        layout[position] = x[hosted // top_k]
        out = self._run_contiguous(layout, m_indices)
        entries = out.new_zeros(tokens * top_k, out.shape[-1])
        entries[hosted] = out[position]
        return entries.view(tokens, top_k, -1)

    def _run_masked(self, a: torch.Tensor, masked_m: torch.Tensor) -> torch.Tensor:
        """a [E, M, H] → [E, M, H] through w13, SiLU·up, w2."""
        e, m, h = a.shape
        if not self.fp8:
            hidden = torch.bmm(a, self.w13.transpose(1, 2))
            gate, up = hidden.chunk(2, dim=-1)
            return torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))
        assert self.w13_scale is not None and self.w2_scale is not None
        q, s = fp8.quantize_per_token_group(a.reshape(e * m, h))
        hidden = fp8.grouped_gemm_fp8_masked(
            q.view(e, m, h), s.view(e, m, -1), self.w13, self.w13_scale, masked_m, backend=self.gemm_backend
        )
        gate, up = hidden.float().chunk(2, dim=-1)
        act = (F.silu(gate) * up).view(e * m, -1)
        q, s = fp8.quantize_per_token_group(act)
        return fp8.grouped_gemm_fp8_masked(
            q.view(e, m, -1), s.view(e, m, -1), self.w2, self.w2_scale, masked_m, backend=self.gemm_backend
        ).to(a.dtype)

    def _run_contiguous(self, a: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            out = a.new_zeros(a.shape)
            for e in torch.unique(m_indices[m_indices >= 0]).tolist():
                rows = (m_indices == e).nonzero().flatten()
                gate, up = F.linear(a[rows], self.w13[e]).chunk(2, dim=-1)
                out[rows] = F.linear(F.silu(gate) * up, self.w2[e])
            return out
        assert self.w13_scale is not None and self.w2_scale is not None
        q, s = fp8.quantize_per_token_group(a)
        hidden = fp8.grouped_gemm_fp8_contiguous(
            q, s, self.w13, self.w13_scale, m_indices, backend=self.gemm_backend
        )
        gate, up = hidden.float().chunk(2, dim=-1)
        q, s = fp8.quantize_per_token_group(F.silu(gate) * up)
        return fp8.grouped_gemm_fp8_contiguous(
            q, s, self.w2, self.w2_scale, m_indices, backend=self.gemm_backend
        ).to(a.dtype)


class MoE(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        experts: range | None = None,
        gemm_backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.gate = Gate(config, dtype=dtype, device=device)
        hosted = experts if experts is not None else range(config.n_routed_experts)
        self.experts = Experts(config, hosted, dtype=dtype, device=device, gemm_backend=gemm_backend)
        self.shared_experts: MLP | None = None
        if config.n_shared_experts:
            self.shared_experts = MLP(
                config,
                config.moe_intermediate_size * config.n_shared_experts,
                dtype=dtype,
                device=device,
                gemm_backend=gemm_backend,
            )
        self.load: torch.Tensor | None = None  # tokens per logical expert, counted when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.load is not None:
            self.load.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
