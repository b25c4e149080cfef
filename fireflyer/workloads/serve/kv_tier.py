"""The second tier of the prefix cache: full blocks evicted from device memory go to a
`KVBlockStore` (3FS in production) and come back on a later prefix hit."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from fireflyer.storage.kvcache import KVBlockStore

log = logging.getLogger(__name__)


class BlockCopier(Protocol):
    """What the tier needs of the model runner (`runner.ModelRunner` is one): copying whole KV
    blocks, each [tokens, layers, latent], out of and into the device cache."""

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]: ...

    def write_blocks(self, block_ids: list[int], blocks: list[torch.Tensor]) -> None: ...


class StoreTier:
    """`block_manager.KVTier` over a KVBlockStore; blocks move as [tokens, layers, latent]."""

    def __init__(self, store: KVBlockStore, runner: BlockCopier) -> None:
        self.store = store
        self.runner = runner

    def lookup(self, keys: list[str]) -> int:
        present = self.store.contains(keys)
        return next((i for i, hit in enumerate(present) if not hit), len(keys))

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        """Write the leading blocks of `keys` still in the store into `block_ids`; returns their
        count. A block gone since `lookup` (evicted by another process, or corrupt, which the
        store logs and drops) ends the run: the block manager has the rest recomputed."""
        if len(keys) != len(block_ids):
            raise ValueError(f"{len(keys)} keys for {len(block_ids)} blocks")
        blocks = self.store.get(keys)
        present: list[torch.Tensor] = []
        for block in blocks:
            if block is None:
                break
            present.append(block)
        if len(present) < len(keys):
            log.info(
                "KV block %d of %d left the store after lookup; loading %d, recomputing the rest",
                len(present) + 1,
                len(keys),
                len(present),
            )
        if present:
            self.runner.write_blocks(block_ids[: len(present)], present)
        return len(present)

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        self.store.put(keys, self.runner.read_blocks(block_ids))
