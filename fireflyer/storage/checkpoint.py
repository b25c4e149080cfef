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
import re
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

from fireflyer.storage.fs import FileSystem, aligned_buffer, open_fs
from fireflyer.storage.safetensors_format import DTYPES_BY_NAME, FileLayout, plan_layout, tensor_bytes
from fireflyer.storage.tree import flatten_state, unflatten_state

log = logging.getLogger(__name__)

FORMAT = "fireflyer.checkpoint/v1"
MANIFEST = "manifest.json"
CHECKSUM_CHUNK = 64 << 20
STEP_DIR = re.compile(r"^step-(\d{12})$")
RECORD_WAIT_SECONDS = 600.0
VERIFY_THREADS = min(8, os.cpu_count() or 2)  # zlib.crc32 releases the GIL on large buffers
READ_THREADS = 8  # concurrent chunk reads keep the device queue full


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on disk disagree with the manifest (checksum, size or header)."""


def step_dir(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step-{step:012d}"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def _record_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _crc_chunks(view: memoryview) -> list[int]:
    return [
        zlib.crc32(view[start : start + CHECKSUM_CHUNK]) for start in range(0, view.nbytes, CHECKSUM_CHUNK)
    ]


def _atomic_write_json(path: Path, document: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(temporary, "w") as handle:
        json.dump(document, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        pending_crcs = [pool.submit(_crc_chunks, view) for view in snapshot.data]  # overlaps the write
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
    _atomic_write_json(target / _record_name(rank), record)
    _sync_dir(target)


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
    paths = [target / _record_name(r) for r in range(world)]
    while True:
        missing = [p.name for p in paths if not p.exists()]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise CheckpointError(f"{target}: ranks never wrote {', '.join(missing[:8])}")
        time.sleep(0.05)
    records = [json.loads(p.read_text()) for p in paths]
    _atomic_write_json(target / MANIFEST, _merge_records(records, step, world))
    _sync_dir(target)
    _sync_dir(target.parent)


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


def _check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")


def _check_args(step: int, rank: int, world: int, keep_last: int | None) -> None:
    if step < 0:
        raise ValueError(f"step must be ≥ 0, not {step}")
    _check_rank(rank, world)
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


# ---------------------------------------------------------------------------------------------
# load


def list_steps(directory: str | os.PathLike[str]) -> list[int]:
    """Steps with a checkpoint directory (complete or not), ascending."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(STEP_DIR.match, names) if m)


def _split(extent: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share when `extent` rows are split over `world` ranks."""
    base, remainder = divmod(extent, world)
    start = rank * base + min(rank, remainder)
    return start, start + base + (1 if rank < remainder else 0)


def _read_manifest(target: Path) -> dict[str, Any]:
    path = target / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path}: not a {FORMAT} manifest")
    return manifest


def _needed_pieces(info: dict[str, Any], rank: int, world: int) -> tuple[list[dict[str, Any]], int, int]:
    dim = info["shardDim"]
    if dim is None:
        return info["pieces"][:1], 0, 0
    start, stop = _split(info["shape"][dim], rank, world)
    return [p for p in info["pieces"] if p["start"] < stop and p["start"] + p["extent"] > start], start, stop


def load(
    directory: str | os.PathLike[str],
    step: int,
    *,
    rank: int = 0,
    world: int = 1,
    fs: FileSystem | None = None,
) -> dict[str, Any]:
    """This rank's state dict from checkpoint `step`, resharded when `world` differs from the save."""
    _check_rank(rank, world)
    target = step_dir(directory, step)
    manifest = _read_manifest(target)
    engine = fs or open_fs(target)
    shards = {s["rank"]: s for s in manifest["shards"]}
    plans = {name: _needed_pieces(info, rank, world) for name, info in manifest["tensors"].items()}
    wanted: dict[int, list[tuple[int, int]]] = {}
    for pieces, _, _ in plans.values():
        for piece in pieces:
            wanted.setdefault(piece["rank"], []).append(tuple(piece["offsets"]))
    buffers = {src: _prepare_shard(engine, target, shards[src], spans) for src, spans in wanted.items()}

    def piece_view(piece: dict[str, Any]) -> memoryview:
        base, body = buffers[piece["rank"]]
        lo, hi = piece["offsets"]
        return body[lo - base : hi - base]

    # Each task reads one checksum chunk and verifies it at once, so checksumming overlaps I/O.
    tasks = []
    for pieces, _, _ in plans.values():
        for piece in pieces:
            shard = shards[piece["rank"]]
            chunk = shard["checksumChunkBytes"]
            view = piece_view(piece)
            for index, begin in enumerate(range(0, view.nbytes, chunk)):
                offset = piece["offsets"][0] + begin
                part = view[begin : begin + chunk]
                tasks.append((target / shard["file"], offset, part, piece["crc32"][index]))
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for future in [pool.submit(_read_verified, engine, *task) for task in tasks]:
            future.result()
    out: list[tuple[list[str], Any]] = []
    for name, info in manifest["tensors"].items():
        pieces, start, stop = plans[name]
        parts = []
        for piece in pieces:
            shape = list(info["shape"])
            if info["shardDim"] is not None:
                shape[info["shardDim"]] = piece["extent"]
            tensor = _tensor_from(piece_view(piece), info["dtype"], shape)
            if info["shardDim"] is not None:
                dim = info["shardDim"]
                lo_row = max(start, piece["start"]) - piece["start"]
                hi_row = min(stop, piece["start"] + piece["extent"]) - piece["start"]
                if (lo_row, hi_row) != (0, piece["extent"]):
                    tensor = tensor.narrow(dim, lo_row, hi_row - lo_row)
            parts.append(tensor)
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=info["shardDim"])
        if not value.is_contiguous():
            value = value.contiguous()
        out.append((info["path"], value))
    return unflatten_state(out, manifest["extra"])


def _prepare_shard(
    engine: FileSystem, target: Path, shard: dict[str, Any], spans: list[tuple[int, int]]
) -> tuple[int, memoryview]:
    """(offset in the file, empty buffer covering `spans`) after checking size and header."""
    path = target / shard["file"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError as error:
        raise CorruptCheckpointError(f"{path}: shard named by the manifest is missing") from error
    if size != shard["bytes"]:
        raise CorruptCheckpointError(f"{path}: {size} bytes on disk, the manifest says {shard['bytes']}")
    header = aligned_buffer(shard["headerBytes"])
    engine.read_into(path, 0, header)
    if zlib.crc32(header) != shard["headerCrc32"]:
        raise CorruptCheckpointError(f"{path}: header checksum mismatch")
    lo = min(s for s, _ in spans)
    hi = max(e for _, e in spans)
    return lo, aligned_buffer(hi - lo)


def _read_verified(engine: FileSystem, path: Path, offset: int, view: memoryview, crc: int) -> None:
    engine.read_into(path, offset, view)
    if zlib.crc32(view) != crc:
        raise CorruptCheckpointError(f"{path}: checksum mismatch in bytes {offset}–{offset + view.nbytes}")


def _tensor_from(view: memoryview, dtype_name: str, shape: list[int]) -> torch.Tensor:
    dtype = DTYPES_BY_NAME[dtype_name]
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(view, dtype=dtype).reshape(shape)


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest step that has a manifest (not yet verified)."""
    complete = [s for s in list_steps(directory) if (step_dir(directory, s) / MANIFEST).exists()]
    return complete[-1] if complete else None


def load_latest(
    directory: str | os.PathLike[str],
    *,
    rank: int = 0,
    world: int = 1,
    fs: FileSystem | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """(step, state dict) of the newest checkpoint that loads intact; None when there is none.

    Incomplete checkpoints (no manifest) are ignored. A corrupt one is skipped with a warning that
    names the file; when every complete checkpoint is corrupt, the newest one's error is raised.
    """
    errors: list[CheckpointError] = []
    for step in reversed(list_steps(directory)):
        if not (step_dir(directory, step) / MANIFEST).exists():
            continue
        try:
            return step, load(directory, step, rank=rank, world=world, fs=fs)
        except CorruptCheckpointError as error:
            log.warning("skipping checkpoint step %d: %s", step, error)
            errors.append(error)
    if errors:
        raise errors[0]
    return None
