"""KV-cache block store: prefix keys, round trip, LRU capacity, restarts, corruption, processes."""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from fireflyer.storage.kvcache import KVBlockStore, KVStoreError, chain_keys
from tests.storage.states import kv_block

LAYERS = 3
SHAPE = (16, LAYERS, 576)


def _store(root: Path, blocks: int = 100, dtype: torch.dtype = torch.bfloat16) -> KVBlockStore:
    element = torch.empty((), dtype=dtype).element_size()
    per_block = 16 * LAYERS * 576 * element + 64
    return KVBlockStore(root, layers=LAYERS, block_tokens=16, dtype=dtype, capacity_bytes=blocks * per_block)


def test_keys_chain_over_prefix_blocks() -> None:
    tokens = list(range(100))
    keys = chain_keys(tokens, 16)
    assert len(keys) == 6  # the partial last block has no key
    same_prefix = chain_keys([*tokens[:40], *range(900, 960)], 16)
    assert same_prefix[:2] == keys[:2] and same_prefix[2] != keys[2]
    # A later block's key depends on everything before it, not only on its own tokens.
    shifted = chain_keys([7] * 16 + tokens[16:32], 16)
    assert shifted[1] != keys[1]
    assert chain_keys(tokens, 16, namespace="other-model")[0] != keys[0]


def test_keys_continue_from_a_previous_key() -> None:
    tokens = list(range(1000, 1000 + 16 * 7 + 5))
    for namespace in ("", "model-a"):
        whole = chain_keys(tokens, 16, namespace)
        assert chain_keys(tokens[:16], 16, namespace) == whole[:1]
        for split in range(1, len(whole) + 1):
            rest = chain_keys(tokens[16 * split :], 16, namespace, previous=whole[split - 1])
            assert whole[:split] + rest == whole
        # Built up block by block, as a growing sequence's keys are.
        keys: list[str] = []
        for n in range(1, len(whole) + 1):
            keys += chain_keys(tokens[16 * (n - 1) : 16 * n], 16, namespace, keys[-1] if keys else None)
        assert keys == whole
    # The previous key already names the namespace; fewer tokens than a block give no key.
    assert chain_keys(tokens[16:32], 16, "other", previous=whole[0]) == whole[1:2]
    assert chain_keys(tokens[16:20], 16, previous=whole[0]) == []
    for bad in ("zz", "ab" * 8, "ab" * 17):
        with pytest.raises(ValueError, match="previous must be a chain key"):
            chain_keys(tokens, 16, previous=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_put_get_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    with _store(tmp_path, dtype=dtype) as store:
        keys = store.keys_for(list(range(16 * 5)))
        blocks = [kv_block(k, SHAPE, dtype) for k in keys]
        assert store.put(keys[:3], blocks[:3]) == 3
        assert store.put(keys, blocks) == 2  # the first three are already there
        assert store.contains([*keys, "0" * 32]) == [True] * 5 + [False]
        got = store.get([keys[4], "0" * 32, keys[0]])
        assert got[1] is None
        for block, key in ((got[0], keys[4]), (got[2], keys[0])):
            assert block is not None and block.dtype == dtype
            assert torch.equal(block.view(torch.uint8), kv_block(key, SHAPE, dtype).view(torch.uint8))


def test_wrong_block_shape_is_refused(tmp_path: Path) -> None:
    with _store(tmp_path) as store, pytest.raises(ValueError, match=r"\(16, 3, 576\)"):
        store.put(["a" * 32], [torch.zeros(16, 2, 576, dtype=torch.bfloat16)])


def test_capacity_evicts_least_recently_used(tmp_path: Path) -> None:
    with _store(tmp_path, blocks=3) as store:
        keys = store.keys_for(list(range(16 * 4)))
        store.put(keys[:3], [kv_block(k, SHAPE) for k in keys[:3]])
        time.sleep(0.01)
        assert store.get([keys[0]])[0] is not None  # keys[0] is now the most recent
        time.sleep(0.01)
        store.put(keys[3:], [kv_block(keys[3], SHAPE)])
        assert store.contains(keys) == [True, False, True, True]
        assert store.used_bytes() <= store.capacity_bytes
        assert not any((tmp_path / "blocks").glob(f"*/{keys[1]}.kv"))


def test_index_survives_restart_and_layout_is_checked(tmp_path: Path) -> None:
    keys = chain_keys(list(range(32)), 16)
    with _store(tmp_path) as store:
        store.put(keys, [kv_block(k, SHAPE) for k in keys])
    with _store(tmp_path) as reopened:
        assert reopened.contains(keys) == [True, True]
    with pytest.raises(KVStoreError, match="16x3x576"):
        KVBlockStore(tmp_path, layers=4, block_tokens=16, capacity_bytes=1 << 30)
    (tmp_path / "index.sqlite").unlink()
    for extra in tmp_path.glob("index.sqlite-*"):
        extra.unlink()
    with _store(tmp_path) as rebuilt:
        assert rebuilt.contains(keys) == [True, True]


def test_corrupt_block_is_a_logged_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _store(tmp_path) as store:
        keys = chain_keys(list(range(16)), 16)
        store.put(keys, [kv_block(keys[0], SHAPE)])
        path = next((tmp_path / "blocks").glob(f"*/{keys[0]}.kv"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING):
            assert store.get(keys) == [None]
        assert str(path) in caplog.text and "checksum" in caplog.text
        assert store.contains(keys) == [False] and not path.exists()
        assert store.stats.corrupt == 1


def _writer(root: str, seed: int, seconds: float) -> None:
    store = _store(Path(root), blocks=20)
    deadline = time.monotonic() + seconds
    rank = seed
    while time.monotonic() < deadline:
        keys = chain_keys(list(range(rank % 7, rank % 7 + 16 * 4)), 16)
        store.put(keys, [kv_block(k, SHAPE) for k in keys])
        rank += 3


def _reader(root: str, seconds: float, results: multiprocessing.Queue) -> None:
    store = _store(Path(root), blocks=20)
    deadline = time.monotonic() + seconds
    hits = wrong = 0
    rank = 0
    while time.monotonic() < deadline:
        keys = chain_keys(list(range(rank % 7, rank % 7 + 16 * 4)), 16)
        for key, block in zip(keys, store.get(keys), strict=True):
            if block is None:
                continue
            hits += 1
            wrong += not torch.equal(block, kv_block(key, SHAPE))
        rank += 1
    results.put((hits, wrong, store.stats.corrupt))


def test_concurrent_writers_and_readers_across_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fireflyer.storage.kvcache", "tests.storage.states"])
    _store(tmp_path, blocks=20).close()
    results = context.Queue()
    writers = [context.Process(target=_writer, args=(str(tmp_path), seed, 4.0)) for seed in range(3)]
    readers = [context.Process(target=_reader, args=(str(tmp_path), 4.0, results)) for _ in range(2)]
    for process in [*writers, *readers]:
        process.start()
    outcomes = [results.get(timeout=120) for _ in readers]
    for process in [*writers, *readers]:
        process.join(60)
        assert process.exitcode == 0
    assert sum(hits for hits, _, _ in outcomes) > 0
    assert [wrong for _, wrong, _ in outcomes] == [0, 0]
    assert [corrupt for _, _, corrupt in outcomes] == [0, 0]  # rename-publication: no torn reads
    with _store(tmp_path, blocks=20) as store:
        assert store.used_bytes() <= store.capacity_bytes
        on_disk = list((tmp_path / "blocks").glob("*/*.kv"))
        assert len(on_disk) == int(store._db().execute("SELECT COUNT(*) FROM blocks").fetchone()[0])
