"""The intranode fast path of EP dispatch/combine: Triton kernels that write straight into the
peers' NVLink-mapped buffers (torch symmetric memory, no multicast).

Every rank owns, in symmetric memory:
- a receive buffer of world × max_tokens rows; source s writes its rows at [s · max_tokens + i],
  where i numbers the tokens s sends to this rank. A row is [meta | payload | scales]; meta
  holds, per top-k choice, the local expert here (−1 elsewhere), its weight (FP32 bits) and the
  token's rank among the source's tokens for that expert, then the source token index;
- a count table: per source, the rows it sent and its entries per local expert;
- a combine buffer of world × max_tokens BF16 rows: the rank holding the experts writes the
  weighted sum for source token t into the source's row [its rank · max_tokens + t].

Because each source numbers its own entries per expert, a receiver places every entry without
scanning: grouped position = (entries of earlier experts) + (entries of this expert from earlier
sources) + rank. Dispatch: routing kernel (on the source) → barrier → send kernel (each
(token, rank) row written once, into the peer) → barrier → offsets kernel → expand kernel (each
received row read once, written once per local expert). Combine: weighted sums written into the
sources' combine buffers → barrier → each source adds up its rows. The barrier that opens each
operation keeps a peer from overwriting rows still being read. Low-latency mode has no host
synchronisation and is CUDA-graph capturable; normal mode reads the entry count once to size its
output.

Peer addresses are passed as offsets from the local buffer in 64-byte units, so the compiler
still knows every row is 16-byte aligned and moves it with vector loads and stores.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import triton

from fireflyer.kernels.ep import NvlinkHandle, Received
from fireflyer.kernels.ep_nvlink_kernels import (
    ALIGN_BYTES,
    BLOCK_WORDS,
    ROUTE_SLOTS,
    ROUTE_TOKENS,
    SEND_BLOCK_WORDS,
    combine_reduce_kernel,
    combine_send_kernel,
    expand_kernel,
    offsets_kernel,
    route_kernel,
    send_kernel,
)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Symmetric:
    """One symmetric tensor and every peer's copy as an offset from ours, in ALIGN_BYTES units."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, group: Any) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, a no-op later
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.tensor = symm_mem.empty(numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.tensor, group)
        ptrs = list(self.handle.buffer_ptrs)
        mine = ptrs[self.handle.rank]
        deltas = [p - mine for p in ptrs]
        if any(delta % ALIGN_BYTES for delta in deltas):
            raise RuntimeError("symmetric buffers are not 64-byte aligned across ranks")
        units = [delta // ALIGN_BYTES for delta in deltas]
        self.peer_offsets = torch.tensor(units, dtype=torch.int64, device=device)
        self.unit = ALIGN_BYTES // self.tensor.element_size()


@dataclass
class Outgoing:
    """One rank's dispatch, routed and ready to send."""

    num_tokens: int
    top_k: int
    dtype: torch.dtype  # payload dtype as given (uint8 for FP8 bytes, or BF16)
    words: torch.Tensor  # payload as int32 words
    scale_words: torch.Tensor | None  # FP32 scales as int32 words
    weights: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor
    send_pos: torch.Tensor
    chunk_counts: torch.Tensor


class NvlinkTransport:
    """Buffers of one EP group on one node, and the kernels that use them.

    The buffers are symmetric memory; `symmetric(numel, dtype)` may supply something else with
    the same shape of answer (tensor, peer_offsets, unit, handle.barrier) — tests simulate a node's
    ranks in one process that way. dispatch = prepare, barrier, send, barrier, receive; combine =
    barrier, send back, barrier, reduce; the steps are public so such a simulation can interleave
    ranks."""

    def __init__(
        self,
        group: Any,
        world: int,
        rank: int,
        capacity: int,
        hidden: int,
        local_experts: int,
        device: torch.device,
        symmetric: Callable[[int, torch.dtype], Any] | None = None,
    ) -> None:
        self.world, self.rank = world, rank
        self.capacity, self.hidden, self.local_experts, self.device = capacity, hidden, local_experts, device
        if symmetric is None:
            pg = group if group is not None else dist.group.WORLD
            symmetric = functools.partial(_Symmetric, device=device, group=pg)
        self._symmetric = symmetric
        self.total_rows = world * capacity
        self.count_stride = _round_up(1 + local_experts, 16)
        self._combine = symmetric(self.total_rows * hidden, torch.bfloat16)
        self._counts = symmetric(world * self.count_stride, torch.int32)
        self._rows: Any = None
        self._top_k = 0
        self._entries_guess = 0  # normal mode: output rows to allocate before the count is read

    def _layout(self, top_k: int) -> tuple[int, int]:
        """Row layout for this top-k: meta words (16-byte aligned payload after them) and the
        row stride, sized for the largest payload (BF16 words, or FP8 words + scales)."""
        meta = _round_up(3 * top_k + 1, 4)
        return meta, _round_up(meta + self.hidden // 2 + self.hidden // 128, 16)

    def _receive_rows(self, top_k: int) -> Any:
        """Made on the first dispatch (all ranks dispatch together), again if top-k changes."""
        if self._rows is None or top_k != self._top_k:
            self._rows = self._symmetric(self.total_rows * self._layout(top_k)[1], torch.int32)
            self._top_k = top_k
        return self._rows

    def _barrier(self) -> None:
        self._counts.handle.barrier(channel=0)

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch(
        self,
        payload: torch.Tensor,
        scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_of_expert: torch.Tensor,
        low_latency: bool,
    ) -> tuple[Received, NvlinkHandle]:
        """payload: [tokens, hidden] as uint8 (FP8 bytes) or BF16; scales: FP32 [tokens, hidden/128]."""
        outgoing = self.prepare(payload, scales, topk_idx, topk_weights, slot_of_expert)
        self._barrier()  # peers are done reading what this dispatch overwrites
        self.send(outgoing)
        self._barrier()  # every peer's rows and counts have landed
        return self.receive(outgoing, low_latency)

    def prepare(
        self,
        payload: torch.Tensor,
        scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        slot_of_expert: torch.Tensor,
    ) -> Outgoing:
        """Routing (route kernel): per (token, k) its slot and rank among its chunk's tokens for
        that slot; per (rank, token) the token's index among its chunk's tokens sent there (−1:
        not sent); per chunk its entries per slot, then its rows per rank."""
        num_tokens, top_k = topk_idx.shape
        device = topk_idx.device
        num_slots = self.world * self.local_experts
        chunks = max(1, triton.cdiv(num_tokens, ROUTE_TOKENS))
        width = num_slots + self.world
        slots = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
        ranks = torch.empty((num_tokens, top_k), dtype=torch.int32, device=device)
        send_pos = torch.empty((self.world, num_tokens), dtype=torch.int32, device=device)
        chunk_counts = torch.empty((chunks, width), dtype=torch.int32, device=device)
        route_kernel[(triton.cdiv(num_slots, ROUTE_SLOTS) + 1, chunks)](
            topk_idx.contiguous(), slot_of_expert, slots, ranks, send_pos, chunk_counts, num_tokens, width,
            K=top_k, KP=_pow2(top_k), WORLD=self.world, WP=_pow2(self.world), LOCAL=self.local_experts,
            SLOTS=num_slots, SB=ROUTE_SLOTS, BT=ROUTE_TOKENS,
        )  # fmt: skip
        return Outgoing(
            num_tokens,
            top_k,
            payload.dtype,
            payload.contiguous().view(torch.int32),
            None if scales is None else scales.float().contiguous().view(torch.int32),
            topk_weights.float().contiguous(),
            slots,
            ranks,
            send_pos,
            chunk_counts,
        )

    def send(self, out: Outgoing) -> None:
        """Each (token, rank) row into that rank's buffer, and this rank's counts beside it."""
        receive = self._receive_rows(out.top_k)
        meta, stride = self._layout(out.top_k)
        chunks, chunk_stride = out.chunk_counts.shape
        scale_words = 0 if out.scale_words is None else out.scale_words.shape[1]
        send_kernel[(out.num_tokens + 1, self.world)](
            out.words, out.words if out.scale_words is None else out.scale_words, out.slots, out.weights,
            out.ranks, out.send_pos, out.chunk_counts,
            receive.tensor, receive.peer_offsets, self._counts.tensor, self._counts.peer_offsets,
            self.rank, self.capacity, out.num_tokens, chunks, stride, self.count_stride, chunk_stride,
            K=out.top_k, KP=_pow2(out.top_k), WORLD=self.world, LOCAL=self.local_experts,
            LP=_pow2(self.local_experts), SLOTS=self.world * self.local_experts, CHUNK=ROUTE_TOKENS,
            CP=max(2, _pow2(chunks)), META=meta, PAYLOAD=out.words.shape[1], SCALES=scale_words,
            BLOCK=SEND_BLOCK_WORDS, SBLOCK=_pow2(max(scale_words, 1)), ROW_UNIT=receive.unit,
            COUNT_UNIT=self._counts.unit, num_warps=8,
        )  # fmt: skip

    def receive(self, out: Outgoing, low_latency: bool) -> tuple[Received, NvlinkHandle]:
        """Received rows into the grouped layout (and the masked one in low-latency mode)."""
        receive = self._receive_rows(out.top_k)
        meta, stride = self._layout(out.top_k)
        device = out.words.device
        top_k, payload_words = out.top_k, out.words.shape[1]
        scale_words = 0 if out.scale_words is None else out.scale_words.shape[1]
        total = self.total_rows
        grouped_base = torch.empty((self.world, self.local_experts), dtype=torch.int32, device=device)
        masked_base = torch.empty_like(grouped_base)
        tokens_per_expert = torch.empty(self.local_experts, dtype=torch.int64, device=device)
        offsets_kernel[(1,)](
            self._counts.tensor, grouped_base, masked_base, tokens_per_expert, total, self.count_stride,
            WORLD=self.world, WP=_pow2(self.world), LOCAL=self.local_experts, LP=_pow2(self.local_experts),
        )  # fmt: skip
        masked_rows = self.local_experts * total if low_latency else 0

        def words_of(rows: int, width: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.empty((max(rows, 1), max(width, 1)), dtype=dtype, device=device)

        masked_x, masked_scales = words_of(masked_rows, payload_words), words_of(masked_rows, scale_words)
        grouped_pos = words_of(total, top_k)
        masked_pos = words_of(total, top_k) if low_latency else grouped_pos
        row_token = torch.empty(total, dtype=torch.int32, device=device)
        row_weights = words_of(total, top_k, torch.float32)
        expand = expand_kernel[(total, triton.cdiv(payload_words, BLOCK_WORDS))]

        def expand_into(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            out_x, out_scales = words_of(rows, payload_words), words_of(rows, scale_words)
            expand(
                receive.tensor, self._counts.tensor, grouped_base, masked_base, out_x, out_scales,
                masked_x, masked_scales, grouped_pos, masked_pos, row_token, row_weights,
                self.capacity, stride, self.count_stride, rows,
                K=top_k, LOCAL=self.local_experts, META=meta, PAYLOAD=payload_words, SCALES=scale_words,
                MASKED=low_latency, BLOCK=BLOCK_WORDS, SBLOCK=_pow2(max(scale_words, 1)),
            )  # fmt: skip
            return out_x, out_scales

        if low_latency:  # fixed shapes: rows past the counts unused, nothing waits for the host
            entries = total * top_k
            out_x, out_scales = expand_into(entries)
        else:
            # Normal mode returns exact sizes, so it reads the entry count (its one host
            # synchronisation). The output is sized from earlier calls, so the expansion is
            # queued before that read; it runs again, larger, only when the guess fell short.
            guess = self._entries_guess
            if guess:
                out_x, out_scales = expand_into(guess)
            entries = int(tokens_per_expert.sum())
            if entries > guess:
                out_x, out_scales = expand_into(entries)
            self._entries_guess = max(guess, entries + entries // 8)
        has_scales = out.scale_words is not None

        def as_payload(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[:n].view(out.dtype)

        def as_scales(t: torch.Tensor, n: int) -> torch.Tensor | None:
            return t[:n].view(torch.float32) if has_scales else None

        def by_expert(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None or not low_latency else t.view(self.local_experts, total, -1)

        received = Received(
            x=as_payload(out_x, entries),
            scales=as_scales(out_scales, entries),
            tokens_per_expert=tokens_per_expert,
            masked_x=by_expert(as_payload(masked_x, masked_rows)),
            masked_scales=by_expert(as_scales(masked_scales, masked_rows)),
        )
        handle = NvlinkHandle(
            out.num_tokens,
            out.send_pos,
            grouped_pos,
            masked_pos if low_latency else None,
            row_token,
            row_weights,
        )
        return received, handle

    # -- combine ---------------------------------------------------------------------------------

    def combine(self, expert_out: torch.Tensor, handle: NvlinkHandle, masked: bool) -> torch.Tensor:
        self._barrier()  # sources are done reading their combine buffers
        self.send_back(expert_out, handle, masked)
        self._barrier()  # every row of this rank's tokens has come back
        return self.reduce(handle)

    def send_back(self, expert_out: torch.Tensor, handle: NvlinkHandle, masked: bool) -> None:
        """Each received row's weighted sum over its local experts, into its source's buffer."""
        if masked:
            if handle.masked_pos is None:
                raise ValueError("masked combine needs a low-latency dispatch")
            source, positions = expert_out.reshape(-1, self.hidden), handle.masked_pos
        else:
            source, positions = expert_out, handle.grouped_pos
        source = source.to(torch.bfloat16).contiguous()
        combine_send_kernel[(self.total_rows, triton.cdiv(self.hidden, BLOCK_WORDS))](
            source, positions, handle.row_weights, handle.row_token, self._combine.tensor,
            self._combine.peer_offsets, self.rank, self.capacity, self.hidden,
            K=positions.shape[1], BLOCK=BLOCK_WORDS, UNIT=self._combine.unit,
        )  # fmt: skip

    def reduce(self, handle: NvlinkHandle) -> torch.Tensor:
        """Each token's rows from the ranks it went to, added up."""
        out = torch.empty(
            (handle.num_tokens, self.hidden), dtype=torch.bfloat16, device=handle.send_pos.device
        )
        if handle.num_tokens:
            combine_reduce_kernel[(handle.num_tokens, triton.cdiv(self.hidden, BLOCK_WORDS))](
                self._combine.tensor, handle.send_pos, out, self.capacity, self.hidden, handle.num_tokens,
                WORLD=self.world, BLOCK=BLOCK_WORDS,
            )  # fmt: skip
        return out
