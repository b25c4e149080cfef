"""StoreTier against a real KVBlockStore: exact round trips, and blocks that leave the store
between lookup and load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fireflyer.storage.kvcache import KVBlockStore, chain_keys
from fireflyer.workloads.serve.block_manager import BlockManager
from fireflyer.workloads.serve.kv_tier import StoreTier
from fireflyer.workloads.serve.types import SamplingParams, Sequence

TOKENS, LAYERS, LATENT = 64, 2, 8
NUM_BLOCKS = 8


class FakeRunner:
    """The two methods of ModelRunner the tier uses, over a [blocks, tokens, layers, latent]
    tensor standing in for the device cache."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        bits = torch.randint(-(2**15), 2**15, (NUM_BLOCKS, TOKENS, LAYERS, LATENT), generator=generator)
        self.cache = bits.to(torch.int16).view(torch.bfloat16)  # every bit pattern, NaNs included
        self.writes: list[list[int]] = []

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        return [self.cache[b].clone() for b in block_ids]

    def write_blocks(self, block_ids: list[int], blocks: list[torch.Tensor]) -> None:
        assert len(block_ids) == len(blocks)
        self.writes.append(list(block_ids))
        for block, data in zip(block_ids, blocks, strict=True):
            self.cache[block] = data.to(self.cache.dtype)

    def bits(self, block: int) -> torch.Tensor:
        return self.cache[block].view(torch.int16).clone()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KVBlockStore]:
    with KVBlockStore(
        tmp_path, layers=LAYERS, block_tokens=TOKENS, latent_dim=LATENT, capacity_bytes=1 << 20
    ) as kv_store:
        yield kv_store


def block_file(store: KVBlockStore, key: str) -> Path:
    (path,) = store.root.glob(f"blocks/*/{key}.kv")
    return path


KEYS = chain_keys(list(range(4 * TOKENS)), TOKENS)


def test_save_lookup_load_round_trips_bytes(store: KVBlockStore) -> None:
    source, target = FakeRunner(seed=1), FakeRunner(seed=2)
    tier = StoreTier(store, source)
    tier.save(KEYS[:3], [5, 0, 3])
    assert tier.lookup(KEYS) == 3 and tier.lookup(KEYS[1:]) == 2 and tier.lookup(KEYS[3:]) == 0
    tier.runner = target
    assert tier.load(KEYS[:3], [1, 2, 7]) == 3
    for src, dst in ((5, 1), (0, 2), (3, 7)):
        assert torch.equal(target.bits(dst), source.bits(src))
    untouched = FakeRunner(seed=2)
    for block in (0, 3, 4, 5, 6):
        assert torch.equal(target.bits(block), untouched.bits(block))


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_a_block_gone_after_lookup_loads_a_partial_chain(store: KVBlockStore, damage: str) -> None:
    source, target = FakeRunner(seed=1), FakeRunner(seed=2)
    before = [target.bits(b) for b in range(NUM_BLOCKS)]
    tier = StoreTier(store, source)
    tier.save(KEYS, [0, 1, 2, 3])
    assert tier.lookup(KEYS) == 4
    path = block_file(store, KEYS[2])
    if damage == "deleted":
        path.unlink()  # evicted by another process
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    tier.runner = target
    assert tier.load(KEYS, [4, 5, 6, 7]) == 2  # no exception
    assert target.writes == [[4, 5]]  # only the leading present blocks are written
    assert torch.equal(target.bits(4), source.bits(0)) and torch.equal(target.bits(5), source.bits(1))
    for block in (6, 7):  # past the gap: untouched, although KEYS[3] is still stored
        assert torch.equal(target.bits(block), before[block])
    assert tier.lookup(KEYS) == 2  # the store forgot the lost block
    assert tier.load(KEYS[2:], [6, 7]) == 0


def test_block_manager_over_a_store_tier_recomputes_after_a_lost_block(store: KVBlockStore) -> None:
    source, runner = FakeRunner(seed=1), FakeRunner(seed=2)
    bm = BlockManager(NUM_BLOCKS, tier=StoreTier(store, runner))
    prompt = list(range(4 * TOKENS + 1))
    keys = chain_keys(prompt, TOKENS)
    store.put(keys, source.read_blocks([0, 1, 2, 3]))
    block_file(store, keys[1]).unlink()  # present in the index, gone on disk
    seq = Sequence(prompt_ids=prompt, params=SamplingParams())
    assert bm.allocate(seq)
    assert seq.num_computed_tokens == seq.num_cached_tokens == TOKENS
    assert bm.tier_hit_tokens == bm.hit_tokens == TOKENS
    assert len(seq.block_table) == 1 and bm.num_free_blocks == NUM_BLOCKS - 1
    assert torch.equal(runner.bits(seq.block_table[0]), source.bits(0))
    bm.check()
