"""I/O engines: 3FS detection, the USRBIO path (through the binding's test double), POSIX."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fireflyer.storage import checkpoint, fs
from tests.storage.states import assert_same_state, training_state

DOUBLES = Path(__file__).resolve().parents[1] / "doubles"


@pytest.fixture
def usrbio(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(DOUBLES))
    sys.modules.pop("hf3fs_py_usrbio", None)
    import hf3fs_py_usrbio

    hf3fs_py_usrbio.CALLS.clear()
    yield hf3fs_py_usrbio
    sys.modules.pop("hf3fs_py_usrbio", None)


@pytest.fixture
def threefs_mount(tmp_path: Path) -> Path:
    """A directory shaped like a 3FS FUSE mount (its virtual directory with iovs/)."""
    (tmp_path / "3fs" / "3fs-virt" / "iovs").mkdir(parents=True)
    return tmp_path / "3fs"


def test_mount_detection_walks_up_from_paths_not_yet_created(threefs_mount: Path, tmp_path: Path) -> None:
    assert fs.find_threefs_mount(threefs_mount / "ckpt" / "not" / "yet") == threefs_mount
    assert fs.find_threefs_mount(tmp_path / "elsewhere") is None


def test_auto_uses_posix_without_the_binding(threefs_mount: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fs, "_import_usrbio", lambda: None)
    assert fs.open_fs(threefs_mount).engine == "posix"
    with pytest.raises(OSError, match="hf3fs-py-usrbio"):
        fs.open_fs(threefs_mount, engine="usrbio")


def test_usrbio_refused_off_3fs(usrbio: ModuleType, tmp_path: Path) -> None:
    assert fs.open_fs(tmp_path).engine == "posix"
    with pytest.raises(OSError, match="not on a 3FS mount"):
        fs.open_fs(tmp_path, engine="usrbio")


def test_checkpoint_through_usrbio(usrbio: ModuleType, threefs_mount: Path) -> None:
    directory = threefs_mount / "checkpoints"
    engine = fs.open_fs(directory)
    assert isinstance(engine, fs.UsrbioFileSystem)
    engine.block_bytes = 64 << 10  # small blocks so one file takes several batched submits
    state = training_state(3, scale=8)
    checkpoint.save(directory, state, 3, fs=engine)
    loaded = checkpoint.load_latest(directory, fs=engine)
    assert loaded is not None
    assert_same_state(loaded[1], state)
    # The bytes on disk are the same file a POSIX reader sees.
    posix_loaded = checkpoint.load_latest(directory, fs=fs.PosixFileSystem())
    assert posix_loaded is not None
    assert_same_state(posix_loaded[1], state)
    calls = usrbio.CALLS
    assert calls["register_fd"] == calls["deregister_fd"] > 0
    assert sum(calls[f"batch_{n}"] for n in range(2, 9)) > 0, "I/Os were not batched per submit"
    assert calls["prepare"] > calls["submit"]
    assert calls["force_fsync"] >= 1
    links = list((threefs_mount / "3fs-virt" / "iovs").iterdir())
    assert links, "iovecs are registered through links in the virtual directory"
    engine.close()
    assert not list((threefs_mount / "3fs-virt" / "iovs").iterdir())


def test_usrbio_reports_short_files(usrbio: ModuleType, threefs_mount: Path) -> None:
    engine = fs.open_fs(threefs_mount)
    path = threefs_mount / "short"
    path.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="short"):
        engine.read_into(path, 0, fs.aligned_buffer(200))
    engine.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("direct", [False, True])
def test_posix_engine_round_trip(tmp_path: Path, direct: bool) -> None:
    engine = fs.PosixFileSystem(threads=4, chunk_bytes=1 << 16, direct_reads=direct)
    parts = [memoryview(os.urandom(1000)), memoryview(os.urandom(300_001)), memoryview(b"")]
    path = tmp_path / "f"
    assert engine.write_file(path, parts, sync=True) == 301_001
    data = engine.read_file(path)
    assert bytes(data) == b"".join(bytes(p) for p in parts)
    out = fs.aligned_buffer(10)
    engine.read_into(path, 995, out)
    assert bytes(out) == bytes(parts[0][995:]) + bytes(parts[1][:5])
    with pytest.raises(OSError, match="file ends"):
        engine.read_into(path, 301_000, fs.aligned_buffer(2))


def test_tensor_views_over_read_buffers_are_aligned(tmp_path: Path) -> None:
    state = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.randn(5, dtype=torch.float64)}
    checkpoint.save(tmp_path, state, 1)
    loaded = checkpoint.load_latest(tmp_path)
    assert loaded is not None
    assert loaded[1]["b"].data_ptr() % 8 == 0
