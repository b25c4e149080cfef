"""EP dispatch/combine through the official DeepEP library (`deep_ep.Buffer`), when it is installed.

The Dispatcher's contract stays the same: replicas are chosen here (logical experts become
physical slots before DeepEP sees them), received tokens come back grouped by local expert (and,
in low-latency mode, also in DeepEP's own masked layout), and combine takes the experts' outputs
in either layout.

- normal mode: `get_dispatch_layout` → `dispatch` (BF16, or FP8 with its 1×128 scales) gives one
  row per (token, rank) with the local expert ids; the rows are expanded into the grouped layout
  here. Combine sums each row's experts with their weights here, then DeepEP's `combine` adds the
  rows of each token up (it applies no weights).
- low-latency mode: `low_latency_dispatch` (DeepEP casts to FP8 itself, so an FP8 payload is
  dequantised first and cast again with the same 1×128 groups) and `low_latency_combine`
  (weighted by DeepEP); no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fireflyer.kernels.ep import Received, gather_sum, group_by_expert
from fireflyer.kernels.fp8 import dequantize_per_token_group


@dataclass
class OfficialHandle:
    num_tokens: int
    deep_ep_handle: Any
    row_entries: torch.Tensor | None = None  # normal: [received rows, k] grouped entry, −1 if none
    row_weights: torch.Tensor | None = None  # normal: [received rows, k]
    slots: torch.Tensor | None = None  # low-latency: the physical slots DeepEP dispatched to
    weights: torch.Tensor | None = None  # low-latency: their weights
    grouped_to_masked: torch.Tensor | None = None  # low-latency: masked row of each grouped row


class OfficialTransport:
    """One deep_ep.Buffer for the group, sized by DeepEP's own hints."""

    def __init__(
        self, group: Any, world: int, capacity: int, hidden: int, num_slots: int, low_latency: bool
    ) -> None:
        import deep_ep

        self.world, self.capacity, self.hidden, self.num_slots = world, capacity, hidden, num_slots
        self.local_experts = num_slots // world
        self.low_latency = low_latency
        if low_latency:
            rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(capacity, hidden, world, num_slots)
            self.buffer = deep_ep.Buffer(
                group, 0, rdma, low_latency_mode=True, num_qps_per_rank=self.local_experts
            )
        else:
            hidden_bytes = hidden * 2
            configs = (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world))
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, world) for c in configs)
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, world) for c in configs)
            self.buffer = deep_ep.Buffer(group, nvl, rdma)

    def dispatch(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        fp8: torch.dtype | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_of_expert: torch.Tensor,
    ) -> tuple[Received, OfficialHandle]:
        """tokens: BF16, or FP8 bytes (uint8) with fp8 naming their dtype."""
        chosen = topk_idx >= 0
        slots = torch.where(chosen, slot_of_expert[topk_idx.clamp(min=0)], -1).to(torch.int64)
        weights = topk_weights.float()
        if self.low_latency:
            return self._dispatch_low_latency(tokens, scales, fp8, slots, weights)
        payload: Any = tokens if fp8 is None else (tokens.view(fp8), scales)
        layout = self.buffer.get_dispatch_layout(slots, self.num_slots)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = layout
        recv, recv_idx, recv_weights, _, deep_ep_handle, _ = self.buffer.dispatch(
            payload,
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=slots,
            topk_weights=weights,
        )
        recv_x, recv_scales = recv if isinstance(recv, tuple) else (recv, None)
        order, row_entries, counts = group_by_expert(recv_idx, self.local_experts)
        entry_row = torch.div(order, recv_idx.shape[1], rounding_mode="floor")
        row_weights = torch.where(recv_idx >= 0, recv_weights.float(), 0.0)
        x = recv_x[entry_row]
        received = Received(
            x=x.view(torch.uint8) if fp8 is not None else x,
            scales=None if recv_scales is None else recv_scales.float()[entry_row],
            tokens_per_expert=counts,
        )
        handle = OfficialHandle(topk_idx.shape[0], deep_ep_handle, row_entries, row_weights)
        return received, handle

    def _dispatch_low_latency(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        fp8: torch.dtype | None,
        slots: torch.Tensor,
        weights: torch.Tensor,
    ) -> tuple[Received, OfficialHandle]:
        if fp8 is None:
            bf16 = tokens
        else:
            assert scales is not None
            bf16 = dequantize_per_token_group(tokens.view(fp8), scales).to(torch.bfloat16)
        recv, recv_count, deep_ep_handle, _, _ = self.buffer.low_latency_dispatch(
            bf16, slots, self.capacity, self.num_slots, use_fp8=fp8 is not None
        )
        masked_x, masked_scales = recv if isinstance(recv, tuple) else (recv, None)
        experts, rows = masked_x.shape[0], masked_x.shape[1]
        # Grouped layout from the masked one, without reading the counts on the host: row i of
        # expert e goes to (entries of earlier experts) + i; rows past the count to a spare row.
        counts = recv_count.long()
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(rows, device=counts.device).unsqueeze(0)
        valid = within < counts.unsqueeze(1)
        spare = experts * rows
        target = torch.where(valid, starts.unsqueeze(1) + within, spare).reshape(-1)
        masked_index = torch.arange(spare, device=counts.device)
        grouped_to_masked = torch.full((spare + 1,), -1, dtype=torch.long, device=counts.device)
        grouped_to_masked.index_copy_(0, target, torch.where(valid.reshape(-1), masked_index, -1))
        flat = masked_x.reshape(spare, -1)
        if fp8 is not None:
            flat = flat.view(torch.uint8)  # FP8 rows are moved as bytes
        x = torch.empty((spare + 1, flat.shape[1]), dtype=flat.dtype, device=flat.device)
        x.index_copy_(0, target, flat)
        grouped_scales = None
        if masked_scales is not None:
            flat_scales = masked_scales.contiguous().reshape(spare, -1).float()
            grouped_scales = torch.empty((spare + 1, flat_scales.shape[1]), device=flat.device)
            grouped_scales.index_copy_(0, target, flat_scales)
            grouped_scales = grouped_scales[:spare]
        received = Received(
            x=x[:spare],
            scales=grouped_scales,
            tokens_per_expert=counts,
            masked_x=masked_x.view(torch.uint8) if fp8 is not None else masked_x,
            masked_scales=None if masked_scales is None else masked_scales.contiguous().float(),
        )
        handle = OfficialHandle(
            slots.shape[0],
            deep_ep_handle,
            slots=slots,
            weights=weights,
            grouped_to_masked=grouped_to_masked[:spare],
        )
        return received, handle

    def combine(self, expert_out: torch.Tensor, handle: OfficialHandle, masked: bool) -> torch.Tensor:
        if handle.slots is not None:  # low-latency: DeepEP takes the masked layout and weights itself
            assert handle.grouped_to_masked is not None and handle.weights is not None
            if masked:
                masked_out = expert_out.to(torch.bfloat16)
            else:
                rows = handle.grouped_to_masked.numel()
                device = expert_out.device
                masked_out = torch.zeros((rows + 1, self.hidden), dtype=torch.bfloat16, device=device)
                spare = torch.full_like(handle.grouped_to_masked, rows)
                at = torch.where(handle.grouped_to_masked >= 0, handle.grouped_to_masked, spare)
                masked_out.index_copy_(0, at, expert_out.to(torch.bfloat16))
                masked_out = masked_out[:rows].view(self.local_experts, -1, self.hidden)
            combined, _, _ = self.buffer.low_latency_combine(
                masked_out, handle.slots, handle.weights, handle.deep_ep_handle
            )
            return combined
        if masked:
            raise ValueError("masked combine needs a low-latency dispatch")
        assert handle.row_entries is not None and handle.row_weights is not None
        per_row = gather_sum(expert_out, handle.row_entries, handle.row_weights, torch.bfloat16)
        combined, _, _ = self.buffer.combine(per_row, handle.deep_ep_handle)
        return combined
