"""Expert-parallel dispatch and combine: tokens to the ranks that hold their top-k experts, and
the weighted expert outputs back.

One `Dispatcher` per EP group. Physical expert slots are split evenly over the ranks (slot s on
rank s // slots_per_rank, local expert s % slots_per_rank); `phy2log` (an ExpertPlacement's row
for one layer) says which logical expert each slot holds, so EPLB replicas take part. When an
expert has several replicas, a token goes to replica number (source rank mod replica count):
deterministic, and every replica gets an equal share of the ranks' traffic.

A token is sent once to each rank that holds any of its experts (as in DeepEP), with the list of
its local experts there and their weights; the receiver expands it into one row per (token,
local expert), grouped by expert. Combine reverses it: each rank sums the weighted outputs of its
local experts per token, sends one row back per (token, rank), and the source adds them up.

Modes:
- normal — exact-size buffers; the per-rank counts are exchanged first (one host sync). For
  prefill and training.
- low_latency — every rank sends `max_tokens_per_rank` rows to every rank (padding marked
  invalid), so all shapes are fixed: no host synchronisation, CUDA-graph capturable. Received
  tokens also come in a masked layout [local experts, capacity, hidden]. For decode.

Transports (one interface): `portable` — torch.distributed all_to_all_single (NCCL on GPU,
gloo on CPU; fireflyer.kernels.ep_portable); `nvlink` — every rank of the group on one node:
Triton kernels write rows straight into the peers' buffers over NVLink
(fireflyer.kernels.ep_nvlink); `official` — DeepEP's deep_ep.Buffer (fireflyer.kernels.ep_official);
`auto` (default) — official when deep_ep is installed and the group is on CUDA, else nvlink when
the group is on CUDA devices of one host that can reach each other, else portable.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

Mode = Literal["normal", "low_latency"]
Transport = Literal["auto", "portable", "nvlink", "official"]
Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
NO_EXPERT = -1


def gather_sum(
    src: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[r] = Σ_k weight[r, k] · src[pos[r, k]] (pos −1: nothing), accumulated in FP32."""
    if src.is_cuda and _triton_available():
        from fireflyer.kernels.ep_triton import gather_sum as fused

        return fused(src, pos, weight, out_dtype)
    out = torch.zeros((pos.shape[0], src.shape[1]), dtype=torch.float32, device=src.device)
    for k in range(pos.shape[1]):
        present = pos[:, k] >= 0
        rows = src[pos[:, k].clamp(min=0)].float()
        out += rows * (weight[:, k].float() * present).unsqueeze(1)
    return out.to(out_dtype)


_SHARED: dict[tuple[int, tuple[Any, ...]], tuple[Any, Any]] = {}


def _shared(group: Any, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """Transports hold large buffers set up collectively, so every Dispatcher of one group and
    shape shares one (there is a Dispatcher per MoE layer, and a new one per EPLB placement).
    Ranks create Dispatchers in the same order, so they agree on what is shared; the group object
    is kept so a new group never reuses an old one's entry."""
    entry = _SHARED.get((id(group), key))
    if entry is None or entry[0] is not group:
        entry = _SHARED[(id(group), key)] = (group, make())
    return entry[1]


@functools.cache
def _deep_ep_installed() -> bool:
    return importlib.util.find_spec("deep_ep") is not None


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def group_by_expert(
    local_expert: torch.Tensor, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Received rows' entries (row, k) grouped by local expert (−1: none there), rows in order
    within one expert. Returns each entry's flat (row · top_k + k) index, each (row, k)'s entry (−1 if
    none) and the entries per expert; reads the entry count on the host."""
    rows, top_k = local_expert.shape
    flat = local_expert.reshape(-1).long()
    key = torch.where(flat >= 0, flat, num_local)  # absent ones sort last and are cut off
    counts = torch.bincount(key, minlength=num_local + 1)
    order = torch.argsort(key, stable=True)[: int(flat.numel() - counts[-1])]
    row_entries = torch.full((rows, top_k), -1, dtype=torch.long, device=flat.device)
    row_entries.view(-1)[order] = torch.arange(len(order), device=flat.device)
    return order, row_entries, counts[:num_local]


@dataclass
class Layout:
    tokens_per_rank: torch.Tensor  # [world] tokens this rank sends to each rank (once per rank)
    tokens_per_expert: torch.Tensor  # [num_slots] (token, expert) pairs per physical slot
    token_in_rank: torch.Tensor  # [tokens, world] bool


@dataclass
class Handle:
    """What combine needs from dispatch."""

    num_tokens: int
    send_token: torch.Tensor  # [sent rows] source token of each sent row (-1: padding)
    send_counts: list[int] | None  # rows per destination (normal mode)
    recv_counts: list[int] | None  # rows per source (normal mode)
    recv_rows: int
    entry_row: torch.Tensor  # [entries] received row of each (token, local expert) entry, grouped
    entry_weight: torch.Tensor  # [entries] its top-k weight
    entry_valid: torch.Tensor  # [entries] bool (low-latency padding is invalid)
    masked_slot: torch.Tensor | None  # low-latency: [entries] position in [experts * capacity]
    row_entries: torch.Tensor | None = None  # [recv rows, k] entry of each (row, k), −1 if none
    row_weights: torch.Tensor | None = None  # [recv rows, k]
    row_masked: torch.Tensor | None = None  # low-latency: [recv rows, k] masked-layout position
    token_rows: torch.Tensor | None = None  # [tokens, world] row sent to each rank, −1 if none


@dataclass
class NvlinkHandle:
    """What combine needs from an NVLink dispatch. Self-contained: a later dispatch may reuse the
    receive buffer before this combine runs."""

    num_tokens: int
    send_pos: torch.Tensor  # [world, tokens] index among the tokens sent to each rank, −1 if not
    grouped_pos: torch.Tensor  # [world · capacity, k] entry of each received (row, k), −1 if none
    masked_pos: torch.Tensor | None  # low-latency: position in [experts · world · capacity]
    row_token: torch.Tensor  # [world · capacity] source token of each received row, −1 if empty
    row_weights: torch.Tensor  # [world · capacity, k]


@dataclass
class Received:
    x: torch.Tensor  # [entries, hidden] grouped by local expert (BF16, or FP8 with scales)
    scales: torch.Tensor | None  # [entries, hidden / 128] for an FP8 payload
    tokens_per_expert: torch.Tensor  # [local experts]
    masked_x: torch.Tensor | None = None  # low-latency: [local experts, capacity, hidden]
    masked_scales: torch.Tensor | None = None


class Dispatcher:
    def __init__(
        self,
        group: Any,
        hidden: int,
        max_tokens_per_rank: int,
        num_experts: int,
        phy2log: Sequence[int] | torch.Tensor | None = None,
        *,
        mode: Mode = "normal",
        transport: Transport = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        if transport not in ("auto", "portable", "nvlink", "official"):
            raise ValueError(
                f"unknown transport {transport!r}: use 'auto', 'portable', 'nvlink' or 'official'"
            )
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.hidden = hidden
        self.max_tokens = max_tokens_per_rank
        self.num_experts = num_experts
        self.mode = mode
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        slots = torch.arange(num_experts) if phy2log is None else torch.as_tensor(phy2log, dtype=torch.long)
        if slots.ndim != 1 or len(slots) % self.world:
            raise ValueError(f"{len(slots)} expert slots do not split evenly over {self.world} ranks")
        if slots.min() < 0 or slots.max() >= num_experts or len(torch.unique(slots)) != num_experts:
            raise ValueError("phy2log must name every logical expert at least once, and only those")
        self.num_slots = len(slots)
        self.local_experts = self.num_slots // self.world
        # logical expert → the slot a token from this rank uses (replica by source rank)
        choice = torch.empty(num_experts, dtype=torch.long)
        for expert in range(num_experts):
            replicas = torch.nonzero(slots == expert).flatten()
            choice[expert] = replicas[self.rank % len(replicas)]
        self.slot_of_expert = choice.to(self.device)
        self._nvlink: Any = None
        self._official: Any = None
        from fireflyer.kernels.ep_portable import PortableTransport

        self.portable = PortableTransport(
            group, self.world, max_tokens_per_rank, hidden, self.local_experts, mode == "low_latency"
        )
        group = group if group is not None else dist.group.WORLD
        shape = (max_tokens_per_rank, hidden, self.num_slots, str(self.device))
        official_auto = transport == "auto" and self.device.type == "cuda" and _deep_ep_installed()
        if transport == "official" or official_auto:
            if not _deep_ep_installed():
                raise ValueError("transport 'official' needs DeepEP's deep_ep package; it is not installed")
            from fireflyer.kernels.ep_official import OfficialTransport

            self._official = _shared(
                group,
                ("official", mode, *shape),
                lambda: OfficialTransport(
                    group, self.world, max_tokens_per_rank, hidden, self.num_slots, mode == "low_latency"
                ),
            )
        elif transport != "portable" and self._nvlink_usable(group, transport == "nvlink"):
            from fireflyer.kernels.ep_nvlink import NvlinkTransport

            self._nvlink = _shared(
                group,
                ("nvlink", *shape),
                lambda: NvlinkTransport(
                    group, self.world, self.rank, max_tokens_per_rank, hidden, self.local_experts, self.device
                ),
            )
        elif transport == "nvlink":
            raise ValueError("transport 'nvlink' needs every rank on one host with peer access between GPUs")
        self.transport = "official" if self._official else "nvlink" if self._nvlink else "portable"

    def _nvlink_usable(self, group: Any, required: bool) -> bool:
        if self.hidden % 128:  # rows move as 16-byte words, FP8 scales per 128 values
            if required:
                raise ValueError(f"transport 'nvlink' needs hidden divisible by 128, got {self.hidden}")
            return False
        return bool(_shared(group, ("reachable", str(self.device)), lambda: self._nvlink_reachable(required)))

    def _nvlink_reachable(self, required: bool) -> bool:
        """Whether every rank's GPU can write into every other's (one host, peer access). Ranks
        agree on the answer, as the buffers are set up collectively."""
        reason = ""
        if self.device.type != "cuda":
            reason = f"the device is {self.device}, not CUDA"
        elif not _triton_available():
            reason = "Triton is not installed"
        if reason:  # the same on every rank: nothing to agree on
            if required:
                raise ValueError(f"transport 'nvlink' is not available: {reason}")
            return False
        places: list[Any] = [None] * self.world
        dist.all_gather_object(places, (socket.gethostname(), self.device.index), group=self.group)
        hosts = {host for host, _ in places}
        peers_ok = all(
            index == self.device.index or torch.cuda.can_device_access_peer(self.device, index)
            for _, index in places
        )
        verdicts: list[Any] = [None] * self.world
        dist.all_gather_object(verdicts, len(hosts) == 1 and peers_ok, group=self.group)
        return all(verdicts)

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (token, k): physical slot and local expert on its rank (−1 for none), and
        hits[token, rank, k]: whether that choice lands on that rank."""
        valid = topk_idx >= 0
        slots = torch.where(valid, self.slot_of_expert[topk_idx.clamp(min=0)], NO_EXPERT)
        dest = torch.where(valid, slots // self.local_experts, NO_EXPERT)
        local = torch.where(valid, slots % self.local_experts, NO_EXPERT)
        ranks = torch.arange(self.world, device=topk_idx.device)
        hits = dest.unsqueeze(1) == ranks.view(1, -1, 1)
        return slots, local, hits

    def layout(self, topk_idx: torch.Tensor) -> Layout:
        slots, _, hits = self._route(topk_idx)
        token_in_rank = hits.any(-1)
        tokens_per_expert = torch.bincount(slots[slots >= 0], minlength=self.num_slots)
        return Layout(token_in_rank.sum(0), tokens_per_expert, token_in_rank)

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch(
        self, x: Payload, topk_idx: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[Received, Any]:
        """Returns the received tokens and the handle that combine needs (its type depends on
        the transport)."""
        tokens, scales = (x, None) if isinstance(x, torch.Tensor) else x
        num_tokens = topk_idx.shape[0]
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed max_tokens_per_rank={self.max_tokens}")
        if tokens.shape != (num_tokens, self.hidden):
            raise ValueError(f"x is {tuple(tokens.shape)}, expected ({num_tokens}, {self.hidden})")
        fp8 = tokens.dtype if tokens.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else None
        if fp8 is not None:
            if scales is None:
                raise ValueError("an FP8 payload needs its per-token 1×128 scales: pass (x_fp8, scales)")
            tokens = tokens.view(torch.uint8)  # moved and indexed as bytes
        handle: Any
        if self._official is not None:
            received, handle = self._official.dispatch(
                tokens, scales, fp8, topk_idx, topk_weights, self.slot_of_expert
            )
        elif self._nvlink is not None:
            received, handle = self._nvlink.dispatch(
                tokens, scales, topk_idx, topk_weights, self.slot_of_expert, self.mode == "low_latency"
            )
        else:
            received, handle = self.dispatch_portable(tokens, scales, topk_idx, topk_weights)
        if fp8 is not None:
            received.x = received.x.view(fp8)
            if received.masked_x is not None:
                received.masked_x = received.masked_x.view(fp8)
        return received, handle

    def dispatch_portable(
        self,
        tokens: torch.Tensor,
        scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> tuple[Received, Handle]:
        """Dispatch over the portable transport, whichever this Dispatcher uses (the
        differentiable pair, fireflyer.kernels.ep_autograd, runs its backward over it)."""
        _, local, hits = self._route(topk_idx)
        return self.portable.dispatch(tokens, scales, local, hits, topk_weights)

    # -- combine ---------------------------------------------------------------------------------

    def combine(self, expert_out: torch.Tensor, handle: Any, *, masked: bool = False) -> torch.Tensor:
        """Σ_k weight_k · expert_k(token), in BF16 (accumulated in FP32); the portable transport
        returns FP32 for FP32 expert outputs, so an FP32 model's results do not depend on the split.

        expert_out: [entries, hidden] in dispatch's grouped order, or with masked=True the
        low-latency masked layout [local experts, capacity, hidden].
        """
        if self._official is not None:
            return self._official.combine(expert_out, handle, masked)
        if isinstance(handle, NvlinkHandle):
            return self._nvlink.combine(expert_out, handle, masked)
        return self.portable.combine(expert_out, handle, masked)
