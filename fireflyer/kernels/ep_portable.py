"""The portable EP transport: torch.distributed all_to_all_single (NCCL on GPUs, gloo on CPU).

Normal mode exchanges the per-rank counts first (one host synchronisation) and moves exact-size
buffers; low-latency mode sends `max_tokens` rows to every rank with padding marked invalid, so
every shape is fixed. Each row travels whole: the token, its FP8 scales, its local experts on the
destination and their weights. fireflyer.kernels.ep describes the routing both share.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fireflyer.kernels.ep import Handle, Received, gather_sum, group_by_expert


class PortableTransport:
    def __init__(
        self, group: Any, world: int, max_tokens: int, hidden: int, local_experts: int, low_latency: bool
    ) -> None:
        self.group = group
        self.world = world
        self.max_tokens = max_tokens
        self.hidden = hidden
        self.local_experts = local_experts
        self.low_latency = low_latency

    def dispatch(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        local: torch.Tensor,
        hits: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> tuple[Received, Handle]:
        """`local` [tokens, k]: each choice's local expert on its rank; `hits` [tokens, world, k]:
        whether the choice lands on that rank (the Dispatcher's routing)."""
        num_tokens, top_k = local.shape
        # One row per (token, destination rank): the token's local experts there, and weights.
        in_rank = hits.any(-1)  # [tokens, world]
        # Per (token, rank): the token's local experts on that rank (-1 elsewhere) and weights.
        grid_meta = torch.where(hits, local.unsqueeze(1), torch.full_like(hits, -1, dtype=local.dtype))
        grid_weights = torch.where(hits, topk_weights.unsqueeze(1).float(), 0.0)
        if not self.low_latency:
            return self._normal(tokens, scales, in_rank, grid_meta, grid_weights, num_tokens)
        return self._low_latency(tokens, scales, in_rank, grid_meta, grid_weights, num_tokens, top_k)

    def exchange(
        self, send: torch.Tensor, send_counts: list[int] | None, recv_counts: list[int] | None, recv_rows: int
    ) -> torch.Tensor:
        as_bytes = send.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        payload = send.view(torch.uint8) if as_bytes else send
        out = torch.empty((recv_rows, *send.shape[1:]), dtype=payload.dtype, device=send.device)
        dist.all_to_all_single(out, payload.contiguous(), recv_counts, send_counts, group=self.group)
        return out.view(send.dtype) if as_bytes else out

    def _normal(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        in_rank: torch.Tensor,
        grid_meta: torch.Tensor,
        grid_weights: torch.Tensor,
        num_tokens: int,
    ) -> tuple[Received, Handle]:
        top_k = grid_meta.shape[2]
        send_counts_t = in_rank.sum(0)
        recv_counts_t = torch.empty_like(send_counts_t)
        dist.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
        # The one host synchronisation before the payload moves: both count vectors at once.
        send_counts, recv_counts = torch.stack([send_counts_t, recv_counts_t]).tolist()
        recv_rows = sum(recv_counts)
        # (token, rank) pairs ordered by rank then token: a stable sort puts present pairs first.
        flat = in_rank.t().reshape(-1)
        present = torch.argsort((~flat).to(torch.int8), stable=True)[: sum(send_counts)]
        pair_rank = torch.div(present, num_tokens, rounding_mode="floor")
        pair_token = present - pair_rank * num_tokens
        meta = grid_meta[pair_token, pair_rank]
        weights = grid_weights[pair_token, pair_rank]
        recv_x = self.exchange(tokens[pair_token], send_counts, recv_counts, recv_rows)
        recv_scales = (
            None if scales is None else self.exchange(scales[pair_token], send_counts, recv_counts, recv_rows)
        )
        # Routing metadata travels in one collective: local experts (int32) and weights (fp32).
        side = torch.cat(
            [meta.to(torch.int32).view(torch.uint8), weights.float().contiguous().view(torch.uint8)], 1
        )
        recv_side = self.exchange(side, send_counts, recv_counts, recv_rows)
        recv_meta = recv_side[:, : 4 * top_k].contiguous().view(torch.int32).long()
        recv_weights = recv_side[:, 4 * top_k :].contiguous().view(torch.float32)
        order, row_entries, counts = group_by_expert(recv_meta, self.local_experts)  # second host sync
        entry_row = torch.div(order, top_k, rounding_mode="floor")
        entry_weight = recv_weights.reshape(-1)[order]
        token_rows = torch.full((num_tokens, self.world), -1, dtype=torch.long, device=tokens.device)
        token_rows[pair_token, pair_rank] = torch.arange(len(pair_token), device=tokens.device)
        received = Received(
            x=recv_x[entry_row],
            scales=None if recv_scales is None else recv_scales[entry_row],
            tokens_per_expert=counts,
        )
        handle = Handle(
            num_tokens,
            pair_token,
            send_counts,
            recv_counts,
            recv_rows,
            entry_row,
            entry_weight,
            torch.ones_like(entry_row, dtype=torch.bool),
            None,
            row_entries=row_entries,
            row_weights=recv_weights,
            token_rows=token_rows,
        )
        return received, handle

    def _low_latency(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        in_rank: torch.Tensor,
        grid_meta: torch.Tensor,
        grid_weights: torch.Tensor,
        num_tokens: int,
        top_k: int,
    ) -> tuple[Received, Handle]:
        """Fixed shapes throughout and no data-dependent sizes: nothing waits for the host."""
        capacity = self.max_tokens
        device = tokens.device
        total = self.world * capacity
        dummy = total  # writes of absent (token, rank) pairs land in one extra row, then dropped
        position = torch.cumsum(in_rank.long(), 0) - 1  # [tokens, world] index among that rank's tokens
        ranks = torch.arange(self.world, device=device).view(1, -1)
        slot = torch.where(in_rank, ranks * capacity + position, torch.full_like(position, dummy)).reshape(-1)
        grid_token = torch.arange(num_tokens, device=device).view(-1, 1).expand(-1, self.world).reshape(-1)

        def scatter(values: torch.Tensor, fill: float | int) -> torch.Tensor:
            buffer = torch.full((total + 1, *values.shape[1:]), fill, dtype=values.dtype, device=device)
            buffer.index_copy_(0, slot, values)
            return buffer[:total]

        send_token = scatter(grid_token, -1)
        # One collective carries each row whole: payload | scales | local experts | weights.
        parts = [tokens[grid_token].contiguous().view(torch.uint8)]
        if scales is not None:
            parts.append(scales.float()[grid_token].contiguous().view(torch.uint8))
        meta_rows = grid_meta.reshape(-1, top_k).to(torch.int32)
        parts += [meta_rows.view(torch.uint8), grid_weights.reshape(-1, top_k).contiguous().view(torch.uint8)]
        packed = scatter(torch.cat(parts, 1), 0)
        # An absent pair's row must read as "no expert" on arrival.
        packed_meta_start = sum(p.shape[1] for p in parts[:-2])
        absent = send_token < 0
        packed[:, packed_meta_start : packed_meta_start + 4 * top_k].masked_fill_(absent.unsqueeze(1), 255)
        received_rows = self.exchange(packed, None, None, total)
        widths = [p.shape[1] for p in parts]
        pieces = torch.split(received_rows, widths, dim=1)
        recv_x = pieces[0].contiguous().view(tokens.dtype)
        recv_scales = pieces[1].contiguous().view(torch.float32) if scales is not None else None
        recv_meta = pieces[-2].contiguous().view(torch.int32).long()
        recv_w = pieces[-1].contiguous().view(torch.float32)
        # Every (row, k) is an entry; absent ones sort last under key local_experts.
        flat_expert = recv_meta.reshape(-1)
        entry_valid = flat_expert >= 0
        expert_key = torch.where(entry_valid, flat_expert, torch.full_like(flat_expert, self.local_experts))
        order = torch.argsort(expert_key, stable=True)
        entry_row = torch.div(order, top_k, rounding_mode="floor")
        expert_key, entry_valid = expert_key[order], entry_valid[order]
        entry_weight = recv_w.reshape(-1)[order]
        counts = torch.zeros(self.local_experts + 1, dtype=torch.long, device=device)
        counts.scatter_add_(0, expert_key, torch.ones_like(expert_key))
        counts = counts[: self.local_experts]
        starts = torch.cumsum(counts, 0) - counts
        clamped = expert_key.clamp(max=self.local_experts - 1)
        within = torch.arange(len(expert_key), device=device) - starts[clamped]
        masked_rows = self.local_experts * total
        masked_slot = torch.where(entry_valid, clamped * total + within, torch.full_like(within, masked_rows))
        x_entries = recv_x[entry_row]
        # Rows past an expert's count are never read (the counts say where each block ends).
        masked_x = torch.empty((masked_rows + 1, self.hidden), dtype=recv_x.dtype, device=device)
        masked_x.index_copy_(0, masked_slot, x_entries)
        s_entries = None
        masked_scales = None
        if recv_scales is not None:
            s_entries = recv_scales[entry_row]
            masked_scales = torch.empty(
                (masked_rows + 1, recv_scales.shape[1]), dtype=recv_scales.dtype, device=device
            )
            masked_scales.index_copy_(0, masked_slot, s_entries)
            masked_scales = masked_scales[:masked_rows].view(self.local_experts, total, -1)
        received = Received(
            x=x_entries,
            scales=s_entries,
            tokens_per_expert=counts,
            masked_x=masked_x[:masked_rows].view(self.local_experts, total, self.hidden),
            masked_scales=masked_scales,
        )
        # Per received row, where each of its k entries sits (grouped and masked layouts).
        entries = total * top_k
        inverse = torch.empty(entries, dtype=torch.long, device=device)
        inverse.index_copy_(0, order, torch.arange(entries, device=device))
        row_valid = recv_meta >= 0
        row_entries = torch.where(row_valid, inverse.view(total, top_k), torch.full_like(recv_meta, -1))
        row_masked = torch.where(
            row_valid, masked_slot[inverse].view(total, top_k), torch.full_like(recv_meta, -1)
        )
        token_rows = torch.where(in_rank, ranks * capacity + position, torch.full_like(position, -1))
        handle = Handle(
            num_tokens,
            send_token,
            None,
            None,
            total,
            entry_row,
            entry_weight,
            entry_valid,
            masked_slot.clamp(max=masked_rows - 1),
            row_entries=row_entries,
            row_weights=recv_w,
            row_masked=row_masked,
            token_rows=token_rows,
        )
        return received, handle

    def combine(self, expert_out: torch.Tensor, handle: Handle, masked: bool) -> torch.Tensor:
        """One row back per (token, rank) with this rank's weighted sum for that token; the
        source adds them up (FP32 for FP32 expert outputs, else BF16)."""
        assert (
            handle.row_entries is not None
            and handle.row_weights is not None
            and handle.token_rows is not None
        )
        if masked:
            if handle.row_masked is None:
                raise ValueError("masked combine needs a low-latency dispatch")
            source, positions = expert_out.reshape(-1, expert_out.shape[-1]), handle.row_masked
        else:
            source, positions = expert_out, handle.row_entries
        # One row per (token, rank): the weighted sum of this rank's experts for that token.
        out_dtype = torch.float32 if expert_out.dtype == torch.float32 else torch.bfloat16
        per_row = gather_sum(source, positions, handle.row_weights, out_dtype)
        return self.sum_back(per_row, handle, out_dtype)

    def sum_back(self, per_row: torch.Tensor, handle: Handle, out_dtype: torch.dtype) -> torch.Tensor:
        """Rows of one (token, rank) each back to the token's rank, where each token's rows are
        added up: [received rows, h] → [tokens, h]."""
        assert handle.token_rows is not None
        back = self.exchange(per_row, handle.recv_counts, handle.send_counts, len(handle.send_token))
        ones = torch.ones(handle.token_rows.shape, dtype=torch.float32, device=back.device)
        return gather_sum(back, handle.token_rows, ones, out_dtype)
