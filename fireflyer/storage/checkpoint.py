"""Crash-safe sharded checkpoints: one safetensors shard per rank, a manifest published last.

Layout of a checkpoint directory::

    DIR/step-000000000100/
        shard-00000-of-00002.safetensors   each rank's tensors (replicated tensors only in rank 0's)
        rank-00000.json                    that rank's record: offsets, shapes, CRC32 per 64 MiB chunk
        manifest.json                      written by rank 0 once every rank's record exists

Every file is written under a temporary name, synced, then renamed into place, and the manifest
comes last, so a checkpoint without a manifest is incomplete and a manifest only ever names
complete, synced shards. `load_latest` walks back from the newest manifest and skips a checkpoint
whose bytes fail their checksums (logging the file), so a crash at any moment leaves either the
new checkpoint or the previous one loadable.

Tensors named in `shard_dims` are split across ranks along that dimension (EP-sharded experts);
all others are replicated (DP) and written once, by rank 0. The manifest records every piece's
extent, so a load with a different world size assembles each rank's slice from the pieces it
overlaps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fireflyer.storage.checkpoint_format import (
    CHECKSUM_CHUNK,
    FORMAT,
    MANIFEST,
    CheckpointError,
    CorruptCheckpointError,
    atomic_write_json,
    check_rank,
    crc_chunks,
    record_name,
    shard_name,
    step_dir,
    sync_dir,
)
from fireflyer.storage.checkpoint_load import latest_step, list_steps, load, load_latest
from fireflyer.storage.fs import FileSystem, aligned_buffer, open_fs
from fireflyer.storage.safetensors_format import FileLayout, plan_layout, tensor_bytes
from fireflyer.storage.tree import flatten_state

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "CorruptCheckpointError",
    "PendingSave",
    "latest_step",
    "list_steps",
    "load",
    "load_latest",
    "save",
    "save_async",
    "shard_name",
    "step_dir",
]

log = logging.getLogger(__name__)

RECORD_WAIT_SECONDS = 600.0
VERIFY_THREADS = min(8, os.cpu_count() or 2)  # zlib.crc32 releases the GIL on large buffers


# ---------------------------------------------------------------------------------------------
# save


class _StagingBuffers:
    """Host buffers for async snapshots, reused from one save to the next.

    A fresh buffer costs a page fault per 4 KiB on first touch, which would double the time the
    caller waits; a reused one is already mapped, so the snapshot is a plain memory copy.
    """

    def __init__(self, keep: int = 2) -> None:
        self._free: list[memoryview] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> memoryview:
        with self._lock:
            for index, buffer in enumerate(self._free):
                if buffer.nbytes == nbytes:
                    return self._free.pop(index)
        return aligned_buffer(nbytes)

    def give_back(self, buffer: memoryview) -> None:
        with self._lock:
            self._free.insert(0, buffer)
            del self._free[self._keep :]


_staging = _StagingBuffers()


@dataclass
class _Snapshot:
    """One rank's tensors as host bytes, laid out as the shard file's data section."""

    layout: FileLayout
    data: list[memoryview]  # one view per layout entry, in layout order
    shard_dims: dict[str, int]
    paths: dict[str, list[str]]
    extra: list[dict[str, Any]]
    keepalive: list[Any]


def _snapshot(
    state_dict: Mapping[str, Any], rank: int, shard_dims: Mapping[str, int], *, copy: bool
) -> _Snapshot:
    tensors, extra = flatten_state(state_dict)
    unknown = sorted(set(shard_dims) - set(tensors))
    if unknown:
        raise KeyError(f"shard_dims names tensors not in the state dict: {', '.join(unknown)}")
    for name, dim in shard_dims.items():
        if not 0 <= dim < max(tensors[name][1].dim(), 1):
            raise ValueError(
                f"shard_dims[{name!r}] = {dim} is not a dimension of shape {tuple(tensors[name][1].shape)}"
            )
    # Replicated tensors are stored once, by rank 0.
    kept = {name: t for name, (_, t) in tensors.items() if rank == 0 or name in shard_dims}
    layout = plan_layout(kept, {"format": FORMAT})
    keepalive: list[Any] = []
    data: list[memoryview] = []
    if copy:
        # One host buffer for the whole data section: the background writer needs no further copy
        # and the caller may change its tensors as soon as this returns.
        body = _staging.take(layout.total_bytes - layout.data_start)
        keepalive.append(body)
        for entry in layout.entries:
            view = body[entry.begin : entry.end]
            if view.nbytes:
                target = torch.frombuffer(view, dtype=torch.uint8)
                source = kept[entry.name].detach().reshape(-1).contiguous().view(torch.uint8)
                target.copy_(source)
            data.append(view)
    else:
        for entry in layout.entries:
            tensor = kept[entry.name].detach().to("cpu").contiguous()
            keepalive.append(tensor)
            data.append(tensor_bytes(tensor))
    paths = {name: path for name, (path, _) in tensors.items() if name in kept}
    return _Snapshot(layout, data, dict(shard_dims), paths, extra if rank == 0 else [], keepalive)


def _write_rank(fs: FileSystem, target: Path, snapshot: _Snapshot, rank: int, world: int) -> None:
    shard = target / shard_name(rank, world)
    temporary = target / f".{shard.name}.tmp-{os.getpid()}"
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        pending_crcs = [pool.submit(crc_chunks, view) for view in snapshot.data]  # overlaps the write
        fs.write_file(temporary, [memoryview(snapshot.layout.header), *snapshot.data], sync=True)
        crcs = [future.result() for future in pending_crcs]
    os.replace(temporary, shard)
    tensors = {}
    for entry, crc in zip(snapshot.layout.entries, crcs, strict=True):
        tensors[entry.name] = {
            "path": snapshot.paths[entry.name],
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "shardDim": snapshot.shard_dims.get(entry.name),
            "offsets": [snapshot.layout.data_start + entry.begin, snapshot.layout.data_start + entry.end],
            "crc32": crc,
        }
    record = {
        "rank": rank,
        "file": shard.name,
        "bytes": snapshot.layout.total_bytes,
        "headerBytes": snapshot.layout.data_start,
        "headerCrc32": zlib.crc32(snapshot.layout.header),
        "checksumChunkBytes": CHECKSUM_CHUNK,
        "tensors": tensors,
        "extra": snapshot.extra,
    }
    atomic_write_json(target / record_name(rank), record)
    sync_dir(target)


def _merge_records(records: list[dict[str, Any]], step: int, world: int) -> dict[str, Any]:
    """The manifest: every tensor's global shape and the pieces that make it up."""
    tensors: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, info in record["tensors"].items():
            piece = {
                "rank": record["rank"],
                "offsets": info["offsets"],
                "crc32": info["crc32"],
                "extent": info["shape"][info["shardDim"]] if info["shardDim"] is not None else None,
            }
            merged = tensors.setdefault(
                name,
                {
                    "path": info["path"],
                    "dtype": info["dtype"],
                    "shape": list(info["shape"]),
                    "shardDim": info["shardDim"],
                    "pieces": [],
                },
            )
            if merged["dtype"] != info["dtype"] or merged["shardDim"] != info["shardDim"]:
                raise CheckpointError(f"tensor {name!r} differs in dtype or shard dim between ranks")
            merged["pieces"].append(piece)
    for name, merged in tensors.items():
        dim = merged["shardDim"]
        if dim is None:
            continue
        merged["pieces"].sort(key=lambda p: p["rank"])
        if len(merged["pieces"]) != world:
            raise CheckpointError(
                f"sharded tensor {name!r} was saved by {len(merged['pieces'])} of {world} ranks"
            )
        start = 0
        for piece in merged["pieces"]:
            piece["start"] = start
            start += piece["extent"]
        merged["shape"][dim] = start
    extra: list[dict[str, Any]] = next((r["extra"] for r in records if r["rank"] == 0), [])
    shards = [
        {
            "rank": r["rank"],
            "file": r["file"],
            "bytes": r["bytes"],
            "headerBytes": r["headerBytes"],
            "headerCrc32": r["headerCrc32"],
            "checksumChunkBytes": r["checksumChunkBytes"],
        }
        for r in sorted(records, key=lambda r: r["rank"])
    ]
    return {
        "format": FORMAT,
        "step": step,
        "world": world,
        "savedAt": time.time(),
        "shards": shards,
        "tensors": tensors,
        "extra": extra,
    }


def _publish(target: Path, step: int, world: int, wait_seconds: float) -> None:
    deadline = time.monotonic() + wait_seconds
    paths = [target / record_name(r) for r in range(world)]
    while True:
        missing = [p.name for p in paths if not p.exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{target}: ranks never wrote {', '.join(missing[:8])}")
        time.sleep(0.05)
    records = [json.loads(p.read_text()) for p in paths]
    atomic_write_json(target / MANIFEST, _merge_records(records, step, world))
    sync_dir(target)
    sync_dir(target.parent)


def _apply_retention(directory: Path, keep_last: int, current: int) -> None:
    steps = list_steps(directory)
    complete = [s for s in steps if (step_dir(directory, s) / MANIFEST).exists()]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    # Crash leftovers: incomplete checkpoints older than the one just published.
    doomed += [s for s in steps if s < current and s not in complete]
    for step in sorted(set(doomed)):
        path = step_dir(directory, step)
        # Manifest first: a deletion cut short leaves an incomplete checkpoint, never a broken one.
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def _save_snapshot(
    fs: FileSystem,
    directory: Path,
    snapshot: _Snapshot,
    step: int,
    rank: int,
    world: int,
    keep_last: int | None,
    wait_seconds: float,
) -> Path:
    target = step_dir(directory, step)
    target.mkdir(parents=True, exist_ok=True)
    if (target / MANIFEST).exists():
        raise FileExistsError(f"{target / MANIFEST}: step {step} is already saved")
    _write_rank(fs, target, snapshot, rank, world)
    if rank == 0:
        _publish(target, step, world, wait_seconds)
        if keep_last is not None:
            _apply_retention(directory, keep_last, step)
    return target


def _check_args(step: int, rank: int, world: int, keep_last: int | None) -> None:
    if step < 0:
        raise ValueError(f"step must be ≥ 0, not {step}")
    check_rank(rank, world)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be ≥ 1, not {keep_last}")


def save(
    directory: str | os.PathLike[str],
    state_dict: Mapping[str, Any],
    step: int,
    *,
    rank: int = 0,
    world: int = 1,
    shard_dims: Mapping[str, int] | None = None,
    keep_last: int | None = None,
    fs: FileSystem | None = None,
    wait_seconds: float = RECORD_WAIT_SECONDS,
) -> Path:
    """Write this rank's shard of checkpoint `step`; rank 0 also publishes the manifest.

    `state_dict` is a (nested) mapping of tensors; other JSON-serialisable leaves are kept in the
    manifest. Rank 0 waits up to `wait_seconds` for the other ranks' records.
    """
    _check_args(step, rank, world, keep_last)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    snapshot = _snapshot(state_dict, rank, shard_dims or {}, copy=False)
    return _save_snapshot(
        fs or open_fs(directory), directory, snapshot, step, rank, world, keep_last, wait_seconds
    )


class PendingSave:
    """A checkpoint being written in the background; `wait()` returns its directory or raises."""

    def __init__(self, run: Any) -> None:
        self._result: Path | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._body, args=(run,), name="checkpoint-save")
        self._thread.start()

    def _body(self, run: Any) -> None:
        try:
            self._result = run()
        except BaseException as error:  # surfaced by wait()
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Path:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("checkpoint save still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def save_async(
    directory: str | os.PathLike[str],
    state_dict: Mapping[str, Any],
    step: int,
    *,
    rank: int = 0,
    world: int = 1,
    shard_dims: Mapping[str, int] | None = None,
    keep_last: int | None = None,
    fs: FileSystem | None = None,
    wait_seconds: float = RECORD_WAIT_SECONDS,
) -> PendingSave:
    """Snapshot `state_dict` into host memory now, write it in the background.

    The caller may modify its tensors as soon as this returns. The writer thread is not a daemon:
    an exiting interpreter finishes the checkpoint first.
    """
    _check_args(step, rank, world, keep_last)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    snapshot = _snapshot(state_dict, rank, shard_dims or {}, copy=True)
    engine = fs or open_fs(directory)

    def write() -> Path:
        try:
            return _save_snapshot(engine, directory, snapshot, step, rank, world, keep_last, wait_seconds)
        finally:
            body = snapshot.keepalive[0]
            snapshot.data.clear()
            snapshot.keepalive.clear()
            _staging.give_back(body)

    return PendingSave(write)
