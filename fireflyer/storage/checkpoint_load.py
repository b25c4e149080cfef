"""Loading `checkpoint`s: a rank's slice of every tensor, resharded when the world size changed,
each chunk verified against its checksum as it is read."""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fireflyer.storage.checkpoint_format import (
    FORMAT,
    MANIFEST,
    STEP_DIR,
    CheckpointError,
    CorruptCheckpointError,
    check_rank,
    step_dir,
)
from fireflyer.storage.fs import FileSystem, aligned_buffer, open_fs
from fireflyer.storage.safetensors_format import DTYPES_BY_NAME
from fireflyer.storage.tree import unflatten_state

log = logging.getLogger(__name__)

READ_THREADS = 8  # concurrent chunk reads keep the device queue full


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
    check_rank(rank, world)
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
