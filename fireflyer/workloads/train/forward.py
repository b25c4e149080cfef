"""The training forward pass: tokens [B, T] → next-token loss, through the serving model's own
modules (weights, MLA projections, RoPE/YaRN, router, experts) with full causal attention.

The serving forward runs a flat batch over the paged latent cache (BatchMetadata) and routes
experts over layouts whose unused rows are never initialised: fine for inference, but their
gradients would read those rows. Here attention runs over the batch's own keys and values, and each
expert multiplies exactly the rows routed to it, so every op has a clean backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fireflyer.kernels import ep_autograd
from fireflyer.kernels.ep import Dispatcher
from fireflyer.workloads.model.attention import MLA
from fireflyer.workloads.model.layers import Rotary
from fireflyer.workloads.model.model import Block, DeepseekV3
from fireflyer.workloads.model.moe import MLP, Experts, MoE
from fireflyer.workloads.train.balance import sequence_balance_loss


@dataclass
class Losses:
    lm: torch.Tensor  # mean next-token cross-entropy
    balance: torch.Tensor  # sequence-wise balance loss, summed over MoE layers

    @property
    def total(self) -> torch.Tensor:
        return self.lm + self.balance


def attention(mla: MLA, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Causal MLA over whole sequences: x [B, T, hidden] → [B, T, hidden]. The same arithmetic as
    the serving prefill (latent normed, keys and values expanded through kv_b_proj)."""
    batch, tokens, _ = x.shape
    flat = x.reshape(batch * tokens, -1)
    flat_positions = positions.repeat(batch)
    if mla.config.q_lora_rank is None:
        q = mla.q_proj(flat)
    else:
        q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(flat)))
    q_nope, q_pe = q.view(batch * tokens, mla.heads, -1).split([mla.nope, mla.rope_dim], dim=-1)
    q_pe = rotary(q_pe, flat_positions)
    latent, k_pe = mla.kv_a_proj_with_mqa(flat).split([mla.rank, mla.rope_dim], dim=-1)
    k_pe = rotary(k_pe, flat_positions)
    k_nope, v = (
        mla.kv_b_proj(mla.kv_a_layernorm(latent))
        .view(batch * tokens, mla.heads, mla.nope + mla.v_dim)
        .split([mla.nope, mla.v_dim], dim=-1)
    )
    k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, mla.heads, -1).to(k_nope.dtype)], dim=-1)
    q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1)
    if q.is_cuda and mla.v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - mla.v_dim))  # flash attention wants one head width

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [B·T, heads, d] → [B, heads, T, d]
        return t.view(batch, tokens, mla.heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v.to(q.dtype)), is_causal=True, scale=mla.scale
    )
    out = out.transpose(1, 2)[..., : mla.v_dim].reshape(batch * tokens, mla.heads * mla.v_dim)
    return mla.o_proj(out).view(batch, tokens, -1)


def _expert_rows(experts: Experts, e: int, rows: torch.Tensor) -> torch.Tensor:
    """SiLU(gate)·up through local expert e's w13, then its w2, over exactly `rows`."""
    gate, up = F.linear(rows, experts.w13[e]).float().chunk(2, dim=-1)
    return F.linear((F.silu(gate) * up).to(rows.dtype), experts.w2[e])


def routed_experts(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]): entries sorted by expert, one GEMM pair per
    expert over exactly its rows, results put back in entry order (no atomics: deterministic)."""
    tokens, top_k = ids.shape
    assert isinstance(experts.experts, range), "training hosts an even split of the experts"
    flat = ids.reshape(-1) - experts.experts.start
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts.experts)).tolist()
    rows = x[order // top_k]
    outs = []
    for e, chunk in enumerate(rows.split(counts)):
        if chunk.shape[0] == 0:
            continue
        outs.append(_expert_rows(experts, e, chunk))
    entry_out = torch.cat(outs)[torch.argsort(order)]
    weighted = entry_out.float() * weights.reshape(-1, 1)
    return weighted.view(tokens, top_k, -1).sum(1).to(x.dtype)


def dispatched_experts(
    experts: Experts, dispatcher: Dispatcher, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Expert parallelism: every (token, expert) entry goes to the rank holding the expert, which
    runs its experts over their rows; the weighted results come back and are summed per token.
    Differentiable; every rank of the expert group calls it for every MoE layer in step."""
    entries, entry_weights, routing = ep_autograd.dispatch(dispatcher, x, ids, weights)
    assert routing.tokens_per_expert is not None
    outs = [
        _expert_rows(experts, e, chunk)
        for e, chunk in enumerate(entries.split(routing.tokens_per_expert.tolist()))
        if chunk.shape[0]
    ]
    # No entries here: the empty slice keeps the dispatch in the graph, so its backward still runs.
    entry_out = torch.cat(outs) if outs else entries[:0]
    weighted = entry_out.float() * entry_weights.float().reshape(-1, 1)
    return ep_autograd.combine(weighted, routing).to(x.dtype)


def moe_forward(moe: MoE, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, hidden] → (output, sequence-wise balance loss of this layer)."""
    batch, tokens, hidden = x.shape
    flat = x.reshape(-1, hidden)
    with torch.autocast(x.device.type, enabled=False):  # the router scores in FP32, as served
        weights, ids = moe.gate(flat.float())
        balance = flat.new_zeros((), dtype=torch.float32)
        if alpha > 0:
            scores = F.linear(flat.float(), moe.gate.weight.float()).sigmoid()
            balance = sequence_balance_loss(
                scores.view(batch, tokens, -1), ids.view(batch, tokens, -1), alpha
            )
    if moe.load is not None:  # the counter balance.update_bias reads after the step
        moe.load.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
    if moe.dispatcher is not None:
        out = dispatched_experts(moe.experts, moe.dispatcher, flat, weights, ids)
    else:
        out = routed_experts(moe.experts, flat, weights, ids)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(flat)
    return out.view(batch, tokens, hidden), balance


def block_forward(
    block: Block, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, alpha: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoder layer: x [B, T, hidden] → (x, the layer's balance loss or None when dense)."""
    x = x + attention(block.self_attn, block.input_layernorm(x), positions, rotary)
    h = block.post_attention_layernorm(x)
    if isinstance(block.mlp, MoE):
        out, balance = moe_forward(block.mlp, h, alpha)
        return x + out, balance
    assert isinstance(block.mlp, MLP)
    return x + block.mlp(h), None


def forward(model: DeepseekV3, tokens: torch.Tensor, alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, T] → (logits [B, T, vocab] FP32, summed balance loss)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = model.embed_tokens(tokens)
    balance = torch.zeros((), device=tokens.device)
    for block in model.blocks:
        x, layer_balance = block_forward(block, x, positions, model.rotary, alpha)
        if layer_balance is not None:
            balance = balance + layer_balance
    return model.logits(model.norm(x)), balance


def losses(model: DeepseekV3, window: torch.Tensor, alpha: float = 0.0) -> Losses:
    """window [B, T + 1] of token ids: inputs window[:, :-1], targets window[:, 1:]."""
    logits, balance = forward(model, window[:, :-1], alpha)
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    return Losses(lm, balance)
