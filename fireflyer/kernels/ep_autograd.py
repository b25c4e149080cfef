"""Differentiable expert-parallel dispatch and combine, for training (normal mode, portable
transport: all_to_all over NCCL on GPUs, gloo on CPU).

    entries, entry_weights = dispatch(x, topk_idx, topk_weights)   # rows grouped by local expert
    out = combine(expert_outputs · entry_weights)                   # Σ over a token's entries

The pair is each other's transpose:
- dispatch's backward is a combine: the gradients of a token's entries are summed on the rank
  that computed them, sent back to the token's rank and summed there; each entry weight's gradient
  travels back the same way to its (token, k) slot;
- combine's backward is a dispatch: the gradient of each token's output goes to every rank that
  holds one of its experts, as one row per (token, local expert) entry.

The weighting by the router's top-k weights happens between the two, in the caller's autograd
graph, so the router gets its gradient too. Every rank of the group must run the same dispatches
and combines in the same order, forward and backward: an entry-less rank still takes part (its
backward runs because its outputs stay in the graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fireflyer.kernels.ep import Dispatcher, Handle, gather_sum


@dataclass
class Routing:
    """What a differentiable dispatch leaves for its combine (filled in by `dispatch`)."""

    dispatcher: Dispatcher
    handle: Handle | None = None
    tokens_per_expert: torch.Tensor | None = None  # [local experts] entries per local expert


def _check(dispatcher: Dispatcher) -> None:
    if dispatcher.mode != "normal" or dispatcher.transport != "portable":
        raise ValueError(
            "differentiable dispatch needs a normal-mode Dispatcher on the portable transport, not"
            f" mode {dispatcher.mode!r} over {dispatcher.transport!r}"
        )


def _sum_to_tokens(routing: Routing, entries: torch.Tensor) -> torch.Tensor:
    """Σ of each token's entry rows, back on the token's rank: [entries, h] → [tokens, h]."""
    dispatcher, handle = routing.dispatcher, routing.handle
    assert handle is not None and handle.row_entries is not None and handle.token_rows is not None
    out_dtype = entries.dtype
    present = (handle.row_entries >= 0).to(torch.float32)
    per_row = gather_sum(entries, handle.row_entries, present, out_dtype)
    return dispatcher.portable.sum_back(per_row, handle, out_dtype)


def _spread_to_entries(routing: Routing, tokens: torch.Tensor) -> torch.Tensor:
    """Each token's row to every entry it has on any rank: [tokens, h] → [entries, h]."""
    dispatcher, handle = routing.dispatcher, routing.handle
    assert handle is not None
    rows = tokens[handle.send_token]
    received = dispatcher.portable.exchange(rows, handle.send_counts, handle.recv_counts, handle.recv_rows)
    return received[handle.entry_row]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, topk_weights: torch.Tensor, topk_idx: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor]:
        received, handle = routing.dispatcher.dispatch_portable(
            x.detach(), None, topk_idx, topk_weights.detach()
        )
        routing.handle, routing.tokens_per_expert = handle, received.tokens_per_expert
        ctx.routing = routing
        ctx.top_k = topk_idx.shape[1]
        ctx.weights_dtype = topk_weights.dtype
        return received.x, handle.entry_weight.to(topk_weights.dtype)

    @staticmethod
    def backward(
        ctx: Any, grad_entries: torch.Tensor | None, grad_entry_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        routing: Routing = ctx.routing
        handle = routing.handle
        assert handle is not None and handle.row_entries is not None
        entries = handle.entry_row.shape[0]
        if grad_entries is None:  # still exchanged: every rank runs the same collectives
            grad_entries = torch.zeros(entries, routing.dispatcher.hidden, device=handle.entry_row.device)
        if grad_entry_weights is None:
            grad_entry_weights = torch.zeros(entries, device=handle.entry_row.device)
        grad_x = _sum_to_tokens(routing, grad_entries.contiguous())
        # Each (row, k) slot's weight gradient, back to the sending rank: a token's k-th choice sits
        # on exactly one rank, so summing the rows of a token adds zeros elsewhere.
        present = handle.row_entries >= 0
        per_slot = torch.where(
            present, grad_entry_weights.float()[handle.row_entries.clamp(min=0)], 0.0
        ).contiguous()
        back = routing.dispatcher.portable.exchange(
            per_slot, handle.recv_counts, handle.send_counts, len(handle.send_token)
        )
        grad_weights = torch.zeros(handle.num_tokens, ctx.top_k, device=back.device)
        grad_weights.index_add_(0, handle.send_token, back)
        return grad_x, grad_weights.to(ctx.weights_dtype), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, entries: torch.Tensor, routing: Routing) -> torch.Tensor:
        ctx.routing = routing
        return _sum_to_tokens(routing, entries.detach().contiguous())

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _spread_to_entries(ctx.routing, grad_out.contiguous()), None


def dispatch(
    dispatcher: Dispatcher, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Routing]:
    """x [tokens, hidden], topk_idx [tokens, k] (−1: none), topk_weights [tokens, k] →
    (entries [entries, hidden] grouped by local expert, their weights [entries], the routing for
    `combine`; `routing.tokens_per_expert` says where each expert's rows end). Differentiable in x
    and topk_weights."""
    _check(dispatcher)
    routing = Routing(dispatcher)
    entries, weights = _Dispatch.apply(x, topk_weights, topk_idx, routing)
    return entries, weights, routing


def combine(entries: torch.Tensor, routing: Routing) -> torch.Tensor:
    """entries [entries, hidden] in dispatch's order → [tokens, hidden]: each token's entries
    summed (weight them first). Differentiable."""
    if routing.handle is None:
        raise ValueError("combine needs the routing of a dispatch")
    out: torch.Tensor = _Combine.apply(entries, routing)
    return out
