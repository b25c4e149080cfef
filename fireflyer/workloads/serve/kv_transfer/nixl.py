"""The NIXL transport: block bytes go by one-sided NIXL WRITEs (RDMA where the fabric has it),
the TCP connection (`tcp_send.py`, `tcp_receive.py`) stays the control channel: open/accept,
end, abort, errors.

The receiver registers one arena of block-sized slots with its NIXL agent at start. When a sender
offers NIXL, the accept frame carries the agent's metadata and one slot address per wanted
block; the sender copies each block into a registered staging slot of its own and WRITEs it to
the receiver's slot with the notification `fftx1:<transfer id>:<index>`, and the receiver's
poller copies the slot out when that notification arrives (the NIXL way to learn that a remote
write landed). The end frame names how many blocks were placed so the receiver waits for their
notifications. Slots go back to the arena only once the sender can no longer write to them: after
its end or abort frame (it finishes its writes first), or after it closed the connection. When
the arena is full, or the sender has no NIXL, the transfer falls back to inline TCP bytes.

Needs the `nixl` package (pip install nixl[cu12|cu13]); importing this module does not."""

from __future__ import annotations

import base64
import logging
import select
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any

import torch

from fireflyer.workloads.serve.kv_transfer.base import (
    DTYPES,
    Expectation,
    KVTransferError,
    TransferTarget,
    block_nbytes,
    dtype_name,
)
from fireflyer.workloads.serve.kv_transfer.tcp_receive import TcpKVReceiver
from fireflyer.workloads.serve.kv_transfer.tcp_send import TcpKVSender, TcpSendStream
from fireflyer.workloads.serve.kv_transfer.wire import ProtocolError

log = logging.getLogger(__name__)

NOTIF_PREFIX = b"fftx1:"


def nixl_available() -> bool:
    try:
        _nixl_api()
    except KVTransferError:
        return False
    return True


def _nixl_api() -> Any:
    try:
        from nixl import _api
    except Exception as e:  # ImportError, or the meta package's own errors (no CUDA variant)
        raise KVTransferError(f"the nixl KV transport needs the nixl package (pip install nixl): {e}") from e
    return _api


class _Agent:
    """One NIXL agent per sender or receiver. The Python agent is not thread-safe unless built
    with a strict sync mode, and ours is shared by stream threads and the poller: one lock."""

    def __init__(self, role: str, backends: tuple[str, ...]) -> None:
        api = _nixl_api()
        self.name = f"fireflyer-{role}-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._agent = api.nixl_agent(self.name, api.nixl_agent_config(backends=list(backends)))
        self._registered: list[Any] = []
        self._remotes: set[str] = set()

    def register(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._registered.append(self._agent.register_memory(tensor))

    def metadata(self) -> bytes:
        with self._lock:
            return bytes(self._agent.get_agent_metadata())

    def add_remote(self, name: str, metadata: bytes) -> None:
        with self._lock:
            if name not in self._remotes:
                loaded = self._agent.add_remote_agent(metadata)
                loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
                if loaded != name:
                    raise KVTransferError(
                        f"NIXL metadata is for agent {loaded!r}, the receiver said {name!r}"
                    )
                self._remotes.add(name)

    def write(
        self, local: tuple[int, int, int], remote: tuple[int, int, int], peer: str, notif: bytes
    ) -> Any:
        """Post one WRITE of `local` to `remote` (address, length, device); returns its handle."""
        with self._lock:
            local_descs = self._agent.get_xfer_descs([local], mem_type="DRAM")
            remote_descs = self._agent.get_xfer_descs([remote], mem_type="DRAM")
            handle = self._agent.initialize_xfer("WRITE", local_descs, remote_descs, peer, notif)
            if self._agent.transfer(handle) == "ERR":
                self._agent.release_xfer_handle(handle)
                raise KVTransferError(f"NIXL refused to post a write to {peer}")
            return handle

    def state(self, handle: Any) -> str:
        with self._lock:
            return str(self._agent.check_xfer_state(handle))

    def release(self, handle: Any) -> None:
        with self._lock:
            self._agent.release_xfer_handle(handle)

    def notifications(self) -> list[bytes]:
        with self._lock:
            notifs = self._agent.get_new_notifs()
        return [message for messages in notifs.values() for message in messages]

    def close(self) -> None:
        with self._lock:
            for name in self._remotes:
                try:
                    self._agent.remove_remote_agent(name)
                except Exception:
                    log.debug("NIXL: removing remote agent %s failed", name, exc_info=True)
            for descs in self._registered:
                self._agent.deregister_memory(descs)
            self._remotes.clear()
            self._registered.clear()


def _slot_desc(arena: torch.Tensor, slot: int) -> tuple[int, int, int]:
    row = arena[slot]
    return (row.data_ptr(), row.numel(), 0)


# -- sending -----------------------------------------------------------------------------------


class _StagingPool:
    """Registered host buffers, one block each, shared by the sender's streams: a block is copied
    in and written out from there (registering every block tensor would pin memory per block)."""

    def __init__(self, agent: _Agent, slots: int, nbytes: int) -> None:
        self.arena = torch.empty((slots, nbytes), dtype=torch.uint8)
        agent.register(self.arena)
        self._free = deque(range(slots))
        self._cond = threading.Condition()

    def acquire(self, timeout: float) -> int | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), timeout=timeout):
                return None
            return self._free.popleft()

    def try_acquire(self) -> int | None:
        with self._cond:
            return self._free.popleft() if self._free else None

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


class NixlSendStream(TcpSendStream):
    offers = ("nixl", "inline")
    _sender: NixlKVSender

    def __init__(self, sender: NixlKVSender, target: TransferTarget) -> None:
        self._peer = ""
        self._remote_slots: list[tuple[int, int, int]] = []
        self._layout: tuple[tuple[int, ...], torch.dtype] | None = None
        self._inflight: deque[tuple[Any, int, int]] = deque()  # (handle, staging slot, bytes)
        self._placed = 0
        super().__init__(sender, target)

    def _setup(self, sock: socket.socket, accept: dict[str, Any]) -> None:
        if accept.get("data") != "nixl":
            return  # the receiver has no NIXL or no free slots: inline bytes
        dtype, shape, slots = DTYPES.get(accept.get("dtype")), accept.get("shape"), accept.get("slots")  # type: ignore[arg-type]
        if (
            dtype is None
            or not isinstance(shape, list)
            or not isinstance(slots, list)
            or len(slots) != self._wanted
        ):
            raise ProtocolError("NIXL accept frame without a valid dtype, shape and one slot per block")
        self._layout = (tuple(shape), dtype)
        self._remote_slots = [(int(a), int(n), int(d)) for a, n, d in slots]
        self._peer = str(accept["agent"])
        self._sender._agent.add_remote(self._peer, base64.b64decode(accept["metadata"]))
        self._mode = "nixl"

    def _send_block(self, sock: socket.socket, index: int, block: torch.Tensor) -> None:
        if self._mode != "nixl":
            super()._send_block(sock, index, block)
            return
        assert self._layout is not None
        shape, dtype = self._layout
        if tuple(block.shape) != shape or block.dtype != dtype:
            got, want = f"{list(block.shape)} {block.dtype}", f"{list(shape)} {dtype}"
            raise KVTransferError(f"block {index} is {got}, the receiver expects {want}")
        pool = self._sender._pool(block_nbytes(shape, dtype))
        slot = pool.try_acquire()
        deadline = time.monotonic() + self._sender.io_timeout
        while slot is None:  # every staging slot is in flight: wait for ours, or for other streams'
            if self._inflight:
                self._poll(wait=True)
                slot = pool.try_acquire()
            else:
                slot = pool.acquire(timeout=0.01)
            if slot is None and time.monotonic() > deadline:
                raise KVTransferError("no NIXL staging buffer freed up")
        try:
            pool.arena[slot].copy_(block.detach().reshape(-1).view(torch.uint8))
            handle = self._sender._agent.write(
                _slot_desc(pool.arena, slot),
                self._remote_slots[index],
                self._peer,
                NOTIF_PREFIX + f"{self.target.transfer_id}:{index}".encode(),
            )
        except Exception:
            pool.release(slot)
            raise
        self._inflight.append((handle, slot, pool.arena.shape[1]))
        self._poll(wait=False)

    def _poll(self, wait: bool) -> None:
        """Retire finished writes (oldest first); with `wait`, until at least one finished."""
        agent, pool_for = self._sender._agent, self._sender._pool
        deadline = time.monotonic() + self._sender.io_timeout
        while self._inflight:
            handle, slot, nbytes = self._inflight[0]
            state = agent.state(handle)
            if state == "PROC":
                if not wait:
                    return
                if time.monotonic() > deadline:
                    raise KVTransferError(f"a NIXL write made no progress for {self._sender.io_timeout:g}s")
                time.sleep(0.0002)
                continue
            self._inflight.popleft()
            agent.release(handle)
            pool_for(nbytes).release(slot)
            if state != "DONE":
                raise KVTransferError(f"a NIXL write to {self._peer} failed ({state})")
            self._placed += 1
            self._sent_bytes += nbytes
            wait = False

    def _in_flight(self) -> bool:
        return bool(self._inflight)

    def _progress(self) -> None:
        # A NIXL write completes, and its notification leaves, only as the initiator polls it.
        self._poll(wait=False)

    def _flush(self, sock: socket.socket) -> None:
        while self._inflight:
            self._poll(wait=True)

    def _end_fields(self) -> dict[str, Any]:
        return {"placed": self._placed} if self._mode == "nixl" else {}

    def _cancel(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        """No write may still target the receiver's slots once the connection closes: let the
        posted ones finish (they are short), then release them."""
        agent = self._sender._agent
        deadline = time.monotonic() + self._sender.io_timeout
        while self._inflight:
            handle, slot, nbytes = self._inflight[0]
            if agent.state(handle) == "PROC" and time.monotonic() < deadline:
                time.sleep(0.0002)
                continue
            self._inflight.popleft()
            try:
                agent.release(handle)  # cancels a write still running past the deadline
            except Exception:
                log.exception("NIXL: releasing a write handle failed")
            self._sender._pool(nbytes).release(slot)


class NixlKVSender(TcpKVSender):
    """Pushes blocks with NIXL WRITEs when the receiver offers slots, inline TCP otherwise.
    `staging_blocks` registered host buffers per block size bound the writes in flight."""

    stream_class = NixlSendStream

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        io_timeout: float = 30.0,
        staging_blocks: int = 32,
        backends: tuple[str, ...] = ("UCX",),
    ) -> None:
        super().__init__(connect_timeout=connect_timeout, io_timeout=io_timeout)
        self._agent = _Agent("send", backends)
        self._staging_blocks = staging_blocks
        self._pools: dict[int, _StagingPool] = {}
        self._pools_lock = threading.Lock()

    def _pool(self, nbytes: int) -> _StagingPool:
        with self._pools_lock:
            pool = self._pools.get(nbytes)
            if pool is None:
                pool = self._pools[nbytes] = _StagingPool(self._agent, self._staging_blocks, nbytes)
            return pool

    def close(self) -> None:
        super().close()
        self._agent.close()


# -- receiving ---------------------------------------------------------------------------------


class NixlKVReceiver(TcpKVReceiver):
    """A TCP receiver that also offers `arena_blocks` NIXL-writable slots of its block layout
    (`block_shape` and `dtype` are required: the arena is registered up front)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        block_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        arena_blocks: int = 256,
        backends: tuple[str, ...] = ("UCX",),
        slot_hold_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        if block_shape is None or dtype is None:
            raise ValueError("the NIXL receiver needs block_shape and dtype to size its registered arena")
        dtype_name(dtype)
        self.slot_hold_timeout = slot_hold_timeout
        self._agent = _Agent("receive", backends)
        self._block_bytes = block_nbytes(tuple(block_shape), dtype)
        self._arena = torch.empty((arena_blocks, self._block_bytes), dtype=torch.uint8)
        self._agent.register(self._arena)
        self._metadata = base64.b64encode(self._agent.metadata()).decode()
        self._free_slots: deque[int] = deque(range(arena_blocks))
        self._active: dict[str, tuple[Expectation, list[int]]] = {}
        self._nixl_cond = threading.Condition()
        self._clean: set[Expectation] = set()
        super().__init__(host, port, block_shape=tuple(block_shape), dtype=dtype, **kwargs)
        self._poller = threading.Thread(target=self._poll_loop, name="kv-receive-nixl", daemon=True)
        self._poller.start()

    def _accept_frame(self, expectation: Expectation, hello: dict[str, Any]) -> dict[str, Any]:
        offers = hello.get("data")
        n = expectation.num_blocks
        layout_ok = expectation.block_shape == self.block_shape and expectation.dtype == self.dtype
        if not (isinstance(offers, list) and "nixl" in offers and layout_ok and n > 0):
            return super()._accept_frame(expectation, hello)
        with self._nixl_cond:
            if len(self._free_slots) < n:
                log.info("KV receiver: NIXL arena full, transfer %s goes inline", expectation.transfer_id)
                return super()._accept_frame(expectation, hello)
            slots = [self._free_slots.popleft() for _ in range(n)]
            self._active[expectation.transfer_id] = (expectation, slots)
            self._nixl_cond.notify_all()
        assert self.block_shape is not None and self.dtype is not None
        return {
            "type": "accept",
            "blocks": n,
            "data": "nixl",
            "agent": self._agent.name,
            "metadata": self._metadata,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.block_shape),
            "slots": [list(_slot_desc(self._arena, slot)) for slot in slots],
        }

    def _end(self, expectation: Expectation, header: dict[str, Any]) -> str | None:
        self._mark_clean(expectation)  # the sender finished its writes before the end frame
        placed = header.get("placed")
        if isinstance(placed, int) and placed > 0:
            # Their notifications may still trail the frame.
            expectation._wait_received(placed, timeout=self.io_timeout)
        return super()._end(expectation, header)

    def _receive(self, conn: socket.socket, expectation: Expectation) -> None:
        super()._receive(conn, expectation)
        self._mark_clean(expectation)  # an abort frame, too, comes after the sender's last write

    def _mark_clean(self, expectation: Expectation) -> None:
        with self._nixl_cond:
            self._clean.add(expectation)

    def _release(self, conn: socket.socket, expectation: Expectation | None) -> None:
        if expectation is None:
            return
        with self._nixl_cond:
            entry = self._active.pop(expectation.transfer_id, None)
            clean = expectation in self._clean
            self._clean.discard(expectation)
        if entry is None:
            return
        if not clean and not self._await_close(conn):
            # The sender may still write into these slots: never hand them out again.
            log.error(
                "KV receiver: sender of %s did not close; %d NIXL slots retired",
                expectation.transfer_id,
                len(entry[1]),
            )
            return
        with self._nixl_cond:
            self._free_slots.extend(entry[1])

    def _await_close(self, conn: socket.socket) -> bool:
        """A sender told of a failure stops writing and closes, at its next block or at its end
        (a stream finishes its writes before closing): True once it has, False if it has not
        within `slot_hold_timeout`."""
        deadline = time.monotonic() + self.slot_hold_timeout
        try:
            while time.monotonic() < deadline and not self._closed.is_set():
                if select.select([conn], [], [], 0.25)[0] and not conn.recv(1 << 16):
                    return True
        except OSError:
            return True  # reset: the sender's socket is gone, and its writes with it
        return self._closed.is_set()

    def _poll_loop(self) -> None:
        while not self._closed.is_set():
            with self._nixl_cond:
                if not self._active:
                    self._nixl_cond.wait(timeout=0.1)
                    continue
            try:
                messages = self._agent.notifications()
            except Exception:
                log.exception("KV receiver: reading NIXL notifications failed")
                time.sleep(0.1)
                continue
            for message in messages:
                self._on_notification(message)
            if not messages:
                time.sleep(0.0002)

    def _on_notification(self, message: bytes) -> None:
        if not message.startswith(NOTIF_PREFIX):
            return
        transfer_id, _, index_text = message[len(NOTIF_PREFIX) :].decode(errors="replace").rpartition(":")
        with self._nixl_cond:
            entry = self._active.get(transfer_id)
        if entry is None or not index_text.isdigit() or int(index_text) >= len(entry[1]):
            log.debug("KV receiver: stray NIXL notification %r", message)
            return
        expectation, slots = entry
        index = int(index_text)
        assert self.block_shape is not None and self.dtype is not None
        block = torch.empty(self.block_shape, dtype=self.dtype)
        block.reshape(-1).view(torch.uint8).copy_(self._arena[slots[index]])
        expectation._deliver(index, block)

    def close(self) -> None:
        super().close()
        self._poller.join()
        self._agent.close()
