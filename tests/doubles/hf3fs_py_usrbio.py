"""Test double of 3FS's USRBIO Python binding (`hf3fs_py_usrbio`), for machines without 3FS.

It follows the binding's contract as far as callers can observe it: a mount point is a directory
with a `3fs-virt/` child; an iovec wraps a shared-memory buffer whose link must exist under
`<mount>/3fs-virt/iovs/<id>`; fds must be registered before use and deregistered before close;
an ioring is either for reads or for writes, holds at most `entries` prepared I/Os, runs them on
`submit()`, and `wait()` returns the finished iovecs carrying `.result` (bytes moved or -errno)
and the `userdata` given to `prepare`. Calls are counted in `CALLS` so tests can see the path.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from typing import Any

CALLS: Counter[str] = Counter()
_registered: set[int] = set()


def extract_mount_point(path: str) -> str | None:
    current = os.path.abspath(path)
    while True:
        if os.path.isdir(os.path.join(current, "3fs-virt")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def register_fd(fd: int, flags: int = 0) -> None:
    if fd in _registered:
        raise OSError(errno.EINVAL, "fd already registered")
    os.fstat(fd)  # EBADF for a closed fd, like the real call
    _registered.add(fd)
    CALLS["register_fd"] += 1


def deregister_fd(fd: int) -> None:
    _registered.discard(fd)
    CALLS["deregister_fd"] += 1


def force_fsync(fd: int) -> int:
    os.fsync(fd)
    CALLS["force_fsync"] += 1
    return 0


class iovec:
    def __init__(
        self, base: Any, id: str, hf3fs_mount_point: str, block_size: int = 0, numa: int = -1
    ) -> None:
        link = os.path.join(hf3fs_mount_point, "3fs-virt", "iovs", id)
        if not os.path.islink(link):
            raise OSError(errno.ENOENT, f"iovec link {link} does not exist")
        if extract_mount_point(hf3fs_mount_point) != os.path.abspath(hf3fs_mount_point):
            raise OSError(errno.EINVAL, f"{hf3fs_mount_point} is not a 3FS mount point")
        self._memory = memoryview(base).cast("B")
        self._start = 0
        self.size = self._memory.nbytes
        self.result = 0
        self.userdata: Any = None
        CALLS["iovec"] += 1

    def __getitem__(self, item: slice) -> iovec:
        start, stop, step = item.indices(self.size)
        if step != 1:
            raise ValueError("step not 1 when slicing iovec")
        piece = object.__new__(iovec)
        piece._memory = self._memory
        piece._start = self._start + start
        piece.size = max(0, stop - start)
        piece.result = 0
        piece.userdata = None
        return piece

    def _view(self) -> memoryview:
        return self._memory[self._start : self._start + self.size]


class ioring:
    def __init__(
        self,
        hf3fs_mount_point: str,
        entries: int,
        for_read: bool = True,
        io_depth: int = 0,
        priority: int | None = None,
        timeout: int | None = None,
        numa: int = -1,
        flags: int = 0,
    ) -> None:
        if entries < 1:
            raise OSError(errno.EINVAL, "entries must be ≥ 1")
        self.entries = entries
        self.for_read = for_read
        self._prepared: list[tuple[iovec, int, int, Any]] = []
        self._done: list[iovec] = []

    def prepare(self, iov: iovec, read: bool, fd: int, off: int, userdata: Any = None) -> ioring:
        if read != self.for_read:
            raise OSError(errno.EINVAL, "read flag differs from the ioring's direction")
        if fd not in _registered:
            raise OSError(errno.EBADF, "fd not registered")
        if len(self._prepared) + len(self._done) >= self.entries:
            raise OSError(errno.EAGAIN, "ioring full")
        self._prepared.append((iov, fd, off, userdata))
        CALLS["prepare"] += 1
        return self

    def submit(self) -> ioring:
        CALLS["submit"] += 1
        CALLS[f"batch_{min(len(self._prepared), 8)}"] += 1
        for iov, fd, off, userdata in self._prepared:
            view = iov._view()
            try:
                iov.result = os.preadv(fd, [view], off) if self.for_read else os.pwrite(fd, view, off)
            except OSError as error:
                iov.result = -(error.errno or errno.EIO)
            iov.userdata = userdata
            self._done.append(iov)
        self._prepared = []
        return self

    def wait(self, *, max_results: int = 0, min_results: int = 0, timeout: Any = None) -> list[iovec]:
        if min_results > len(self._done) and not self._prepared:
            raise OSError(errno.ETIMEDOUT, "fewer I/Os finished than min_results")
        count = len(self._done) if max_results <= 0 else min(max_results, len(self._done))
        out, self._done = self._done[:count], self._done[count:]
        return out
