"""The tier that installs KV blocks received from a prefill unit: each loaded once, gaps and
missing blocks, chaining into the inner tier, capacity, and the block manager's hits on them."""

from __future__ import annotations

import torch

from fireflyer.storage.kvcache import chain_keys
from fireflyer.workloads.serve.block_manager import BlockManager
from fireflyer.workloads.serve.kv_transfer import ReceivedTier
from fireflyer.workloads.serve.types import SamplingParams, Sequence
from tests.workloads.test_kv_transfer import BLOCK_BYTES, LATENT, LAYERS, TOKENS, random_blocks, same_bits


class FakeCopier:
    """The BlockCopier methods over a tensor standing in for the device cache."""

    def __init__(self, num_blocks: int = 16) -> None:
        self.cache = torch.zeros(num_blocks, TOKENS, LAYERS, LATENT, dtype=torch.bfloat16)
        self.writes: list[list[int]] = []

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        return [self.cache[b].clone() for b in block_ids]

    def write_blocks(self, block_ids: list[int], blocks: list[torch.Tensor]) -> None:
        self.writes.append(list(block_ids))
        for block_id, block in zip(block_ids, blocks, strict=True):
            self.cache[block_id] = block


class FakeInnerTier:
    """A KVTier holding blocks by key, recording calls."""

    def __init__(self, copier: FakeCopier, blocks: dict[str, torch.Tensor]) -> None:
        self.copier = copier
        self.blocks = dict(blocks)
        self.lookups: list[list[str]] = []
        self.loads: list[list[str]] = []
        self.saved: list[str] = []

    def lookup(self, keys: list[str]) -> int:
        self.lookups.append(list(keys))
        return next((i for i, k in enumerate(keys) if k not in self.blocks), len(keys))

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        self.loads.append(list(keys))
        count = self.lookup(keys)
        self.copier.write_blocks(block_ids[:count], [self.blocks[k] for k in keys[:count]])
        return count

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        self.saved.extend(keys)


KEYS = chain_keys(list(range(6 * TOKENS)), TOKENS)


def test_tier_loads_received_blocks_once() -> None:
    copier = FakeCopier()
    tier = ReceivedTier(copier)
    blocks = random_blocks(3, torch.bfloat16)
    assert tier.put(KEYS[:3], [blocks[0], blocks[1], blocks[2]]) == 3
    assert tier.num_bytes == 3 * BLOCK_BYTES
    assert tier.lookup(KEYS[:5]) == 3
    assert tier.load(KEYS[:3], [7, 8, 9]) == 3
    assert copier.writes == [[7, 8, 9]]
    assert all(same_bits(copier.cache[7 + i], blocks[i]) for i in range(3))
    assert tier.num_blocks == 0 and tier.num_bytes == 0 and tier.loaded_blocks == 3
    assert tier.lookup(KEYS[:3]) == 0  # single-use
    tier.save(KEYS[:1], [7])  # no inner: a no-op


def test_tier_skips_missing_blocks_and_stops_at_gaps() -> None:
    copier = FakeCopier()
    tier = ReceivedTier(copier)
    blocks = random_blocks(3, torch.bfloat16)
    assert tier.put(KEYS[:3], [blocks[0], None, blocks[2]]) == 2
    assert tier.lookup(KEYS[:3]) == 1
    assert tier.load(KEYS[:3], [1, 2, 3]) == 1
    assert copier.writes == [[1]]
    assert KEYS[2] in tier  # beyond the gap: still held until discarded
    assert tier.discard(KEYS[:3]) == 1 and tier.num_blocks == 0


def test_tier_chains_into_inner_in_any_interleaving() -> None:
    copier = FakeCopier()
    received = random_blocks(4, torch.bfloat16)
    stored = random_blocks(3, torch.bfloat16)  # another seed: other bits
    inner = FakeInnerTier(copier, {KEYS[2]: stored[0], KEYS[3]: stored[1], KEYS[5]: stored[2]})
    tier = ReceivedTier(copier, inner)
    tier.put([KEYS[0], KEYS[1], KEYS[4]], [received[0], received[1], received[2]])
    # here, here, inner, inner, here, inner
    assert tier.lookup(KEYS) == 6
    assert inner.lookups == [[KEYS[2], KEYS[3]], [KEYS[5]]]
    assert tier.load(KEYS, list(range(6))) == 6
    assert copier.writes == [[0, 1], [2, 3], [4], [5]]
    assert inner.loads == [[KEYS[2], KEYS[3]], [KEYS[5]]]
    assert same_bits(copier.cache[4], received[2]) and same_bits(copier.cache[5], stored[2])
    tier.save(KEYS[:2], [0, 1])
    assert inner.saved == KEYS[:2]


def test_tier_lookup_stops_where_neither_holds_a_key() -> None:
    copier = FakeCopier()
    inner = FakeInnerTier(copier, {KEYS[1]: random_blocks(1, torch.bfloat16)[0]})
    tier = ReceivedTier(copier, inner)
    tier.put([KEYS[0], KEYS[3]], random_blocks(2, torch.bfloat16))
    assert tier.lookup(KEYS[:5]) == 2  # KEYS[2] is nowhere: KEYS[3] cannot be used
    assert tier.load(KEYS[:5], [0, 1, 2, 3, 4]) == 2


def test_tier_capacity_evicts_oldest_transfer_tail_first() -> None:
    tier = ReceivedTier(FakeCopier(), capacity_bytes=4 * BLOCK_BYTES)
    tier.put(KEYS[:3], random_blocks(3, torch.bfloat16))
    other = chain_keys(list(range(1000, 1000 + 2 * TOKENS)), TOKENS)
    tier.put(other, random_blocks(2, torch.bfloat16))
    # One block had to go: the oldest transfer's tail, leaving its head usable.
    assert tier.evicted_blocks == 1 and tier.num_blocks == 4
    assert tier.lookup(KEYS[:3]) == 2 and tier.lookup(other) == 2
    big = chain_keys(list(range(5000, 5000 + 6 * TOKENS)), TOKENS)
    assert tier.put(big, random_blocks(6, torch.bfloat16)) == 4  # larger than capacity: its head
    assert tier.lookup(big) == 4 and tier.lookup(KEYS[:3]) == 0
    assert tier.num_bytes <= tier.capacity_bytes


def test_block_manager_hits_received_blocks_and_computes_the_tail() -> None:
    copier = FakeCopier()
    tier = ReceivedTier(copier)
    prompt = list(range(3 * TOKENS + 10))  # 3 full blocks and a tail of 10 tokens
    keys = chain_keys(prompt, TOKENS, namespace="decode")
    blocks = random_blocks(3, torch.bfloat16)
    tier.put(keys, blocks)
    manager = BlockManager(num_blocks=8, block_tokens=TOKENS, namespace="decode", tier=tier)
    seq = Sequence(prompt_ids=prompt, params=SamplingParams())
    assert manager.allocate(seq, token_budget=256)
    assert seq.num_cached_tokens == 3 * TOKENS  # only the 10-token tail is computed
    for i, block_id in enumerate(seq.block_table[:3]):
        assert same_bits(copier.cache[block_id], blocks[i])
    assert tier.num_blocks == 0
