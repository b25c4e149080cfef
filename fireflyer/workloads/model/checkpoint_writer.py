"""Writing a checkpoint in Hugging Face's layout: safetensors shards streamed one tensor at a time,
the shard index, JSON files, all in a staging directory that replaces the target only once
complete.

A shard's header lists every tensor (name, dtype, shape) before any data, so it is written from
`StoredTensor`s known in advance and the tensors are streamed after it: only one is ever in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fireflyer.storage.safetensors_format import DTYPE_NAMES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

T = TypeVar("T")


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as it lands in a file: known before it is generated, so a shard's header can be
    written first and the data streamed after it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(items: Sequence[T], nbytes: Callable[[T], int], max_shard_bytes: int) -> list[list[T]]:
    """`items` packed in order into shards of at most max_shard_bytes (an item larger than that
    gets a shard of its own); an item (a weight and its scale, say) is never split."""
    shards: list[list[T]] = [[]]
    size = 0
    for item in items:
        item_bytes = nbytes(item)
        if shards[-1] and size + item_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item_bytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _safetensors_header(entries: list[StoredTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # The format pads the header with spaces so the data starts 8-byte aligned.
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(
    path: Path, entries: list[StoredTensor], tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Streams `tensors` (in the order of `entries`, matching them) into a safetensors file, so
    only one tensor is ever in memory."""
    header = _safetensors_header(entries)
    with path.open("wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        expected = iter(entries)
        for name, tensor in tensors:
            entry = next(expected, None)
            if entry != StoredTensor(name, tensor.dtype, tuple(tensor.shape)):
                raise RuntimeError(f"{name} {tensor.dtype} {tuple(tensor.shape)} is not the header's {entry}")
            # x86 and ARM are little-endian, the byte order safetensors stores.
            f.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        if next(expected, None) is not None:
            raise RuntimeError(f"{path.name}: fewer tensors than its header lists")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / INDEX_FILE, index)


# --- staging -------------------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--force replaces it)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "dir")
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory beside `out` that becomes `out` when the block succeeds. On an error it is
    removed; a killed process leaves only a hidden `.NAME.tmp-*` beside `out`, never a half `out`."""
    out = out.absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    # mkdtemp makes it private; a checkpoint is read by other users (the pods' own uid).
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        _fsync_dir(staging)
        _check_target(out, overwrite)
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
