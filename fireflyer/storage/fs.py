"""Whole-file reads and writes at close to the file system's bandwidth.

`open_fs(path)` picks the engine once per directory: USRBIO when the path lies on a 3FS FUSE mount
and the `hf3fs_py_usrbio` binding imports, parallel POSIX I/O otherwise. Both engines offer the
same three calls — `write_file`, `read_file`, `read_into` — over buffers, so callers never branch.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger(__name__)

THREEFS_VIRTUAL_DIR = "3fs-virt"
"""Every 3FS FUSE mount exposes this directory at its root (iovec links live under iovs/)."""

DEFAULT_CHUNK_BYTES = 16 << 20
DIRECT_IO_ALIGNMENT = 4096


class FileSystem(Protocol):
    """What checkpoints and the KV-cache store need from a file system."""

    engine: str

    def write_file(self, path: str | os.PathLike[str], parts: Sequence[memoryview], *, sync: bool) -> int:
        """Write the concatenation of `parts` to `path` (created or truncated); returns bytes written."""
        ...

    def read_into(self, path: str | os.PathLike[str], offset: int, out: memoryview) -> None:
        """Fill `out` with the file's bytes from `offset`; a short file is an error."""
        ...

    def read_file(self, path: str | os.PathLike[str]) -> memoryview:
        """The whole file, in a page-aligned buffer (tensors can be viewed over it without a copy)."""
        ...


def aligned_buffer(nbytes: int) -> memoryview:
    """A zero-filled, page-aligned, writable buffer (anonymous mmap)."""
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview(mmap.mmap(-1, nbytes))


def find_threefs_mount(path: str | os.PathLike[str]) -> Path | None:
    """The 3FS mount point that holds `path` (an existing path or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists():
        current = current.parent
    for candidate in (current, *current.parents):
        if (candidate / THREEFS_VIRTUAL_DIR).is_dir():
            return candidate
    return None


def _byte_view(part: Any) -> memoryview:
    view = part if isinstance(part, memoryview) else memoryview(part)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _spans(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, total - start)) for start in range(0, total, chunk)]


@dataclass
class PosixFileSystem:
    """Parallel pread/pwrite with a thread pool; O_DIRECT reads where the file system allows them."""

    threads: int = field(default_factory=lambda: min(8, (os.cpu_count() or 2) * 2))
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    direct_reads: bool = False
    engine: str = "posix"

    def write_file(self, path: str | os.PathLike[str], parts: Sequence[memoryview], *, sync: bool) -> int:
        views = [_byte_view(p) for p in parts]
        offsets = []
        position = 0
        for view in views:
            offsets.append(position)
            position += view.nbytes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if position:
                os.ftruncate(fd, position)
            jobs = [
                (fd, view[start : start + length], base + start)
                for view, base in zip(views, offsets, strict=True)
                for start, length in _spans(view.nbytes, self.chunk_bytes)
            ]
            self._run(_pwrite_all, jobs)
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return position

    def read_into(self, path: str | os.PathLike[str], offset: int, out: memoryview) -> None:
        out = _byte_view(out)
        fd = os.open(path, os.O_RDONLY)
        try:
            jobs = [
                (fd, out[start : start + length], offset + start, path)
                for start, length in _spans(out.nbytes, self.chunk_bytes)
            ]
            self._run(_pread_all, jobs)
        finally:
            os.close(fd)

    def read_file(self, path: str | os.PathLike[str]) -> memoryview:
        size = os.stat(path).st_size
        if self.direct_reads and size:
            direct = self._read_direct(path, size)
            if direct is not None:
                return direct
        out = aligned_buffer(size)
        self.read_into(path, 0, out)
        return out

    def _read_direct(self, path: str | os.PathLike[str], size: int) -> memoryview | None:
        padded = -(-size // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            return None  # tmpfs and some FUSE mounts refuse O_DIRECT
        out = aligned_buffer(padded)
        chunk = max(DIRECT_IO_ALIGNMENT, self.chunk_bytes // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT)
        try:
            jobs = [(fd, out[s : s + n], s, path) for s, n in _spans(padded, chunk)]
            self._run(_pread_direct, jobs)
        except OSError:
            return None
        finally:
            os.close(fd)
        return out[:size]

    def _run(self, fn: Callable[..., None], jobs: list[tuple[Any, ...]]) -> None:
        if len(jobs) <= 1 or self.threads <= 1:
            for job in jobs:
                fn(*job)
            return
        with ThreadPoolExecutor(max_workers=min(self.threads, len(jobs))) as pool:
            for future in [pool.submit(fn, *job) for job in jobs]:
                future.result()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pread_all(fd: int, view: memoryview, offset: int, path: str | os.PathLike[str]) -> None:
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"{path}: file ends before byte {offset + view.nbytes}")
        view, offset = view[got:], offset + got


def _pread_direct(fd: int, view: memoryview, offset: int, path: str | os.PathLike[str]) -> None:
    # The padded tail reads short at end of file; that is expected for O_DIRECT.
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            return
        view, offset = view[got:], offset + got


@dataclass
class _ThreadState:
    shm: shared_memory.SharedMemory
    link: str
    iov: Any
    rings: dict[bool, Any] = field(default_factory=dict)


class UsrbioFileSystem:
    """3FS USRBIO: one shared-memory iovec per engine, one ioring per thread, batched submits.

    Data is staged through the iovec (registered with the FUSE daemon for RDMA), so the copy into
    it is the only CPU work per byte; the daemon moves the bytes to storage without going through
    the kernel's FUSE path.
    """

    engine = "usrbio"

    def __init__(
        self,
        binding: ModuleType,
        mount_point: str | os.PathLike[str],
        *,
        threads: int = 4,
        block_bytes: int = 8 << 20,
        depth: int = 8,
    ) -> None:
        self._binding = binding
        self.mount_point = str(mount_point)
        self.threads = threads
        self.block_bytes = block_bytes
        self.depth = depth
        self._local = threading.local()
        self._lock = threading.Lock()
        self._states: dict[int, _ThreadState] = {}
        # Long-lived workers: each keeps its iovec and rings for the engine's lifetime.
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="usrbio")

    def _thread_state(self, for_read: bool) -> tuple[memoryview, Any, Any]:
        """This thread's iovec and its ioring for reads or writes (3FS rings are one-directional)."""
        ident = threading.get_ident()
        with self._lock:
            state = self._states.get(ident)
        if state is None:
            shm = shared_memory.SharedMemory(create=True, size=self.block_bytes * self.depth)
            iov_id = str(uuid.uuid4())
            link = os.path.join(self.mount_point, THREEFS_VIRTUAL_DIR, "iovs", iov_id)
            os.symlink(os.path.join("/dev/shm", shm.name), link)
            state = _ThreadState(shm, link, self._binding.iovec(shm.buf, iov_id, self.mount_point))
            with self._lock:
                self._states[ident] = state
        if for_read not in state.rings:
            state.rings[for_read] = self._binding.ioring(self.mount_point, self.depth, for_read)
        buffer = state.shm.buf
        assert buffer is not None
        return buffer, state.iov, state.rings[for_read]

    def _transfer(self, fd: int, view: memoryview, offset: int, *, read: bool, path: str) -> None:
        error = self._transfer_blocks(fd, view, offset, read=read, path=path)
        # Raised here, outside the frame that held views of the shared buffer, so a caller keeping
        # the traceback does not pin the buffer.
        if error is not None:
            raise error

    def _transfer_blocks(
        self, fd: int, view: memoryview, offset: int, *, read: bool, path: str
    ) -> OSError | None:
        buf, iov, ring = self._thread_state(read)
        done = 0
        while done < view.nbytes:
            batch = []
            for slot in range(self.depth):
                start = done + slot * self.block_bytes
                if start >= view.nbytes:
                    break
                length = min(self.block_bytes, view.nbytes - start)
                lo = slot * self.block_bytes
                if not read:
                    buf[lo : lo + length] = view[start : start + length]
                ring.prepare(iov[lo : lo + length], read, fd, offset + start, userdata=(slot, start, length))
                batch.append(length)
            ring.submit()
            for result in ring.wait(min_results=len(batch)):
                slot, start, length = result.userdata
                if result.result < 0:
                    return OSError(-result.result, f"{path}: USRBIO {'read' if read else 'write'} failed")
                if result.result != length:
                    return OSError(
                        f"{path}: USRBIO moved {result.result} of {length} bytes at {offset + start}"
                    )
                if read:
                    lo = slot * self.block_bytes
                    view[start : start + length] = buf[lo : lo + length]
            done += sum(batch)
        return None

    def _parallel(self, path: str, flags: int, view: memoryview, offset: int, *, read: bool) -> None:
        fd = os.open(path, flags, 0o644)
        self._binding.register_fd(fd)
        try:
            per_thread = -(-view.nbytes // self.threads) if view.nbytes else 0
            per_thread = max(per_thread, self.block_bytes)
            futures = [
                self._pool.submit(self._transfer, fd, view[s : s + n], offset + s, read=read, path=path)
                for s, n in _spans(view.nbytes, per_thread)
            ]
            for future in futures:
                future.result()
        finally:
            self._binding.deregister_fd(fd)
            os.close(fd)

    def write_file(self, path: str | os.PathLike[str], parts: Sequence[memoryview], *, sync: bool) -> int:
        views = [_byte_view(p) for p in parts]
        total = sum(v.nbytes for v in views)
        # One contiguous source keeps blocks full; parts are usually one header plus one body.
        source = views[0] if len(views) == 1 else memoryview(b"".join(views))
        self._parallel(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, source, 0, read=False)
        if sync:
            fd = os.open(path, os.O_RDONLY)
            try:
                self._binding.force_fsync(fd)  # makes the length visible to the next stat
            finally:
                os.close(fd)
        return total

    def read_into(self, path: str | os.PathLike[str], offset: int, out: memoryview) -> None:
        self._parallel(str(path), os.O_RDONLY, _byte_view(out), offset, read=True)

    def read_file(self, path: str | os.PathLike[str]) -> memoryview:
        out = aligned_buffer(os.stat(path).st_size)
        self.read_into(path, 0, out)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            states, self._states = list(self._states.values()), {}
        for state in states:
            state.rings.clear()
            state.iov = None  # drops the binding's view of the buffer before the buffer closes
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state.link)
            # A caller may still hold a view (e.g. in a traceback); the memory goes with the last view.
            with contextlib.suppress(BufferError):
                state.shm.close()
            state.shm.unlink()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: best effort
            self.close()


def _import_usrbio() -> ModuleType | None:
    try:
        import hf3fs_py_usrbio
    except ImportError:
        return None
    return hf3fs_py_usrbio


def open_fs(path: str | os.PathLike[str], *, engine: str = "auto", threads: int | None = None) -> FileSystem:
    """The I/O engine for files under `path`: "auto" (USRBIO on 3FS when available), "posix" or "usrbio"."""
    if engine not in ("auto", "posix", "usrbio"):
        raise ValueError(f"engine must be auto, posix or usrbio, not {engine!r}")
    if engine in ("auto", "usrbio"):
        mount = find_threefs_mount(path)
        binding = _import_usrbio() if mount is not None else None
        if binding is not None and mount is not None:
            return UsrbioFileSystem(binding, mount, threads=threads or 4)
        if engine == "usrbio":
            reason = (
                "is not on a 3FS mount"
                if mount is None
                else "needs hf3fs_py_usrbio (pip install hf3fs-py-usrbio)"
            )
            raise OSError(f"{path}: USRBIO requested but the path {reason}")
    posix = PosixFileSystem()
    if threads:
        posix.threads = threads
    return posix
