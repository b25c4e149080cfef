"""Framing on the control connection: a 4-byte big-endian length, a JSON header of that length,
then, for block frames only, the header's `nbytes` of raw tensor bytes.

Frames, in order (S = sender, R = receiver):
  S→R {"type": "open", "version": 1, "transfer_id": id, "data": ["nixl", "inline"]}
  R→S {"type": "accept", "blocks": n, "data": "inline"}  or  {"type": "refuse", "reason": ...}
  S→R {"type": "block", "transfer_id": id, "index": i, "dtype": "bfloat16",
       "shape": [64, layers, latent], "nbytes": b} + b bytes           (inline data, any order)
  S→R {"type": "end", "blocks": total, "placed": k}  or  {"type": "abort", "reason": ...}
  R→S {"type": "done", "blocks": received}  or  {"type": "error", "reason": ...}
The receiver may send an error frame at any time, then closes."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import torch

VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # an accept frame carries NIXL agent metadata: a few KiB to 100s of KiB
_LENGTH = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame here."""


class PeerClosed(ConnectionError):
    """The peer closed the connection."""


def send_frame(sock: socket.socket, header: dict[str, Any], payload: memoryview | None = None) -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)
    if payload is not None:
        sock.sendall(payload)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; straight into the caller's buffer, no intermediate copy."""
    while view.nbytes:
        count = sock.recv_into(view)
        if count == 0:
            raise PeerClosed("connection closed by the peer")
        view = view[count:]


def recv_header(sock: socket.socket) -> dict[str, Any]:
    prefix = bytearray(_LENGTH.size)
    recv_exact(sock, memoryview(prefix))
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    data = bytearray(length)
    recv_exact(sock, memoryview(data))
    try:
        header = json.loads(data)
    except ValueError as e:
        raise ProtocolError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("frame header is not an object with a type")
    return header


def tensor_bytes(block: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (bfloat16 and float8 have no
    numpy dtype, hence the uint8 view)."""
    array: Any = block.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def int_field(header: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProtocolError(
            f"{header['type']} frame field {name} must be an integer ≥ {minimum}, not {value!r}"
        )
    return value


def tune_socket(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(timeout)
    # Headers are small and each is followed by a large payload or a reply: no Nagle delay.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
