"""The on-disk format of `checkpoint`: names, constants, errors and the small durable-write
helpers that both the save and the load side use."""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "fireflyer.checkpoint/v1"
MANIFEST = "manifest.json"
CHECKSUM_CHUNK = 64 << 20
STEP_DIR = re.compile(r"^step-(\d{12})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on disk disagree with the manifest (checksum, size or header)."""


def step_dir(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step-{step:012d}"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def record_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def crc_chunks(view: memoryview) -> list[int]:
    return [
        zlib.crc32(view[start : start + CHECKSUM_CHUNK]) for start in range(0, view.nbytes, CHECKSUM_CHUNK)
    ]


def atomic_write_json(path: Path, document: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(temporary, "w") as handle:
        json.dump(document, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_rank(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
