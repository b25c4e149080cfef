"""The token shard format and the deterministic loader: the same (seed, step, rank, size) always
gives the same batch, ranks split a step's samples without overlap, an epoch visits every window
once, and a resumed loader continues where the checkpoint's sample count says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fireflyer.workloads.train.data import DataError, Loader, TokenShards, permute, write_shards

SEQ = 8


@pytest.fixture
def shards(tmp_path: Path) -> TokenShards:
    docs = [np.arange(100 * i, 100 * i + 50) for i in range(1, 8)]  # 7 docs of 50 (+ EOS)
    return TokenShards(write_shards(docs, tmp_path / "d", shard_tokens=64, eos_id=1))


def test_write_and_read_back(shards: TokenShards) -> None:
    index = json.loads((shards.directory / "index.json").read_text())
    assert index["format"] == "fireflyer.tokens/v1" and index["dtype"] == "uint32"
    assert index["documents"] == 7
    assert [s["tokens"] for s in index["shards"]] == [64, 64, 64, 64, 64, 37]
    assert shards.total == 7 * 51
    stream = np.concatenate([[*range(100 * i, 100 * i + 50), 1] for i in range(1, 8)])
    assert (shards.read(0, shards.total) == stream).all()
    assert (shards.read(60, 10) == stream[60:70]).all()  # across a shard boundary
    raw = np.fromfile(shards.directory / "shard-00000.bin", dtype="<u4")
    assert (raw == stream[:64]).all()  # flat little-endian uint32


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, seed=3, epoch=1)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert not (out == np.arange(n)).all()
        assert not (out == permute(np.arange(n), n, seed=3, epoch=2)).all()
        assert not (out == permute(np.arange(n), n, seed=4, epoch=1)).all()


def loader(shards: TokenShards, **kw: int) -> Loader:
    args = {"seq_len": SEQ, "micro_batch_size": 2, "micro_batches": 2, "seed": 5} | kw
    return Loader(shards, **args)


def test_batches_are_a_pure_function_of_the_step(shards: TokenShards) -> None:
    a, b = loader(shards), loader(shards)
    for step in (0, 1, 9, 50):
        assert (a.batch(step) == b.batch(step)).all()
    assert a.batch(0).shape == (2, 2, SEQ + 1)
    assert not (a.batch(0) == a.batch(1)).all()
    assert not (a.batch(0) == loader(shards, seed=6).batch(0)).all()


def test_windows_are_contiguous_tokens(shards: TokenShards) -> None:
    a = loader(shards)
    windows = a.window_of(a.sample_ids(3)).reshape(-1)
    rows = a.batch(3).reshape(-1, SEQ + 1)
    for w, row in zip(windows, rows, strict=True):
        assert (row == shards.read(int(w) * SEQ, SEQ + 1)).all()


def test_ranks_split_the_step_like_one_rank_with_more_micro_batches(shards: TokenShards) -> None:
    one = loader(shards, micro_batches=4)
    ranks = [loader(shards, micro_batches=2, dp_rank=r, dp_size=2) for r in range(2)]
    for step in (0, 7):
        together = np.concatenate([r.batch(step) for r in ranks])
        assert (together == one.batch(step)).all()
    ids = [set(r.sample_ids(0).reshape(-1).tolist()) for r in ranks]
    assert not ids[0] & ids[1]


def test_an_epoch_visits_every_window_once(shards: TokenShards) -> None:
    a = loader(shards, micro_batch_size=1, micro_batches=1)
    windows = [int(a.window_of(a.sample_ids(s))[0, 0]) for s in range(2 * a.windows)]
    assert sorted(windows[: a.windows]) == list(range(a.windows))
    assert sorted(windows[a.windows :]) == list(range(a.windows))
    assert windows[: a.windows] != windows[a.windows :]  # each epoch in its own order


def test_resume_continues_at_the_saved_sample_count(shards: TokenShards) -> None:
    first = loader(shards)  # global batch 4
    samples = first.first_sample(5)  # what a checkpoint after 5 steps records
    same = loader(shards, sample_offset=samples - 5 * 4)
    assert (same.batch(5) == first.batch(5)).all()
    # Resumed with a global batch of 8 (another rank): step 5 starts at the saved count.
    wider = [loader(shards, dp_rank=r, dp_size=2, sample_offset=samples - 5 * 8) for r in range(2)]
    expected = np.concatenate([first.batch(5), first.batch(6)])
    assert (np.concatenate([w.batch(5) for w in wider]) == expected).all()


def test_bad_directories_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"index\.json: not found"):
        TokenShards(tmp_path)
    empty = write_shards([], tmp_path / "empty")
    with pytest.raises(DataError, match="holds no tokens"):
        TokenShards(empty)
    short = TokenShards(write_shards([[5, 6, 7]], tmp_path / "short"))
    with pytest.raises(DataError, match="fewer than one sample of --seq-len 8"):
        Loader(short, seq_len=8, micro_batch_size=1, micro_batches=1)
    cut = write_shards([range(100)], tmp_path / "cut")
    (cut / "shard-00000.bin").write_bytes(b"\0" * 12)
    with pytest.raises(DataError, match="says 100 tokens, found 12 bytes"):
        TokenShards(cut)
    (cut / "index.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="format must be"):
        TokenShards(cut)
