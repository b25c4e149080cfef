"""A `block_manager.KVTier` over blocks received from a prefill engine, in host memory.

The decode engine `put`s a transfer's blocks under its own chain keys for the prompt and then
adds the request: admission "hits" them as a prefix and loads them into GPU blocks, so only the
tail is computed. Received blocks are single-use (loading removes them) and bounded by a byte
capacity; keys not held here fall through to `inner` (the on-disk StoreTier), so one tier chain
serves both."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from fireflyer.workloads.serve.block_manager import KVTier
from fireflyer.workloads.serve.kv_tier import BlockCopier


class ReceivedTier:
    """Thread-safe: `put` may come from the thread that waited for the transfer while the engine
    loop calls lookup/load."""

    def __init__(
        self, copier: BlockCopier, inner: KVTier | None = None, *, capacity_bytes: int = 8 << 30
    ) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be ≥ 0, not {capacity_bytes}")
        self.copier = copier
        self.inner = inner
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        # Front = evicted first. Each put inserts its chain tail first, so under pressure a
        # transfer loses its tail before its head (a head alone still serves a prefix).
        self._blocks: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.loaded_blocks = 0
        self.evicted_blocks = 0  # dropped for capacity, never loaded
        self.discarded_blocks = 0

    @property
    def num_blocks(self) -> int:
        with self._lock:
            return len(self._blocks)

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._blocks

    def put(self, keys: Sequence[str], blocks: Sequence[torch.Tensor | None]) -> int:
        """Hold `blocks` (an `Expectation.wait` result) under `keys`, the chain keys of the same
        blocks; None entries are skipped. Evicts the oldest blocks as needed; of a put larger
        than the whole capacity only the leading blocks that fit are kept. Returns how many
        blocks are held."""
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys for {len(blocks)} blocks")
        fresh = [(k, b) for k, b in zip(keys, blocks, strict=True) if b is not None]
        kept: list[tuple[str, torch.Tensor]] = []
        budget = self.capacity_bytes
        for key, block in fresh:
            size = _nbytes(block)
            if size > budget:
                break
            budget -= size
            kept.append((key, block))
        with self._lock:
            for key, _ in kept:
                self._drop(key)
            need = sum(_nbytes(b) for _, b in kept)
            while self._blocks and self._bytes + need > self.capacity_bytes:
                _, old = self._blocks.popitem(last=False)
                self._bytes -= _nbytes(old)
                self.evicted_blocks += 1
            for key, block in reversed(kept):
                self._blocks[key] = block
                self._bytes += _nbytes(block)
        return len(kept)

    def discard(self, keys: Sequence[str]) -> int:
        """Drop the blocks of `keys` still here (the request finished or was admitted without
        them); returns how many were dropped."""
        with self._lock:
            dropped = sum(self._drop(key) for key in keys)
            self.discarded_blocks += dropped
        return dropped

    # -- KVTier --------------------------------------------------------------------------------

    def lookup(self, keys: list[str]) -> int:
        """Leading keys available from here or `inner`, in any interleaving: each run of keys
        held here, then the run up to the next such key asked of `inner`."""
        count = 0
        while count < len(keys):
            here = self._run_here(keys, count)
            count += here
            if count == len(keys):
                break
            end = self._next_here(keys, count)
            found = min(self.inner.lookup(keys[count:end]), end - count) if self.inner else 0
            count += found
            if count < end:
                break
        return count

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        """Write the leading blocks into `block_ids`: runs held here by the copier (and dropped:
        they are single-use), the others by `inner`. Stops at the first block neither has."""
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} blocks")
        count = 0
        while count < len(keys):
            with self._lock:
                run: list[torch.Tensor] = []
                while count + len(run) < len(keys) and keys[count + len(run)] in self._blocks:
                    run.append(self._blocks[keys[count + len(run)]])
                for key in keys[count : count + len(run)]:
                    self._drop(key)
            if run:
                self.copier.write_blocks(block_ids[count : count + len(run)], run)
                self.loaded_blocks += len(run)
                count += len(run)
                continue
            end = self._next_here(keys, count)
            filled = (
                min(self.inner.load(keys[count:end], block_ids[count:end]), end - count) if self.inner else 0
            )
            count += filled
            if count < end:
                break
        return count

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        """Evicted GPU blocks go to `inner`; this tier only holds what arrived."""
        if self.inner is not None:
            self.inner.save(keys, block_ids)

    # -- internals -----------------------------------------------------------------------------

    def _run_here(self, keys: list[str], start: int) -> int:
        with self._lock:
            count = 0
            while start + count < len(keys) and keys[start + count] in self._blocks:
                count += 1
            return count

    def _next_here(self, keys: list[str], start: int) -> int:
        """Index of the first key at or after `start` held here (len(keys) if none)."""
        with self._lock:
            return next((i for i in range(start, len(keys)) if keys[i] in self._blocks), len(keys))

    def _drop(self, key: str) -> bool:
        block = self._blocks.pop(key, None)
        if block is None:
            return False
        self._bytes -= _nbytes(block)
        return True


def _nbytes(block: torch.Tensor) -> int:
    return block.numel() * block.element_size()
