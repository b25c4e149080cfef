"""A stand-in for DeepEP's Python package (`deep_ep`, the classic `Buffer` API) where it cannot be
installed: the same calls, arguments, shapes, dtypes and result tuples, computed with
torch.distributed collectives so it runs across CPU processes with gloo.

It covers what fireflyer's adapter uses — `get_dispatch_layout`, `dispatch`, `combine`,
`low_latency_dispatch`, `low_latency_combine` and the size hints — and keeps DeepEP's contract:
topk_idx is int64 with −1 for no expert; normal dispatch returns one row per (token, rank),
ordered by source rank then token, with the expert ids made local (−1 where the expert is
elsewhere); combine adds rows up without weights; low-latency dispatch returns the masked layout
[local experts, max tokens · ranks, hidden] (FP8 scales in a column-major view, as DeepEP gives
them for TMA) with per-expert counts, and low-latency combine applies the weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fireflyer.kernels.fp8 import quantize_per_token_group


class EventOverlap:
    def current_stream_wait(self) -> None:
        pass


class Config:
    def __init__(self, num_sms: int, *tuning: int) -> None:
        self.num_sms = num_sms
        self.tuning = tuning

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * num_ranks * 4096

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


def _exchange(send: torch.Tensor, send_counts: list[int], group: Any) -> tuple[torch.Tensor, list[int]]:
    counts = torch.tensor(send_counts, dtype=torch.long)
    recv_counts_t = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts_t, counts, group=group)
    recv_counts = recv_counts_t.tolist()
    as_bytes = send.dtype in (torch.float8_e4m3fn, torch.bfloat16)
    payload = send.contiguous().view(torch.uint8) if as_bytes else send.contiguous()
    out = torch.empty((sum(recv_counts), *payload.shape[1:]), dtype=payload.dtype)
    dist.all_to_all_single(out, payload, recv_counts, send_counts, group=group)
    return (out.view(send.dtype) if as_bytes else out), recv_counts


class Buffer:
    num_sms: int = 20

    def __init__(
        self,
        group: Any,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 12,
        allow_nvlink_for_low_latency_mode: bool = True,
    ) -> None:
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        if low_latency_mode:
            assert num_rdma_bytes > 0 and num_qps_per_rank > 0, "low-latency mode needs an RDMA buffer"
        else:
            assert num_nvl_bytes > 0, "normal mode needs an NVLink buffer"

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return max_tokens * hidden * 2 * num_experts * 2

    # -- normal mode ------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor, EventOverlap]:
        assert topk_idx.dtype == torch.int64
        local = num_experts // self.group_size
        dest = torch.where(topk_idx >= 0, topk_idx // local, -1)
        in_rank = (dest.unsqueeze(1) == torch.arange(self.group_size).view(1, -1, 1)).any(-1)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, EventOverlap()

    def dispatch(
        self,
        x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        handle: Any = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, list[int], Any, EventOverlap]:
        if handle is not None:
            raise NotImplementedError("the cached-layout dispatch is not part of this stand-in")
        assert num_tokens_per_rank is not None and is_token_in_rank is not None
        assert num_tokens_per_expert is not None and topk_idx is not None and topk_weights is not None
        tokens, scales = x if isinstance(x, tuple) else (x, None)
        if scales is None:
            assert tokens.dtype == torch.bfloat16
        else:
            assert tokens.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
            assert scales.shape == (tokens.shape[0], tokens.shape[1] // 128)
        num_experts = num_tokens_per_expert.numel()
        local = num_experts // self.group_size
        order = [torch.nonzero(is_token_in_rank[:, d]).flatten() for d in range(self.group_size)]
        send_token = torch.cat(order)
        send_counts = [len(o) for o in order]
        dest_of_row = torch.repeat_interleave(torch.arange(self.group_size), torch.tensor(send_counts))
        idx = topk_idx[send_token]
        here = (idx >= 0) & (idx // local == dest_of_row.unsqueeze(1))
        local_idx = torch.where(here, idx - dest_of_row.unsqueeze(1) * local, -1)
        recv_x, recv_counts = _exchange(tokens[send_token], send_counts, self.group)
        recv_idx, _ = _exchange(local_idx, send_counts, self.group)
        recv_w, _ = _exchange(topk_weights.float()[send_token], send_counts, self.group)
        per_expert = [int((recv_idx == e).sum()) for e in range(local)]
        recv: Any = recv_x
        if scales is not None:
            recv_scales, _ = _exchange(scales[send_token], send_counts, self.group)
            recv = (recv_x, recv_scales)
        new_handle = ("normal", send_token, send_counts, recv_counts, tokens.shape[0])
        return recv, recv_idx, recv_w, per_expert, new_handle, EventOverlap()

    def combine(
        self,
        x: torch.Tensor,
        handle: Any,
        topk_weights: torch.Tensor | None = None,
        config: Any = None,
        previous_event: Any = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, None, EventOverlap]:
        assert x.dtype == torch.bfloat16
        kind, send_token, _, recv_counts, num_tokens = handle
        assert kind == "normal" and x.shape[0] == sum(recv_counts)
        back, _ = _exchange(x, recv_counts, self.group)
        out = torch.zeros((num_tokens, x.shape[1]), dtype=torch.float32)
        out.index_add_(0, send_token, back.float())
        return out.to(torch.bfloat16), None, EventOverlap()

    # -- low-latency mode -------------------------------------------------------------------------

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_fp8: bool = True,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> tuple[Any, torch.Tensor, Any, EventOverlap, Any]:
        assert self.low_latency_mode and x.dtype == torch.bfloat16 and topk_idx.dtype == torch.int64
        assert x.shape[0] <= num_max_dispatch_tokens_per_rank
        world, hidden = self.group_size, x.shape[1]
        local = num_experts // world
        rows = num_max_dispatch_tokens_per_rank * world
        # One message per (token, expert), sent to the expert's rank.
        token, k = torch.nonzero(topk_idx >= 0, as_tuple=True)
        expert = topk_idx[token, k]
        order = torch.argsort(expert // local, stable=True)
        token, expert = token[order], expert[order]
        send_counts = torch.bincount(expert // local, minlength=world).tolist()
        meta = torch.stack([token, expert % local], 1)
        recv_x, recv_counts = _exchange(x[token], send_counts, self.group)
        recv_meta, _ = _exchange(meta, send_counts, self.group)
        source = torch.repeat_interleave(torch.arange(world), torch.tensor(recv_counts, dtype=torch.long))
        packed = torch.zeros((local, rows, hidden), dtype=torch.bfloat16)
        src_info = torch.full((local, rows, 2), -1, dtype=torch.long)  # (source rank, token)
        count = torch.zeros(local, dtype=torch.int32)
        for row in range(recv_x.shape[0]):
            e = int(recv_meta[row, 1])
            i = int(count[e])
            packed[e, i] = recv_x[row]
            src_info[e, i] = torch.stack([source[row], recv_meta[row, 0]])
            count[e] += 1
        handle = ("low_latency", src_info, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        if not use_fp8:
            return packed, count, handle, EventOverlap(), None
        q, s = quantize_per_token_group(packed.reshape(-1, hidden))
        scales = s.view(local, rows, -1).transpose(1, 2).contiguous().transpose(1, 2)  # column-major
        return (q.view(local, rows, hidden), scales), count, handle, EventOverlap(), None

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: Any,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Any]:
        kind, src_info, _, hidden, num_experts = handle
        assert kind == "low_latency" and x.dtype == torch.bfloat16
        assert x.shape == (*src_info.shape[:2], hidden)
        world = self.group_size
        local = num_experts // world
        e, i = torch.nonzero(src_info[:, :, 0] >= 0, as_tuple=True)
        source, token = src_info[e, i, 0], src_info[e, i, 1]
        order = torch.argsort(source, stable=True)
        e, i, source, token = e[order], i[order], source[order], token[order]
        send_counts = torch.bincount(source, minlength=world).tolist()
        slot = e + self.rank * local
        back, _ = _exchange(x[e, i], send_counts, self.group)
        back_meta, _ = _exchange(torch.stack([token, slot], 1), send_counts, self.group)
        combined = torch.zeros((topk_idx.shape[0], hidden), dtype=torch.float32)
        for row in range(back.shape[0]):
            t, s = int(back_meta[row, 0]), int(back_meta[row, 1])
            weight = topk_weights[t][topk_idx[t] == s].sum()
            combined[t] += back[row].float() * weight
        return combined.to(torch.bfloat16), EventOverlap(), None
