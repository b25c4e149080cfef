"""The TCP transport, sending side: one connection per transfer, block bytes inline after each
header (`wire.py`). The NIXL sender reuses it for its control connection."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
import weakref
from collections import deque
from typing import Any

import torch

from fireflyer.workloads.serve.kv_transfer.base import (
    KVSender,
    KVTransferError,
    SendResult,
    SendStream,
    StatsCounter,
    TransferStats,
    TransferTarget,
    dtype_name,
)
from fireflyer.workloads.serve.kv_transfer.wire import (
    VERSION,
    PeerClosed,
    ProtocolError,
    int_field,
    recv_header,
    send_frame,
    tensor_bytes,
    tune_socket,
)

log = logging.getLogger(__name__)


class _Refused(KVTransferError):
    pass


class TcpSendStream(SendStream):
    """One transfer: a daemon thread connects, negotiates, then sends queued blocks in the order
    they were queued and finally the end frame."""

    offers: tuple[str, ...] = ("inline",)

    def __init__(self, sender: TcpKVSender, target: TransferTarget) -> None:
        self.target = target
        self._sender = sender
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, int, Any]] = deque()  # (kind, index or total, tensor or reason)
        self._closed = False  # finish or abort called
        self._aborted = False
        self._failed: str | None = None
        self._done = threading.Event()
        self._result: SendResult | None = None
        self._wanted = 0  # leading blocks the receiver asked for
        self._mode: str | None = None
        self._sent_blocks = 0
        self._sent_bytes = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{target.transfer_id}", daemon=True)
        self._thread.start()

    # -- engine side ---------------------------------------------------------------------------

    def send(self, index: int, block: torch.Tensor) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"block index must be a non-negative integer, not {index!r}")
        with self._cond:
            if self._closed:
                raise ValueError(f"transfer {self.target.transfer_id} is already finished or aborted")
            if self._failed is not None:
                return  # reported by wait(); keeping the block would only hold memory
            self._queue.append(("block", index, block))
            self._cond.notify()

    def finish(self, total_blocks: int) -> None:
        if isinstance(total_blocks, bool) or not isinstance(total_blocks, int) or total_blocks < 0:
            raise ValueError(f"total_blocks must be a non-negative integer, not {total_blocks!r}")
        with self._cond:
            if self._closed:
                raise ValueError(f"transfer {self.target.transfer_id} is already finished or aborted")
            self._closed = True
            self._queue.append(("end", total_blocks, None))
            self._cond.notify()

    def abort(self, reason: str) -> None:
        with self._cond:
            if self._done.is_set() or self._aborted:
                return
            self._closed = self._aborted = True
            self._queue.clear()  # queued blocks are not worth sending any more
            self._queue.append(("abort", 0, reason))
            self._cond.notify()

    def wait(self, timeout: float | None = None) -> SendResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"transfer {self.target.transfer_id} still running after {timeout}s")
        if self._failed is not None:
            raise KVTransferError(self._failed)
        assert self._result is not None
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> str | None:
        with self._cond:
            return self._failed

    @property
    def mode(self) -> str | None:
        """How block bytes travel, once the receiver accepted: "inline" or "nixl"."""
        return self._mode

    # -- worker --------------------------------------------------------------------------------

    def _next(self) -> tuple[str, int, Any]:
        """The next queued item; while none is queued, drive writes still in flight."""
        while True:
            with self._cond:
                if not self._in_flight():
                    self._cond.wait_for(lambda: bool(self._queue))
                elif not self._queue:
                    self._cond.wait(timeout=0.0002)
                if self._queue:
                    return self._queue.popleft()
            self._progress()

    def _run(self) -> None:
        target, stats = self.target, self._sender._stats
        start = time.monotonic()
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((target.host, target.port), timeout=self._sender.connect_timeout)
            tune_socket(sock, self._sender.io_timeout)
            send_frame(
                sock,
                {
                    "type": "open",
                    "version": VERSION,
                    "transfer_id": target.transfer_id,
                    "data": list(self.offers),
                },
            )
            reply = recv_header(sock)
            if reply["type"] == "refuse":
                raise _Refused(f"refused by the receiver: {reply.get('reason')}")
            if reply["type"] != "accept":
                raise ProtocolError(f"expected accept, got {reply['type']}")
            self._wanted = int_field(reply, "blocks")
            self._mode = "inline"
            self._setup(sock, reply)
            while True:
                kind, number, item = self._next()
                if kind == "block":
                    if number < self._wanted:  # the receiver computes the rest itself
                        self._check_peer(sock)
                        self._send_block(sock, number, item)
                        self._sent_blocks += 1
                        stats.add(blocks=1, bytes=item.numel() * item.element_size())
                elif kind == "end":
                    self._flush(sock)
                    send_frame(sock, {"type": "end", "blocks": number, **self._end_fields()})
                    reply = recv_header(sock)
                    if reply["type"] != "done":
                        raise KVTransferError(
                            f"receiver failed the transfer: {reply.get('reason', reply['type'])}"
                        )
                    break
                else:
                    self._cancel()
                    send_frame(sock, {"type": "abort", "reason": str(item)})
                    raise KVTransferError(f"aborted: {item}")
        except Exception as e:
            reason = self._describe(e, sock)
            with self._cond:
                self._failed = f"transfer {target.transfer_id} to {target.host}:{target.port}: {reason}"
                self._queue.clear()
            if not self._aborted:
                log.warning("KV %s", self._failed)
            stats.add(transfers_failed=1, refused=int(isinstance(e, _Refused)))
        else:
            seconds = time.monotonic() - start
            self._result = SendResult(target.transfer_id, self._sent_blocks, self._sent_bytes, seconds)
            stats.add(transfers_ok=1, seconds=seconds)
        finally:
            self._cleanup()
            if sock is not None:
                sock.close()
            self._done.set()
            self._sender._forget(self)

    def _describe(self, error: Exception, sock: socket.socket | None) -> str:
        """The receiver's own error frame says more than the broken pipe it causes."""
        if isinstance(error, OSError) and sock is not None and not isinstance(error, TimeoutError):
            try:
                sock.settimeout(1.0)
                reply = recv_header(sock)
                if reply["type"] == "error":
                    return f"receiver failed the transfer: {reply.get('reason')}"
            except (OSError, ProtocolError):
                pass
        if isinstance(error, TimeoutError):
            return f"timed out ({error})"
        if isinstance(error, PeerClosed):
            return "receiver closed the connection"
        if isinstance(error, KVTransferError | ProtocolError):
            return str(error)
        return f"{type(error).__name__}: {error}"

    def _check_peer(self, sock: socket.socket) -> None:
        """The receiver only speaks mid-transfer to fail it, then stops reading: stop sending."""
        if select.select([sock], [], [], 0)[0]:
            reply = recv_header(sock)
            raise KVTransferError(f"receiver failed the transfer: {reply.get('reason', reply['type'])}")

    def _send_block(self, sock: socket.socket, index: int, block: torch.Tensor) -> None:
        block = block.detach().to("cpu").contiguous()
        payload = tensor_bytes(block)
        header = {
            "type": "block",
            "transfer_id": self.target.transfer_id,
            "index": index,
            "dtype": dtype_name(block.dtype),
            "shape": list(block.shape),
            "nbytes": payload.nbytes,
        }
        send_frame(sock, header, payload)
        self._sent_bytes += payload.nbytes

    # Hooks for transports that move the bytes another way (nixl.py).

    def _setup(self, sock: socket.socket, accept: dict[str, Any]) -> None:
        pass

    def _in_flight(self) -> bool:
        """Whether sent blocks still need `_progress` calls to complete."""
        return False

    def _progress(self) -> None:
        pass

    def _flush(self, sock: socket.socket) -> None:
        """Before the end frame: every block sent must have landed."""

    def _end_fields(self) -> dict[str, Any]:
        return {}

    def _cancel(self) -> None:
        """Before the abort frame: stop outstanding writes."""

    def _cleanup(self) -> None:
        pass


class TcpKVSender(KVSender):
    """Pushes blocks over TCP; one connection and one thread per open stream."""

    stream_class: type[TcpSendStream] = TcpSendStream

    def __init__(self, *, connect_timeout: float = 5.0, io_timeout: float = 30.0) -> None:
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._stats = StatsCounter()
        self._streams: weakref.WeakSet[TcpSendStream] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    def open(self, target: TransferTarget) -> TcpSendStream:
        with self._lock:
            if self._closed:
                raise KVTransferError("the sender is closed")
            stream = self.stream_class(self, target)
            self._streams.add(stream)
            return stream

    def _forget(self, stream: TcpSendStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    @property
    def stats(self) -> TransferStats:
        return self._stats.snapshot()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.abort("the sender is closing")
        for stream in streams:
            stream._done.wait(self.io_timeout)
