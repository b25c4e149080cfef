"""The TCP transport, receiving side: a listening socket, a thread per connection, and the
expiry of overdue expectations. The NIXL receiver reuses it for its control connection."""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import Any

import torch

from fireflyer.workloads.serve.kv_transfer.base import (
    DTYPES,
    Expectation,
    KVReceiver,
    KVTransferError,
    StatsCounter,
    TransferStats,
    block_nbytes,
)
from fireflyer.workloads.serve.kv_transfer.wire import (
    ProtocolError,
    int_field,
    recv_exact,
    recv_header,
    send_frame,
    tensor_bytes,
    tune_socket,
)

log = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class TcpKVReceiver(KVReceiver):
    """Listens on `host`:`port` (0: an ephemeral port) and serves each connection on its own
    thread; an accept thread also expires overdue expectations. `advertise_host` is what
    `address` reports to senders when binding a wildcard address (the pod IP)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        block_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        default_timeout: float = 60.0,
        io_timeout: float = 30.0,
        max_block_bytes: int = 256 << 20,
    ) -> None:
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self.dtype = dtype
        self.default_timeout = default_timeout
        self.io_timeout = io_timeout
        self.max_block_bytes = max_block_bytes
        self._stats = StatsCounter()
        self._lock = threading.Lock()
        self._expectations: dict[str, Expectation] = {}
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._closed = threading.Event()
        self._server = socket.create_server((host, port), backlog=128)
        self._server.settimeout(0.1)  # the accept loop also reaps expired expectations
        bound_host, bound_port = self._server.getsockname()[:2]
        if advertise_host is None:
            advertise_host = (
                socket.gethostbyname(socket.gethostname()) if host in _WILDCARD_HOSTS else bound_host
            )
        self._address = (advertise_host, bound_port)
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-receive-accept", daemon=True)
        self._acceptor.start()

    # -- the engine's side ---------------------------------------------------------------------

    def expect(
        self,
        transfer_id: str,
        num_blocks: int,
        *,
        timeout: float | None = None,
        block_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Expectation:
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError(f"transfer_id must be a non-empty string, not {transfer_id!r}")
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be ≥ 0, not {num_blocks}")
        timeout = self.default_timeout if timeout is None else timeout
        expectation = Expectation(
            transfer_id,
            num_blocks,
            time.monotonic() + timeout,
            tuple(block_shape) if block_shape is not None else self.block_shape,
            dtype if dtype is not None else self.dtype,
            on_collect=self._forget,
            on_finish=self._account,
        )
        with self._lock:
            if self._closed.is_set():
                raise KVTransferError("the receiver is closed")
            if transfer_id in self._expectations:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._expectations[transfer_id] = expectation
        return expectation

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def stats(self) -> TransferStats:
        return self._stats.snapshot()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._expectations)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._acceptor.join()
        self._server.close()
        with self._lock:
            expectations = list(self._expectations.values())
            self._expectations.clear()
            connections = list(self._connections)
            handlers = list(self._handlers)
        for expectation in expectations:
            expectation._fail("the receiver closed")
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes the handler blocked in recv
        for handler in handlers:
            handler.join(self.io_timeout)

    def __enter__(self) -> TcpKVReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _forget(self, expectation: Expectation) -> None:
        with self._lock:
            if self._expectations.get(expectation.transfer_id) is expectation:
                del self._expectations[expectation.transfer_id]

    def _account(self, expectation: Expectation) -> None:
        blocks, nbytes, seconds = expectation._accounting
        failed = expectation.error is not None
        self._stats.add(
            blocks=blocks,
            bytes=nbytes,
            seconds=seconds,
            transfers_ok=int(not failed),
            transfers_failed=int(failed),
        )

    # -- threads -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            self._reap()
            try:
                conn, peer = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                log.exception("KV receiver: accept failed")
                time.sleep(0.1)
                continue
            handler = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"kv-receive-{peer}", daemon=True
            )
            with self._lock:
                self._connections.add(conn)
                self._handlers.add(handler)
            handler.start()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [e for e in self._expectations.values() if e.deadline <= now]
            for expectation in overdue:
                del self._expectations[expectation.transfer_id]
        for expectation in overdue:
            expectation._expire()
            if expectation.error and expectation.error.startswith("expired"):
                log.info("KV transfer %s %s", expectation.transfer_id, expectation.error)

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        expectation: Expectation | None = None
        try:
            tune_socket(conn, self.io_timeout)
            hello = recv_header(conn)
            if hello["type"] != "open":
                raise ProtocolError(f"expected an open frame, got {hello['type']}")
            transfer_id = hello.get("transfer_id")
            with self._lock:
                candidate = self._expectations.get(transfer_id) if isinstance(transfer_id, str) else None
            reason = "unknown or expired transfer id" if candidate is None else candidate._attach()
            if reason is not None:
                self._stats.add(refused=1)
                log.warning("KV receiver: refused transfer %r from %s: %s", transfer_id, peer, reason)
                send_frame(conn, {"type": "refuse", "reason": reason})
                return
            assert candidate is not None
            expectation = candidate
            send_frame(conn, self._accept_frame(expectation, hello))
            self._receive(conn, expectation)
        except (ProtocolError, KVTransferError) as e:
            if expectation is not None:
                expectation._fail(str(e))
            log.warning("KV receiver: transfer from %s failed: %s", peer, e)
            with contextlib.suppress(OSError):
                send_frame(conn, {"type": "error", "reason": str(e)})
                self._linger(conn)
        except OSError as e:
            if expectation is not None:
                received = expectation.received
                what = "timed out" if isinstance(e, TimeoutError) else "disconnected"
                if expectation._fail(
                    f"sender {what} after {received} of {expectation.num_blocks} blocks ({e})"
                ):
                    log.warning("KV receiver: %s", expectation.error)
        finally:
            self._release(conn, expectation)
            conn.close()
            with self._lock:
                self._connections.discard(conn)
                self._handlers.discard(threading.current_thread())

    def _linger(self, conn: socket.socket) -> None:
        """Close after an error frame without a reset: a reset can discard the frame before the
        sender reads it. The sender checks for it before each block, then closes."""
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(2.0)
        while conn.recv(1 << 16):
            pass

    def _await_frame(self, conn: socket.socket, expectation: Expectation) -> None:
        """Wait for the sender's next frame. It is silent while the prefill engine queues and
        computes, up to the transfer's deadline; a transfer failed on this side meanwhile (wait
        timed out, expired, cancelled) is reported to the sender at once, so it stops."""
        idle_until = max(expectation.deadline + 1.0, time.monotonic() + self.io_timeout)
        while not select.select([conn], [], [], 0.25)[0]:
            if expectation.done:
                raise KVTransferError(expectation.error or f"transfer {expectation.transfer_id} has ended")
            if time.monotonic() > idle_until:
                raise TimeoutError("no frame from the sender")

    def _receive(self, conn: socket.socket, expectation: Expectation) -> None:
        while True:
            self._await_frame(conn, expectation)
            header = recv_header(conn)
            kind = header["type"]
            if kind == "block":
                self._receive_block(conn, expectation, header)
            elif kind == "end":
                reason = self._end(expectation, header)
                if reason is not None:
                    raise KVTransferError(reason)
                send_frame(conn, {"type": "done", "blocks": expectation.received})
                return
            elif kind == "abort":
                expectation._fail(f"sender aborted: {header.get('reason')}")
                return
            else:
                raise ProtocolError(f"unexpected {kind} frame")

    def _receive_block(self, conn: socket.socket, expectation: Expectation, header: dict[str, Any]) -> None:
        if header.get("transfer_id") != expectation.transfer_id:
            other = header.get("transfer_id")
            raise ProtocolError(
                f"block for transfer {other!r} on the connection of {expectation.transfer_id}"
            )
        index = int_field(header, "index")
        nbytes = int_field(header, "nbytes")
        dtype = DTYPES.get(header.get("dtype"))  # type: ignore[arg-type]
        shape = header.get("shape")
        if dtype is None:
            raise ProtocolError(f"block {index} has unknown dtype {header.get('dtype')!r}")
        if (
            not isinstance(shape, list)
            or not 0 < len(shape) <= 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ProtocolError(f"block {index} has invalid shape {shape!r}")
        if nbytes != block_nbytes(tuple(shape), dtype) or nbytes > self.max_block_bytes:
            raise ProtocolError(
                f"block {index} announces {nbytes} bytes for {shape} {dtype} (limit {self.max_block_bytes})"
            )
        expectation._check_block(index, tuple(shape), dtype)
        block = torch.empty(shape, dtype=dtype)
        recv_exact(conn, tensor_bytes(block))
        if not expectation._deliver(index, block):
            raise KVTransferError(expectation.error or f"transfer {expectation.transfer_id} has ended")

    # Hooks for transports that move the bytes another way (nixl.py).

    def _accept_frame(self, expectation: Expectation, hello: dict[str, Any]) -> dict[str, Any]:
        return {"type": "accept", "blocks": expectation.num_blocks, "data": "inline"}

    def _end(self, expectation: Expectation, header: dict[str, Any]) -> str | None:
        return expectation._complete(int_field(header, "blocks"))

    def _release(self, conn: socket.socket, expectation: Expectation | None) -> None:
        """The connection is over: nothing more will arrive for `expectation`."""
