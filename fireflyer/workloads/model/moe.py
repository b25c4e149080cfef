"""The feed-forward blocks: dense MLP, the sigmoid router with group-limited top-k, routed
experts over grouped (FP8) GEMMs, and shared experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fireflyer.kernels import fp8
from fireflyer.kernels.backend import Backend
from fireflyer.kernels.ep import Dispatcher
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
    (e4m3 with per-128×128 scales for FP8 checkpoints). `experts` names the logical expert of each
    local slot: a range for the even split, a list under an EPLB placement (replicas included)."""

    def __init__(
        self,
        config: ModelConfig,
        experts: range | list[int],
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
        self.last_entries = 0
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
        """Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]) for the experts hosted here (others add 0).

        Only the (token, expert) entries' rows are moved, activated and quantised; the GEMMs run on
        a per-expert layout whose unused rows are never initialised or read."""
        tokens, top_k = ids.shape
        if not isinstance(self.experts, range):
            raise ValueError("experts placed by an EPLB placement run through the dispatcher only")
        local = ids - self.experts.start
        hosted = (local >= 0) & (local < len(self.experts))
        if tokens <= MASKED_MAX_TOKENS:
            route = self._route_masked(local, hosted)
        else:
            route = self._route_contiguous(local, hosted)
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
        if self.fp8:
            xq, xs = fp8.quantize_per_token_group(x)
            out = self._run(route, xq[token_of], xs[token_of], x.dtype)
        else:
            out = self._run(route, x[token_of], None, x.dtype)
        # Entries of experts hosted elsewhere read row 0, maybe never written: select, not multiply.
        entry_out = torch.where(hosted.reshape(-1, 1), out.float() * weights.reshape(-1, 1), 0.0)
        return entry_out.view(tokens, top_k, x.shape[-1]).sum(1).to(x.dtype)

    def forward_dispatched(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, dispatcher: Dispatcher
    ) -> torch.Tensor:
        """Expert parallelism: tokens go to the ranks hosting their experts (FP8 rows when the
        weights are FP8), come back weighted and summed. Every rank of the group calls this."""
        payload: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
        # GPU transports move BF16 (or FP8) rows; the portable one keeps an FP32 model in FP32.
        wire = x.dtype if dispatcher.transport == "portable" and x.dtype == torch.float32 else torch.bfloat16
        payload = fp8.quantize_per_token_group(x) if self.fp8 else x.to(wire)
        received, handle = dispatcher.dispatch(payload, ids, weights.float())
        # Entries come grouped by local expert; low-latency mode pads them with invalid ones at the end.
        counts = received.tokens_per_expert.long()
        local = torch.full((received.x.shape[0],), len(counts), dtype=torch.long, device=x.device)
        valid = int(counts.sum())
        self.last_entries = valid  # (token, expert) pairs this rank computes in this call
        local[:valid] = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
        route = self._route_contiguous(local[:, None], (local < len(counts))[:, None])
        rows = received.x if self.fp8 else received.x.to(x.dtype)
        out = self._run(route, rows, received.scales, x.dtype)
        out = torch.where((local < len(counts))[:, None], out, 0.0)  # padding entries read row 0
        return dispatcher.combine(out.to(wire), handle).to(x.dtype)

    def _run(
        self, route: _Route, rows: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """One output row per entry: SiLU(gate)·up through w13, then w2, on the route's layout."""
        if rows.shape[0] == 0 or route.rows <= 1:
            # Nothing for these experts (no rows, or only low-latency padding): the rank still
            # takes part in combine, with zero outputs.
            return torch.zeros(rows.shape[0], self.w2.shape[1], dtype=dtype, device=rows.device)
        h = self._gemm(
            route,
            self._scatter(route, rows),
            None if scales is None else self._scatter(route, scales),
            up=True,
        )
        gate, up = h[route.read_rows].float().chunk(2, dim=-1)
        act = F.silu(gate) * up
        if self.fp8:
            aq, a_s = fp8.quantize_per_token_group(act)
            out = self._gemm(route, self._scatter(route, aq), self._scatter(route, a_s), up=False)
        else:
            out = self._gemm(route, self._scatter(route, act.to(dtype)), None, up=False)
        return out[route.read_rows]

    def _route_masked(self, local: torch.Tensor, hosted: torch.Tensor) -> _Route:
        """Layout [experts, T, ·]: an expert sees a token at most once. No host synchronisation
        (decode steps run inside CUDA graphs)."""
        tokens = local.shape[0]
        n = len(self.experts)
        flat = torch.where(hosted, local, n).reshape(-1)
        counts = torch.zeros(n + 1, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)
        )
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        rows = flat * tokens + rank  # entries of no hosted expert land past the GEMM rows
        sink = n * tokens
        write = torch.where(hosted.reshape(-1), rows, sink)
        read = torch.where(hosted.reshape(-1), rows, 0)
        return _Route(sink + 1, write, read, masked_m=counts[:n], tokens=tokens)

    def _route_contiguous(self, local: torch.Tensor, hosted: torch.Tensor) -> _Route:
        """Entries grouped by expert, each group padded to 128 rows (the grouped GEMM's tile)."""
        n = len(self.experts)
        flat = torch.where(hosted, local, n).reshape(-1)
        counts = torch.bincount(flat, minlength=n + 1)[:n]
        padded = (counts + fp8.GROUP - 1) // fp8.GROUP * fp8.GROUP
        starts = torch.cumsum(padded, 0) - padded
        total = int(padded.sum())
        order = torch.argsort(flat, stable=True)
        first = torch.cumsum(counts, 0) - counts
        sorted_e = flat[order].clamp(max=max(n - 1, 0))
        position = torch.empty_like(flat)
        position[order] = starts[sorted_e] + torch.arange(flat.numel(), device=flat.device) - first[sorted_e]
        m_indices = torch.repeat_interleave(torch.arange(n, device=flat.device), padded, output_size=total)
        used = torch.arange(total, device=flat.device) - starts[m_indices].clamp(min=0) < counts[m_indices]
        m_indices = torch.where(used, m_indices, -1)
        write = torch.where(hosted.reshape(-1), position, total)
        read = torch.where(hosted.reshape(-1), position, 0)
        return _Route(total + 1, write, read, m_indices=m_indices)

    @staticmethod
    def _scatter(route: _Route, values: torch.Tensor) -> torch.Tensor:
        layout = values.new_empty(route.rows, values.shape[-1])
        layout[route.write_rows] = values
        return layout

    def _gemm(self, route: _Route, a: torch.Tensor, scale: torch.Tensor | None, *, up: bool) -> torch.Tensor:
        """One grouped GEMM over the layout (its last row is the sink, not computed); → [rows, N]."""
        w, w_scale = (self.w13, self.w13_scale) if up else (self.w2, self.w2_scale)
        rows = route.rows - 1
        if route.masked_m is not None:
            g, m = len(self.experts), route.tokens
            if scale is None:
                return torch.bmm(a[:rows].view(g, m, -1), w.transpose(1, 2)).view(rows, -1)
            assert w_scale is not None
            # Rows past each expert's count are never read: no need to zero them.
            out = torch.empty(g, m, w.shape[1], dtype=torch.bfloat16, device=a.device)
            return fp8.grouped_gemm_fp8_masked(
                a[:rows].view(g, m, -1),
                scale[:rows].view(g, m, -1),
                w,
                w_scale,
                route.masked_m,
                backend=self.gemm_backend,
                out=out,
            ).view(rows, -1)
        assert route.m_indices is not None
        if scale is None:
            out = a.new_zeros(rows, w.shape[1])
            for e in torch.unique(route.m_indices[route.m_indices >= 0]).tolist():
                selected = (route.m_indices == e).nonzero().flatten()
                out[selected] = F.linear(a[selected], w[e])
            return out
        assert w_scale is not None
        return fp8.grouped_gemm_fp8_contiguous(
            a[:rows], scale[:rows], w, w_scale, route.m_indices, backend=self.gemm_backend
        )


@dataclass
class _Route:
    """Where each (token, k) entry sits in the experts' layout: `write_rows` (the sink row for
    entries of experts hosted elsewhere), `read_rows` (row 0 for those; their result is discarded)."""

    rows: int  # layout rows, the sink included
    write_rows: torch.Tensor
    read_rows: torch.Tensor
    masked_m: torch.Tensor | None = None  # masked layout: valid rows per expert
    tokens: int = 0  # masked layout: rows per expert
    m_indices: torch.Tensor | None = None  # contiguous layout: expert of each row, −1 padding


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
        # With `load`: 1 or 0 per token row, [≥ tokens] int64; rows of 0 (the padding rows of a
        # CUDA graph's batch) are not counted. None: every row counts.
        self.load_mask: torch.Tensor | None = None
        # Set when the experts are spread over an expert-parallel group (every rank then runs
        # every MoE layer in step, with an empty batch when it has no tokens).
        self.dispatcher: Dispatcher | None = None
        # (token, expert) pairs this rank's experts computed since start, through the dispatcher:
        # the load this GPU carried, whatever placement held which experts.
        self.dispatched_entries = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.load is not None:
            if self.load_mask is None:
                counts = torch.ones_like(ids.reshape(-1))
            else:
                counts = self.load_mask[: ids.shape[0], None].expand_as(ids).reshape(-1)
            self.load.scatter_add_(0, ids.reshape(-1), counts)
        if self.dispatcher is not None:
            out = self.experts.forward_dispatched(x, weights, ids, self.dispatcher)
            self.dispatched_entries += self.experts.last_entries
        else:
            out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
