"""A KV-cache block store on 3FS (or any POSIX path), shared by processes on many hosts.

A block holds the MLA latent cache of `block_tokens` tokens for every layer ([tokens, layers,
576], BF16 or FP8). Blocks are keyed by a hash chain over token-prefix blocks, so a key names the
whole prefix up to and including its block: two requests that share a prefix share its blocks.

Crash and concurrency safety:
- a block is written under a temporary name and published by rename, so readers see a whole file
  or none; each file carries its key, shape and a CRC32 that readers check (a torn or flipped
  block is a miss, logged with its file name, and removed);
- the index is SQLite (WAL) beside the blocks: it survives restarts, serialises writers across
  processes, and orders blocks by last use for LRU eviction under `capacity_bytes`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fireflyer.storage.fs import aligned_buffer

log = logging.getLogger(__name__)

LATENT_DIM = 576  # MLA: 512 latent + 64 rope
MAGIC = b"FFKVBLK1"
HEADER = struct.Struct("<8s16sBxxxIIIQI")
DTYPE_CODES = {torch.bfloat16: 1, torch.float8_e4m3fn: 2}
DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}


class KVStoreError(RuntimeError):
    """A store that cannot be opened as asked (the message says why)."""


def chain_keys(
    token_ids: Sequence[int], block_tokens: int, namespace: str = "", previous: str | None = None
) -> list[str]:
    """One key per full block of `token_ids`; key i hashes key i-1 and block i's tokens.

    The chain starts from a hash of `namespace`, or, when `previous` is given, from that key: the
    hex key of the block just before `token_ids`'s first block. So a caller holding a sequence's
    keys extends them with the next blocks' tokens alone, getting the keys a whole-chain call
    would (`namespace` is then unused: `previous` already commits to it)."""
    if previous is None:
        state = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    else:
        try:
            state = bytes.fromhex(previous)
        except ValueError:
            state = b""
        if len(state) != 16:
            raise ValueError(f"previous must be a chain key (32 hex digits), not {previous!r}")
    keys = []
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        block = struct.pack(f"<{block_tokens}q", *token_ids[start : start + block_tokens])
        state = hashlib.blake2b(state + block, digest_size=16).digest()
        keys.append(state.hex())
    return keys


@dataclass
class StoreStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0


class KVBlockStore:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        layers: int,
        block_tokens: int = 64,
        latent_dim: int = LATENT_DIM,
        dtype: torch.dtype = torch.bfloat16,
        capacity_bytes: int,
        namespace: str = "",
        threads: int = 8,
        durable: bool = False,
    ) -> None:
        if dtype not in DTYPE_CODES:
            raise KVStoreError(f"dtype must be torch.bfloat16 or torch.float8_e4m3fn, not {dtype}")
        if min(layers, block_tokens, latent_dim) < 1:
            raise KVStoreError("layers, block_tokens and latent_dim must be ≥ 1")
        self.root = Path(root)
        self.shape = (block_tokens, layers, latent_dim)
        self.dtype = dtype
        self.block_bytes = block_tokens * layers * latent_dim * torch.empty((), dtype=dtype).element_size()
        if capacity_bytes < self.block_bytes:
            raise KVStoreError(
                f"capacity_bytes {capacity_bytes} is below one block ({self.block_bytes} bytes)"
            )
        self.capacity_bytes = capacity_bytes
        self.namespace = namespace
        self.durable = durable
        self.stats = StoreStats()
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvstore")
        self._local = threading.local()
        self._open_index()
        self._sweep_temporaries()

    def _sweep_temporaries(self, older_than_seconds: float = 3600.0) -> None:
        """Remove staging files that writers killed mid-write left behind."""
        cutoff = time.time() - older_than_seconds
        for path in (self.root / "tmp").iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass

    # -- index ---------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "db", None)
        if connection is None:
            connection = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.db = connection
        return connection

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _open_index(self) -> None:
        layout = f"{self.shape[0]}x{self.shape[1]}x{self.shape[2]}:{DTYPE_CODES[self.dtype]}"
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS blocks"
                " (key TEXT PRIMARY KEY, bytes INTEGER NOT NULL, used REAL NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS blocks_by_use ON blocks (used)")
            row = db.execute("SELECT value FROM meta WHERE name = 'layout'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('layout', ?)", (layout,))
                rebuild = True
            elif row[0] != layout:
                raise KVStoreError(
                    f"{self.root}: holds blocks of layout {row[0]} (tokens x layers x dim:dtype),"
                    f" asked for {layout}"
                )
            else:
                rebuild = False
        if rebuild:
            self.rebuild_index()

    def rebuild_index(self) -> int:
        """Index every block file on disk (after the index was lost); returns the count."""
        rows = []
        for path in (self.root / "blocks").glob("*/*.kv"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            rows.append((path.stem, stat.st_size, stat.st_mtime))
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?)", rows)
        return len(rows)

    def _path(self, key: str) -> Path:
        return self.root / "blocks" / key[:2] / f"{key}.kv"

    # -- public API ----------------------------------------------------------------------------

    def keys_for(self, token_ids: Sequence[int]) -> list[str]:
        return chain_keys(token_ids, self.shape[0], self.namespace)

    def contains(self, keys: Sequence[str]) -> list[bool]:
        present = self._present(keys)
        return [key in present for key in keys]

    def _present(self, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            batch = unique[start : start + 500]
            marks = ",".join("?" * len(batch))
            rows = self._db().execute(f"SELECT key FROM blocks WHERE key IN ({marks})", batch).fetchall()
            found.update(row[0] for row in rows)
        return found

    def used_bytes(self) -> int:
        return int(self._db().execute("SELECT COALESCE(SUM(bytes), 0) FROM blocks").fetchone()[0])

    def put(self, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> int:
        """Store the blocks not yet present; returns how many were written."""
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys for {len(blocks)} blocks")
        present = self._present(keys)
        todo = {}
        for key, block in zip(keys, blocks, strict=True):
            if key in present or key in todo:
                continue
            if tuple(block.shape) != self.shape or block.dtype != self.dtype:
                raise ValueError(
                    f"block for {key} is {tuple(block.shape)} {block.dtype},"
                    f" the store holds {self.shape} {self.dtype}"
                )
            todo[key] = block
        staged = list(self._pool.map(lambda item: (item[0], self._stage(*item)), todo.items()))
        now = time.time()
        with self._write() as db:
            for key, temporary in staged:
                final = self._path(key)
                final.parent.mkdir(exist_ok=True)
                os.replace(temporary, final)
                db.execute(
                    "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)",
                    (key, HEADER.size + self.block_bytes, now),
                )
            self._evict(db)
        return len(staged)

    def _stage(self, key: str, block: torch.Tensor) -> Path:
        payload: Any = block.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        header = HEADER.pack(
            MAGIC,
            bytes.fromhex(key),
            DTYPE_CODES[self.dtype],
            *self.shape,
            payload.nbytes,
            zlib.crc32(payload),
        )
        temporary = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with open(temporary, "wb") as handle:
            handle.write(header)
            handle.write(memoryview(payload))
            if self.durable:
                handle.flush()
                os.fsync(handle.fileno())
        return temporary

    def _evict(self, db: sqlite3.Connection) -> None:
        used = int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM blocks").fetchone()[0])
        if used <= self.capacity_bytes:
            return
        victims = []
        for key, size in db.execute("SELECT key, bytes FROM blocks ORDER BY used ASC, key ASC"):
            if used <= self.capacity_bytes:
                break
            victims.append(key)
            used -= size
        db.executemany("DELETE FROM blocks WHERE key = ?", [(k,) for k in victims])
        for key in victims:
            self._path(key).unlink(missing_ok=True)
        self.stats.evicted += len(victims)

    def get(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """The blocks for `keys` (None for a miss); hits become the most recently used."""
        present = self._present(keys)
        results = list(self._pool.map(lambda k: self._read(k) if k in present else None, keys))
        hits = [k for k, block in zip(keys, results, strict=True) if block is not None]
        lost = [k for k, block in zip(keys, results, strict=True) if block is None and k in present]
        self.stats.hits += len(hits)
        self.stats.misses += len(keys) - len(hits)
        if hits or lost:
            now = time.time()
            with self._write() as db:
                db.executemany("UPDATE blocks SET used = ? WHERE key = ?", [(now, k) for k in hits])
                # A writer may have published the block again since the read failed (publication
                # happens under this same lock): only a block still absent loses its row.
                gone = [(k,) for k in lost if not self._path(k).exists()]
                db.executemany("DELETE FROM blocks WHERE key = ?", gone)
        return results

    def _read(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as handle:
                data = aligned_buffer(HEADER.size + self.block_bytes)
                got = handle.readinto(data)
        except FileNotFoundError:
            return None  # evicted between the index lookup and the open
        problem = self._check(key, data, got)
        if problem:
            self.stats.corrupt += 1
            log.warning("KV block %s is corrupt (%s); dropping it", path, problem)
            path.unlink(missing_ok=True)
            return None
        payload = data[HEADER.size :]
        return torch.frombuffer(payload, dtype=self.dtype).reshape(self.shape)

    def _check(self, key: str, data: memoryview, got: int) -> str | None:
        if got != HEADER.size + self.block_bytes:
            return f"{got} bytes, expected {HEADER.size + self.block_bytes}"
        magic, raw_key, code, tokens, layers, dim, nbytes, crc = HEADER.unpack(data[: HEADER.size])
        if magic != MAGIC or raw_key.hex() != key:
            return "wrong magic or key"
        if (
            (tokens, layers, dim) != self.shape
            or DTYPES_BY_CODE.get(code) != self.dtype
            or nbytes != self.block_bytes
        ):
            return "layout differs from the store's"
        if zlib.crc32(data[HEADER.size :]) != crc:
            return "checksum mismatch"
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        connection = getattr(self._local, "db", None)
        if connection is not None:
            connection.close()
            self._local.db = None

    def __enter__(self) -> KVBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
