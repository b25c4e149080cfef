"""Checkpoints: round trip, atomic publication, corruption, retention, async save, resharding."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from fireflyer.storage import checkpoint
from fireflyer.storage.checkpoint import CorruptCheckpointError
from tests.storage.states import assert_same_state, training_state


def test_round_trip_is_bit_exact_for_every_dtype(tmp_path: Path) -> None:
    state = training_state(7)
    checkpoint.save(tmp_path, state, 7)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    step, restored = loaded
    assert step == 7
    assert_same_state(restored, state)


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path: Path) -> None:
    assert checkpoint.load_latest(tmp_path / "absent") is None
    assert checkpoint.load_latest(tmp_path) is None


def test_shards_are_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int16), "h": torch.randn(2).bfloat16()}
    target = checkpoint.save(tmp_path, state, 1)
    read = safetensors_torch.load_file(str(target / checkpoint.shard_name(0, 1)))
    assert_same_state(read, state)


def test_checkpoint_without_manifest_is_ignored(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, training_state(1), 1)
    checkpoint.save(tmp_path, training_state(2), 2)
    (checkpoint.step_dir(tmp_path, 2) / checkpoint.MANIFEST).unlink()
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None and loaded[0] == 1
    assert_same_state(loaded[1], training_state(1))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_flipped_byte_is_detected_and_named(tmp_path: Path, where: str) -> None:
    target = checkpoint.save(tmp_path, training_state(3), 3)
    shard = target / checkpoint.shard_name(0, 1)
    size = shard.stat().st_size
    _flip_byte(shard, {"header": 20, "middle": size // 2, "last": size - 1}[where])
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(shard))):
        checkpoint.load_latest(tmp_path)


def test_corrupt_latest_falls_back_to_previous_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint.save(tmp_path, training_state(1), 1)
    target = checkpoint.save(tmp_path, training_state(2), 2)
    shard = target / checkpoint.shard_name(0, 1)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 10)
    with caplog.at_level(logging.WARNING):
        loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None and loaded[0] == 1
    assert str(shard) in caplog.text


def test_unreadable_manifest_is_named(tmp_path: Path) -> None:
    target = checkpoint.save(tmp_path, training_state(1), 1)
    (target / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json"):
        checkpoint.load_latest(tmp_path)


def test_saving_a_step_twice_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"x": torch.ones(2)}, 5)
    with pytest.raises(FileExistsError, match="step 5 is already saved"):
        checkpoint.save(tmp_path, {"x": torch.zeros(2)}, 5)


def test_keep_last_removes_older_and_incomplete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {"x": torch.full((4,), float(step))}, step)
    (checkpoint.step_dir(tmp_path, 4)).mkdir()  # a crashed save's leftovers
    (checkpoint.step_dir(tmp_path, 4) / "rank-00000.json").write_text("{}")
    checkpoint.save(tmp_path, {"x": torch.full((4,), 5.0)}, 5, keep_last=2)
    assert checkpoint.list_steps(tmp_path) == [3, 5]


def test_async_save_snapshots_before_returning(tmp_path: Path) -> None:
    weights = torch.zeros(1 << 20)
    pending = checkpoint.save_async(tmp_path, {"w": weights, "step": 1}, 1)
    weights.fill_(42.0)  # the caller keeps training while the save runs
    target = pending.wait()
    assert pending.done() and target == checkpoint.step_dir(tmp_path, 1)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert torch.count_nonzero(loaded[1]["w"]) == 0


def test_async_save_reports_errors_on_wait(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"x": torch.ones(1)}, 1)
    pending = checkpoint.save_async(tmp_path, {"x": torch.ones(1)}, 1)
    with pytest.raises(FileExistsError):
        pending.wait()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        checkpoint.save(tmp_path, {"x": torch.ones(1)}, 1, rank=2, world=2)
    with pytest.raises(KeyError, match="missing"):
        checkpoint.save(tmp_path, {"x": torch.ones(1)}, 1, shard_dims={"missing": 0})
    with pytest.raises(TypeError, match="opt/fn"):
        checkpoint.save(tmp_path, {"opt": {"fn": object()}}, 1)
    assert checkpoint.latest_step(tmp_path) is None


def _save_world(directory: Path, step: int, world: int, experts: torch.Tensor, shared: torch.Tensor) -> None:
    pieces = torch.tensor_split(experts, world, dim=0)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            state = {"experts": pieces[rank].clone(), "shared": shared.clone(), "step": step}
            checkpoint.save(directory, state, step, rank=rank, world=world, shard_dims={"experts": 0})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.mark.parametrize(("saved_world", "loaded_world"), [(4, 2), (2, 4), (4, 3), (3, 1), (2, 2)])
def test_resharding_round_trip(tmp_path: Path, saved_world: int, loaded_world: int) -> None:
    experts = torch.randn(12, 16, 8).bfloat16()  # 12 experts, EP-sharded on dim 0
    shared = torch.randn(16, 16)  # DP-replicated
    _save_world(tmp_path, 10, saved_world, experts, shared)
    manifest = json.loads((checkpoint.step_dir(tmp_path, 10) / checkpoint.MANIFEST).read_text())
    assert manifest["world"] == saved_world and manifest["tensors"]["experts"]["shape"] == [12, 16, 8]
    # Replicated tensors are written once, by rank 0.
    assert [p["rank"] for p in manifest["tensors"]["shared"]["pieces"]] == [0]
    expected = torch.tensor_split(experts, loaded_world, dim=0)
    for rank in range(loaded_world):
        loaded = checkpoint.load_latest(tmp_path, rank=rank, world=loaded_world)
        assert loaded is not None and loaded[0] == 10
        assert torch.equal(loaded[1]["experts"], expected[rank])
        assert torch.equal(loaded[1]["shared"], shared)
        assert loaded[1]["step"] == 10


def test_rank_zero_names_ranks_that_never_wrote(tmp_path: Path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match=r"rank-00001\.json"):
        checkpoint.save(tmp_path, {"x": torch.ones(1)}, 1, rank=0, world=2, wait_seconds=0.2)
    assert checkpoint.load_latest(tmp_path) is None


def test_no_temporary_files_survive_a_save(tmp_path: Path) -> None:
    target = checkpoint.save(tmp_path, training_state(1), 1)
    assert sorted(os.listdir(target)) == [
        "manifest.json",
        "rank-00000.json",
        "shard-00000-of-00001.safetensors",
    ]
