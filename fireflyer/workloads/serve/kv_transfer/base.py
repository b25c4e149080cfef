"""What every KV hand-off transport shares: the target a decode engine hands to a prefill engine,
the sender and receiver interfaces, the receiver's per-transfer `Expectation`, and counters."""

from __future__ import annotations

import abc
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Block dtypes a transfer may carry, by the name on the wire. An allow-list rather than
# getattr(torch, name), so a peer cannot name arbitrary attributes.
DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int8,
        torch.uint8,
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) != dtype:
        raise ValueError(f"KV blocks of dtype {dtype} cannot be transferred (allowed: {sorted(DTYPES)})")
    return name


def block_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class KVTransferError(RuntimeError):
    """A transfer failed: refused, disconnected, aborted, timed out or malformed."""


@dataclass(frozen=True)
class TransferTarget:
    """Where a prefill engine pushes the blocks of one prompt: the decode engine's receiver and
    the id it registered with `KVReceiver.expect`. Travels inside the prefill request as JSON."""

    host: str
    port: int
    transfer_id: str

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "transfer_id": self.transfer_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TransferTarget:
        """Parse and validate; raises ValueError naming the bad field (the data comes off the
        network)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a transfer target is a JSON object, not {type(data).__name__}")
        host, port, transfer_id = data.get("host"), data.get("port"), data.get("transfer_id")
        if not isinstance(host, str) or not host:
            raise ValueError(f"transfer target host must be a non-empty string, not {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"transfer target port must be an integer in 1..65535, not {port!r}")
        if not isinstance(transfer_id, str) or not transfer_id or len(transfer_id) > 256:
            raise ValueError(
                f"transfer target transfer_id must be a string of 1..256 characters, not {transfer_id!r}"
            )
        return cls(host, port, transfer_id)


@dataclass(frozen=True)
class TransferStats:
    """Counters since start, for the engine's Prometheus export. `seconds` sums the wall time of
    finished transfers (from connection to last frame); `refused` counts connections for an
    unknown, expired or already connected transfer id (receiver) or refused by the peer (sender)."""

    bytes: int = 0
    blocks: int = 0
    transfers_ok: int = 0
    transfers_failed: int = 0
    refused: int = 0
    seconds: float = 0.0


class StatsCounter:
    """Thread-safe accumulation behind `TransferStats` snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = TransferStats()

    def add(self, **deltas: float) -> None:
        with self._lock:
            values = {k: getattr(self._values, k) + v for k, v in deltas.items()}
            self._values = TransferStats(**{**self._values.__dict__, **values})

    def snapshot(self) -> TransferStats:
        with self._lock:
            return self._values


@dataclass(frozen=True)
class SendResult:
    transfer_id: str
    blocks: int  # blocks the receiver took (those past what it asked for are not sent)
    bytes: int
    seconds: float


class SendStream(abc.ABC):
    """The sending side of one transfer. `send` and `finish` only queue: a background thread
    connects, sends and reports, so the engine loop never blocks on the network. Transport
    failures never raise from `send`/`finish` (the decode side recomputes what is missing);
    they are reported by `error` and raised by `wait`. Every stream must end with `finish` or
    `abort`: until then its thread and connection stay open."""

    target: TransferTarget

    @abc.abstractmethod
    def send(self, index: int, block: torch.Tensor) -> None:
        """Queue block `index` of the prompt ([tokens, layers, latent], any device). The stream
        owns `block` from now on: the caller must not modify it (`ModelRunner.read_blocks`
        returns fresh copies). Blocks may be queued in any order; after a failure they are
        dropped. Raises ValueError after `finish` or `abort`, or for a negative index."""

    @abc.abstractmethod
    def finish(self, total_blocks: int) -> None:
        """No more blocks: the prompt has `total_blocks` full blocks. Queued after the blocks;
        returns at once."""

    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Give up (the request was cancelled): drop queued blocks and tell the receiver, whose
        `Expectation.wait` returns early with `reason`. Idempotent; a no-op once done."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> SendResult:
        """Block until the receiver acknowledged the end (or the stream failed). Raises
        KVTransferError with the reason on failure, TimeoutError if still running."""

    @property
    @abc.abstractmethod
    def done(self) -> bool: ...

    @property
    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the stream failed; None while running or after success."""

    @property
    def mode(self) -> str | None:
        """How block bytes travel once the receiver accepted ("inline", "nixl"); None before."""
        return None


class KVSender(abc.ABC):
    """Opens one `SendStream` per transfer (prefill side)."""

    @abc.abstractmethod
    def open(self, target: TransferTarget) -> SendStream: ...

    @property
    @abc.abstractmethod
    def stats(self) -> TransferStats: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Abort the streams still open and release resources."""


class Expectation:
    """The receiving side of one transfer, registered by `KVReceiver.expect` before the prefill
    engine is asked to send. It lives until `wait` collects it or its deadline passes; at the
    deadline a transfer still running fails and blocks nobody collected are dropped, so neither
    a sender that never comes nor a caller that never waits holds memory."""

    def __init__(
        self,
        transfer_id: str,
        num_blocks: int,
        deadline: float,
        block_shape: tuple[int, ...] | None,
        dtype: torch.dtype | None,
        on_collect: Callable[[Expectation], None],
        on_finish: Callable[[Expectation], None] | None = None,
    ) -> None:
        self.transfer_id = transfer_id
        self.num_blocks = num_blocks
        self.deadline = deadline  # time.monotonic()
        self.block_shape = block_shape  # None: set by the first block, then fixed
        self.dtype = dtype
        self._on_collect = on_collect
        self._on_finish = on_finish
        self._cond = threading.Condition()
        self._blocks: list[torch.Tensor | None] = [None] * num_blocks
        self._received = 0
        self._bytes = 0
        self._attached = False
        self._finished = False
        self._collected = False
        self._error: str | None = None
        self._started: float | None = None
        self._elapsed = 0.0

    # -- the caller's side ---------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Finished, successfully or not: `wait` returns at once."""
        with self._cond:
            return self._finished

    @property
    def error(self) -> str | None:
        """Why the transfer failed (sender aborted or disconnected, malformed frame, timeout,
        expiry); None while running or after a complete transfer."""
        with self._cond:
            return self._error

    @property
    def ok(self) -> bool:
        with self._cond:
            return self._finished and self._error is None

    @property
    def received(self) -> int:
        with self._cond:
            return self._received

    def wait(self, timeout: float | None = None) -> list[torch.Tensor | None]:
        """Wait until the sender ends the transfer, fails, or `timeout` (default: the deadline)
        passes, then collect: the blocks in index order, None where a block did not arrive.
        Returns early with what arrived if the sender aborted or disconnected; `error` says why.
        Waiting past the deadline or past `timeout` fails the transfer (a sender still streaming
        is cut off). Later calls return the same list."""
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        with self._cond:
            self._cond.wait_for(lambda: self._finished, timeout=max(0.0, end - time.monotonic()))
            if not self._finished:
                waited = "its deadline" if timeout is None or end == self.deadline else f"{timeout:g}s"
                self._fail_locked(
                    f"timed out after {waited} with {self._received} of {self.num_blocks} blocks"
                )
            first = not self._collected
            self._collected = True
            blocks = self._blocks
        if first:
            self._on_collect(self)
        return blocks

    def cancel(self) -> None:
        """Stop waiting for this transfer and drop what arrived."""
        with self._cond:
            self._fail_locked("cancelled by the receiver")
            self._collected = True
            self._blocks = [None] * self.num_blocks
        self._on_collect(self)

    # -- the receiver's side -------------------------------------------------------------

    def _attach(self) -> str | None:
        """A sender connected for this transfer; the reason to refuse it, if any."""
        with self._cond:
            if self._finished:
                return f"transfer {self.transfer_id} has already {'failed' if self._error else 'ended'}"
            if self._attached:
                return f"transfer {self.transfer_id} already has a sender"
            self._attached = True
            self._started = time.monotonic()
            return None

    def _check_block(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Validate a block header before its payload is read; raises KVTransferError."""
        with self._cond:
            if self._finished:
                raise KVTransferError(self._error or f"transfer {self.transfer_id} has ended")
            if not 0 <= index < self.num_blocks:
                raise KVTransferError(f"block index {index} is outside 0..{self.num_blocks - 1}")
            if self._blocks[index] is not None:
                raise KVTransferError(f"block {index} was sent twice")
            if self.block_shape is None:
                self.block_shape = shape
            if self.dtype is None:
                self.dtype = dtype
            if shape != self.block_shape or dtype != self.dtype:
                raise KVTransferError(
                    f"block {index} is {list(shape)} {dtype}, expected {list(self.block_shape)} {self.dtype}"
                )

    def _deliver(self, index: int, block: torch.Tensor) -> bool:
        """Store a received block; False (and the block dropped) if the transfer has ended."""
        with self._cond:
            if self._finished or self._blocks[index] is not None:
                return False
            self._blocks[index] = block
            self._received += 1
            self._bytes += block.numel() * block.element_size()
            self._cond.notify_all()
            return True

    def _wait_received(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._finished or self._received >= count, timeout=timeout)

    def _complete(self, total_blocks: int) -> str | None:
        """The sender's end frame: it sent `total_blocks`, of which this side asked for the
        first `num_blocks`. Returns the failure reason if blocks it announced are missing."""
        with self._cond:
            if self._finished:
                return self._error or "already ended"
            wanted = min(total_blocks, self.num_blocks)
            missing = [i for i in range(wanted) if self._blocks[i] is None]
            if missing:
                self._fail_locked(
                    f"sender ended after {total_blocks} blocks but {len(missing)} of the first {wanted} "
                    f"never arrived (first missing: {missing[0]})"
                )
                return self._error
            self._finish_locked(None)
            return None

    def _fail(self, reason: str) -> bool:
        """Fail the transfer unless already finished; True if this call failed it."""
        with self._cond:
            return self._fail_locked(reason)

    def _expire(self) -> None:
        with self._cond:
            self._fail_locked(f"expired with {self._received} of {self.num_blocks} blocks")
            self._collected = True
            self._blocks = [None] * self.num_blocks

    def _fail_locked(self, reason: str) -> bool:
        if self._finished:
            return False
        self._finish_locked(reason)
        return True

    def _finish_locked(self, error: str | None) -> None:
        self._finished = True
        self._error = error
        if self._started is not None:
            self._elapsed = time.monotonic() - self._started
        self._cond.notify_all()
        if self._on_finish is not None:
            self._on_finish(self)  # under the lock: counters see the final state, once

    @property
    def _accounting(self) -> tuple[int, int, float]:
        """(blocks, bytes, seconds) so far; final once finished."""
        with self._cond:
            return self._received, self._bytes, self._elapsed


class KVReceiver(abc.ABC):
    """Accepts pushed blocks for the transfers it expects (decode side)."""

    @abc.abstractmethod
    def expect(
        self,
        transfer_id: str,
        num_blocks: int,
        *,
        timeout: float | None = None,
        block_shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Expectation:
        """Register a transfer before asking the prefill engine to send it. `num_blocks` is how
        many leading blocks this side wants (blocks past it are not sent). The expectation
        expires `timeout` seconds from now (the receiver's default when None); `block_shape`
        and `dtype` (the receiver's defaults when None; the first block's when those are None
        too) are what every block must match, or the transfer fails."""

    def target(self, transfer_id: str) -> TransferTarget:
        host, port = self.address
        return TransferTarget(host, port, transfer_id)

    @property
    @abc.abstractmethod
    def address(self) -> tuple[str, int]:
        """(host, port) senders connect to."""

    @property
    @abc.abstractmethod
    def stats(self) -> TransferStats: ...

    @property
    @abc.abstractmethod
    def pending(self) -> int:
        """Expectations registered and not yet collected or expired."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening, fail pending expectations, close connections."""
