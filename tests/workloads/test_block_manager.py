"""BlockManager: prefix hits, LRU eviction and revival, the KV tier protocol, bookkeeping."""

from __future__ import annotations

import pytest

from fireflyer.storage.kvcache import chain_keys
from fireflyer.workloads.serve.block_manager import BlockManager
from fireflyer.workloads.serve.types import SamplingParams, Sequence

B = 64


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(prompt_ids=list(tokens), params=SamplingParams())


def tokens(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


class FakeGPU:
    """What each GPU block holds: the chain key of the tokens whose KV was written there."""

    def __init__(self) -> None:
        self.content: dict[int, str] = {}

    def compute(self, bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
        """Run a step over [num_computed_tokens, upto) and commit, as the scheduler would."""
        upto = seq.num_tokens if upto is None else upto
        assert bm.ensure_capacity(seq, upto)
        keys = chain_keys(seq.token_ids[:upto], bm.block_tokens, bm.namespace)
        for i in range(seq.num_computed_tokens // bm.block_tokens, len(keys)):
            self.content[seq.block_table[i]] = keys[i]
        seq.num_computed_tokens = upto
        bm.commit_full_blocks(seq)


class MemoryTier:
    """An in-memory second tier that checks it saves and loads the right blocks."""

    def __init__(self, gpu: FakeGPU) -> None:
        self.gpu = gpu
        self.store: dict[str, str] = {}
        self.saves: list[tuple[list[str], list[int]]] = []
        self.loads: list[tuple[list[str], list[int]]] = []

    def lookup(self, keys: list[str]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.store:
            n += 1
        return n

    def load(self, keys: list[str], block_ids: list[int]) -> int:
        assert len(keys) == len(block_ids)
        self.loads.append((list(keys), list(block_ids)))
        filled = 0
        for key, block in zip(keys, block_ids, strict=True):
            if key not in self.store:  # left the tier since lookup: stop at the gap
                break
            self.gpu.content[block] = self.store[key]
            filled += 1
        return filled

    def save(self, keys: list[str], block_ids: list[int]) -> None:
        assert len(keys) == len(block_ids)
        self.saves.append((list(keys), list(block_ids)))
        for key, block in zip(keys, block_ids, strict=True):
            # Saved before the block is reused: it still holds what the key names.
            assert self.gpu.content[block] == key
            self.store[key] = self.gpu.content[block]


def admit_and_compute(bm: BlockManager, gpu: FakeGPU, seq: Sequence) -> None:
    assert bm.allocate(seq)
    gpu.compute(bm, seq)
    bm.check()


def test_prefix_hit_reuses_blocks_and_counts_tokens() -> None:
    bm, gpu = BlockManager(16), FakeGPU()
    a = make_seq(tokens(200))
    admit_and_compute(bm, gpu, a)
    assert a.num_cached_tokens == 0 and len(a.block_table) == 4
    assert bm.queried_tokens == 200 and bm.hit_tokens == 0

    b = make_seq(tokens(150) + [9999] * 30)
    assert bm.allocate(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == b.num_cached_tokens == 128
    assert bm.queried_tokens == 380 and bm.hit_tokens == 128 and bm.tier_hit_tokens == 0
    assert bm.num_used_blocks == 4  # shared, not copied
    bm.check()
    gpu.compute(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and len(b.block_table) == 3
    bm.check()
    bm.free(a)
    bm.free(b)
    assert b.block_table == [] and bm.num_used_blocks == 0 and bm.num_free_blocks == 16
    bm.check()


def test_namespace_is_part_of_the_keys() -> None:
    gpu = FakeGPU()
    tier = MemoryTier(gpu)
    writer = BlockManager(2, namespace="model-a", tier=tier)
    seq = make_seq(tokens(128))
    admit_and_compute(writer, gpu, seq)
    writer.free(seq)
    filler = make_seq(tokens(128, base=1000))
    admit_and_compute(writer, gpu, filler)  # evicts seq's two blocks into the tier
    assert [k for keys, _ in tier.saves for k in keys] == chain_keys(tokens(128), 64, "model-a")[::-1]

    other = BlockManager(4, namespace="model-b", tier=tier)
    assert other.allocate(make_seq(tokens(129))) and other.hit_tokens == 0
    same = BlockManager(4, namespace="model-a", tier=tier)
    assert same.allocate(make_seq(tokens(129))) and same.tier_hit_tokens == 128


@pytest.mark.parametrize(("length", "expected"), [(128, 64), (129, 128), (64, 0), (65, 64), (1, 0)])
def test_a_sequence_never_matches_its_whole_self(length: int, expected: int) -> None:
    bm, gpu = BlockManager(8), FakeGPU()
    admit_and_compute(bm, gpu, make_seq(tokens(300)))
    seq = make_seq(tokens(length))
    assert bm.allocate(seq)
    assert seq.num_computed_tokens == expected < seq.num_tokens
    bm.check()


def test_generated_tokens_are_cached_too() -> None:
    bm, gpu = BlockManager(8), FakeGPU()
    a = make_seq(tokens(60))
    assert bm.allocate(a)
    gpu.compute(bm, a)
    a.token_ids.extend([7, 8, 9, 10, 11])  # decode: KV of generated tokens completes block 0
    gpu.compute(bm, a, upto=64)
    bm.free(a)
    b = make_seq([*tokens(60), 7, 8, 9, 10, 11, 12])
    assert bm.allocate(b)
    assert b.num_cached_tokens == 64


def test_same_content_committed_twice_keeps_the_first_block() -> None:
    bm, gpu = BlockManager(8), FakeGPU()
    a, b = make_seq(tokens(130)), make_seq(tokens(130))
    assert bm.allocate(a) and bm.allocate(b)  # nothing cached yet: both compute everything
    gpu.compute(bm, a)
    gpu.compute(bm, b)
    bm.check()
    assert set(a.block_table).isdisjoint(b.block_table)
    bm.free(b)  # b's copies were never keyed: plain free blocks again
    assert bm.num_free_blocks == 8 - 3
    c = make_seq(tokens(130))
    assert bm.allocate(c)
    assert c.block_table == a.block_table[:2]
    bm.check()


def test_lru_evicts_the_tail_of_a_chain_first_and_a_hit_revives() -> None:
    bm, gpu = BlockManager(4), FakeGPU()
    a = make_seq(tokens(129))
    admit_and_compute(bm, gpu, a)  # blocks 0, 1 keyed, block 2 holds the 129th token
    a0, a1, a2 = a.block_table
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2

    # Never-keyed blocks go first: a2 (freed unkeyed) and the untouched one.
    b = make_seq(tokens(100, base=10_000))
    admit_and_compute(bm, gpu, b)
    assert a0 not in b.block_table and a1 not in b.block_table
    assert bm.evicted_blocks == 0

    # Then the least recently used cached block: the tail of a's chain.
    c = make_seq(tokens(10, base=20_000))
    admit_and_compute(bm, gpu, c)
    assert c.block_table == [a1] and bm.evicted_blocks == 1

    # The head is still cached and revives on a hit.
    d = make_seq(tokens(129))
    assert bm.allocate(d)
    assert d.block_table == [a0] and d.num_cached_tokens == 64
    assert bm.num_free_blocks == 0
    bm.check()
    assert a2 in b.block_table


def test_a_hit_moves_a_chain_to_the_back_of_the_lru() -> None:
    bm, gpu = BlockManager(4), FakeGPU()
    x, y = make_seq(tokens(65)), make_seq(tokens(65, base=5000))
    admit_and_compute(bm, gpu, x)  # block 0 keyed, block 1 holds the 65th token
    admit_and_compute(bm, gpu, y)
    x_block, y_block = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)  # LRU: x's keyed block, then y's
    x2 = make_seq(tokens(65))
    assert bm.allocate(x2) and x2.block_table == [x_block]
    bm.free(x2)  # x's block is now the most recently used
    z = make_seq(tokens(3 * 64, base=9000))
    assert bm.allocate(z, 3 * 64)  # the two unkeyed blocks, then one eviction
    assert y_block in z.block_table and x_block not in z.block_table
    assert bm.evicted_blocks == 1
    bm.check()


def test_allocate_fails_without_changing_anything() -> None:
    bm, gpu = BlockManager(4), FakeGPU()
    a = make_seq(tokens(129))
    admit_and_compute(bm, gpu, a)
    bm.free(a)
    big = make_seq(tokens(128) + tokens(300, base=7000))
    stats = (bm.queried_tokens, bm.hit_tokens, bm.num_free_blocks)
    # Hits 2 blocks; the first chunk of 300 tokens needs 5 more, 2 are left after the revival.
    assert not bm.allocate(big, 300)
    assert big.block_table == [] and big.num_computed_tokens == 0
    assert (bm.queried_tokens, bm.hit_tokens, bm.num_free_blocks) == stats
    bm.check()
    assert bm.allocate(big, 128)  # a chunk that fits
    assert big.num_computed_tokens == 128 and len(big.block_table) == 4
    # keep_free holds back blocks.
    bm.free(big)
    again = make_seq(tokens(129))
    assert not bm.allocate(again, 1, keep_free=2)  # 2 revived + 1 fresh leaves 1
    assert bm.allocate(again, 1, keep_free=1)
    bm.check()


def test_ensure_capacity_grows_or_changes_nothing() -> None:
    bm = BlockManager(3)
    seq = make_seq(tokens(10))
    assert bm.allocate(seq)
    assert seq.block_table == []
    assert bm.ensure_capacity(seq, 64) and len(seq.block_table) == 1
    assert bm.ensure_capacity(seq, 10) and len(seq.block_table) == 1
    assert not bm.ensure_capacity(seq, 4 * 64)
    assert len(seq.block_table) == 1 and bm.num_free_blocks == 2
    assert not bm.ensure_capacity(seq, 65, keep_free=2)
    assert bm.ensure_capacity(seq, 3 * 64) and bm.num_free_blocks == 0
    assert bm.usage == 1.0
    bm.check()
    with pytest.raises(ValueError, match="not allocated"):
        bm.ensure_capacity(make_seq([1]), 1)
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(seq)


def test_tier_saves_evicted_blocks_before_reuse_and_reloads_them() -> None:
    gpu = FakeGPU()
    tier = MemoryTier(gpu)
    bm = BlockManager(4, namespace="ns", tier=tier)
    a = make_seq(tokens(3 * 64 + 1))
    admit_and_compute(bm, gpu, a)
    keys = chain_keys(a.token_ids, 64, "ns")
    bm.free(a)
    assert tier.saves == []  # nothing evicted yet

    # An unrelated sequence needs all 4 blocks: one unkeyed, then the chain, tail first.
    b = make_seq(tokens(4 * 64, base=50_000))
    admit_and_compute(bm, gpu, b)
    assert len(tier.saves) == 1  # one batch per allocation
    saved_keys, _ = tier.saves[0]
    assert saved_keys == [keys[2], keys[1], keys[0]]
    bm.free(b)
    assert tier.lookup(keys) == 3

    # a's prefix is gone from the GPU (b's blocks are cached there now) but the tier has it.
    c = make_seq(tokens(3 * 64 + 5))
    assert bm.allocate(c)
    assert c.num_computed_tokens == c.num_cached_tokens == 192
    assert bm.tier_hit_tokens == 192 and bm.hit_tokens == 192
    assert tier.loads == [(keys, c.block_table)]
    assert [gpu.content[blk] for blk in c.block_table] == keys
    bm.check()

    # The loaded blocks are keyed: another sequence hits them on the GPU, not the tier.
    c_blocks = list(c.block_table)
    bm.free(c)
    loads = len(tier.loads)
    d = make_seq(tokens(2 * 64 + 1))
    assert bm.allocate(d)
    assert d.block_table == c_blocks[:2] and d.num_cached_tokens == 128
    assert len(tier.loads) == loads and bm.tier_hit_tokens == 192
    bm.check()


def test_tier_continues_a_gpu_hit() -> None:
    gpu = FakeGPU()
    tier = MemoryTier(gpu)
    bm = BlockManager(8, tier=tier)
    prompt = tokens(3 * 64 + 1)
    keys = chain_keys(prompt, 64)
    a = make_seq(prompt[:65])
    admit_and_compute(bm, gpu, a)  # block 0 on the GPU
    tier.store.update({k: k for k in keys})  # the tier holds all three
    seq = make_seq(prompt)
    assert bm.allocate(seq)
    assert seq.block_table[0] == a.block_table[0]
    assert tier.loads == [(keys[1:], seq.block_table[1:3])]
    assert seq.num_cached_tokens == 192 and bm.tier_hit_tokens == 128
    bm.check()


def test_tier_hits_are_loaded_as_far_as_blocks_allow() -> None:
    lookups: list[int] = []

    class CountingTier(MemoryTier):
        def lookup(self, keys: list[str]) -> int:
            lookups.append(len(keys))
            return super().lookup(keys)

    gpu = FakeGPU()
    tier = CountingTier(gpu)
    bm = BlockManager(3, tier=tier)
    prompt = tokens(5 * 64)
    keys = chain_keys(prompt, 64)
    tier.store.update({k: k for k in keys})
    seq = make_seq(prompt)
    # 4 tier hits and a block for the chunk would need 5 blocks: 2 hits and the chunk's fit.
    assert bm.allocate(seq, 64)
    assert tier.loads == [(keys[:2], seq.block_table[:2])] and len(seq.block_table) == 3
    assert seq.num_computed_tokens == 128 and bm.tier_hit_tokens == 128
    bm.check()
    # No block left for a chunk: the tier is not even asked.
    other = make_seq(prompt)
    assert not bm.allocate(other, 1)
    assert lookups == [4] and other.block_table == []
    bm.check()


def test_check_catches_broken_bookkeeping() -> None:
    bm = BlockManager(4)
    seq = make_seq(tokens(70))
    assert bm.allocate(seq, 70)
    seq.block_table.append(seq.block_table[0])
    with pytest.raises(AssertionError):
        bm.check()


class LosingTier(MemoryTier):
    """A tier whose blocks `lose` leave it right after a lookup (evicted by another process, or
    found corrupt), so the following load finds a gap."""

    def __init__(self, gpu: FakeGPU, lose: set[str]) -> None:
        super().__init__(gpu)
        self.lose = lose

    def lookup(self, keys: list[str]) -> int:
        n = super().lookup(keys)
        for key in self.lose:
            self.store.pop(key, None)
        return n


def test_a_block_lost_between_lookup_and_load_stops_the_hit_there() -> None:
    gpu = FakeGPU()
    prompt = tokens(4 * 64 + 10)
    keys = chain_keys(prompt, 64)
    tier = LosingTier(gpu, {keys[2]})
    tier.store.update({k: k for k in keys})
    bm = BlockManager(8, tier=tier)
    seq = make_seq(prompt)
    assert bm.allocate(seq)  # admitted, no exception
    assert tier.loads[0][0] == keys  # all four looked up and asked for
    assert seq.num_computed_tokens == seq.num_cached_tokens == 128
    assert bm.hit_tokens == bm.tier_hit_tokens == 128 and bm.queried_tokens == len(prompt)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6  # the two unfilled are free again
    assert [gpu.content[b] for b in seq.block_table] == keys[:2]
    assert bm.num_cached_blocks == 2
    bm.check()

    # The engine computes the rest as usual; keys[3] was loaded nowhere, so nothing past the gap
    # is keyed before its KV is computed.
    gpu.compute(bm, seq)
    assert [gpu.content[b] for b in seq.block_table[:4]] == keys
    assert bm.num_cached_blocks == 4
    bm.check()
    bm.free(seq)
    bm.check()
    assert bm.num_free_blocks == 8


def test_a_lost_block_gives_its_room_to_the_first_chunk() -> None:
    gpu = FakeGPU()
    prompt = tokens(6 * 64)
    keys = chain_keys(prompt, 64)
    tier = LosingTier(gpu, {keys[1]})
    tier.store.update({k: k for k in keys})
    bm = BlockManager(6, tier=tier)
    seq = make_seq(prompt)
    # Lookup says 5; 5 tier blocks and a 64-token chunk need 6 blocks. Only one loads, so the
    # chunk starts at token 64 and needs blocks 1 (an unfilled one, reused) and that's all.
    assert bm.allocate(seq, 64)
    assert len(tier.loads[0][0]) == 5
    assert seq.num_computed_tokens == 64 and bm.tier_hit_tokens == 64
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 4
    assert gpu.content[seq.block_table[0]] == keys[0]
    bm.check()
    gpu.compute(bm, seq, upto=128)
    assert gpu.content[seq.block_table[1]] == keys[1]
    bm.check()


def test_losing_the_first_tier_block_keeps_the_gpu_hit() -> None:
    gpu = FakeGPU()
    prompt = tokens(3 * 64 + 1)
    keys = chain_keys(prompt, 64)
    tier = LosingTier(gpu, {keys[1]})
    bm = BlockManager(8, tier=tier)
    a = make_seq(prompt[:65])
    admit_and_compute(bm, gpu, a)  # block 0 on the GPU
    tier.store.update({k: k for k in keys})
    seq = make_seq(prompt)
    assert bm.allocate(seq)
    assert tier.loads == [(keys[1:], tier.loads[0][1])]
    assert seq.block_table == a.block_table[:1]
    assert seq.num_cached_tokens == 64 and bm.hit_tokens == 64 and bm.tier_hit_tokens == 0
    assert bm.num_cached_blocks == 1 and bm.num_used_blocks == 2  # a's two blocks, shared head
    bm.check()
    gpu.compute(bm, seq)
    bm.check()


def test_keys_are_extended_not_rehashed() -> None:
    import fireflyer.workloads.serve.block_manager as module

    hashed: list[int] = []

    def counting_chain_keys(
        token_ids: list[int], block_tokens: int, namespace: str = "", previous: str | None = None
    ) -> list[str]:
        hashed.append(len(token_ids) // block_tokens)
        return chain_keys(token_ids, block_tokens, namespace, previous)

    bm, gpu = BlockManager(16, namespace="ns"), FakeGPU()
    seq = make_seq(tokens(100))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "chain_keys", counting_chain_keys)
        assert bm.allocate(seq)
        gpu.compute(bm, seq)
        for step in range(300):  # decode 300 tokens, one at a time
            seq.token_ids.append(5000 + step)
            gpu.compute(bm, seq, upto=seq.num_tokens - 1)
    full = (seq.num_tokens - 1) // 64
    assert sum(hashed) == full  # every block hashed once
    assert bm._keys[seq] == chain_keys(seq.token_ids, 64, "ns")[:full]
    bm.free(seq)
    again = make_seq(list(seq.token_ids))
    assert bm.allocate(again) and again.num_cached_tokens == full * 64
    bm.check()
