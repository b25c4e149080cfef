"""The second tier of the prefix cache: full blocks evicted from device memory go to a
`KVBlockStore` (3FS in production) and come back on a later prefix hit."""

from __future__ import annotations

from fireflyer.storage.kvcache import KVBlockStore
from fireflyer.workloads.serve.runner import ModelRunner


class StoreTier:
    """`block_manager.KVTier` over a KVBlockStore; blocks move as [tokens, layers, latent]."""

    def __init__(self, store: KVBlockStore, runner: ModelRunner) -> None:
        self.store = store
        self.runner = runner

    def lookup(self, keys: list[str]) -> int:
        present = self.store.contains(keys)
        return next((i for i, hit in enumerate(present) if not hit), len(keys))

    def load(self, keys: list[str], block_ids: list[int]) -> None:
        blocks = self.store.get(keys)
        missing = [k for k, b in zip(keys, blocks, strict=True) if b is None]
        if missing:  # evicted or corrupt since lookup: the block manager recomputes them
            raise KeyError(f"{len(missing)} KV blocks left the store after lookup")
        self.runner.write_blocks(block_ids, [b for b in blocks if b is not None])

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        self.store.put(keys, self.runner.read_blocks(block_ids))
