"""KV hand-off for prefill/decode disaggregation: a prefill engine pushes the full KV blocks of a
prompt to the decode engine that will generate from it.

Decode side: `receiver.expect(transfer_id, num_blocks)` before asking the prefill engine, hand it
`receiver.target(transfer_id)` (JSON via `to_json`), then `Expectation.wait()` and
`ReceivedTier.put(chain keys, blocks)` before adding the request. Prefill side:
`stream = sender.open(target)`, `stream.send(index, block)` as each block fills, then
`stream.finish(total_blocks)`. Transports: `tcp` (always) and `nixl` (when the package is
installed); `make_transport` picks one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fireflyer.workloads.serve.kv_transfer.base import (
    Expectation,
    KVReceiver,
    KVSender,
    KVTransferError,
    SendResult,
    SendStream,
    TransferStats,
    TransferTarget,
)
from fireflyer.workloads.serve.kv_transfer.nixl import NixlKVReceiver, NixlKVSender, nixl_available
from fireflyer.workloads.serve.kv_transfer.received_tier import ReceivedTier
from fireflyer.workloads.serve.kv_transfer.tcp_receive import TcpKVReceiver
from fireflyer.workloads.serve.kv_transfer.tcp_send import TcpKVSender

TransportKind = Literal["auto", "tcp", "nixl"]


@dataclass(frozen=True)
class Transport:
    """Builds the sender (prefill role) and receiver (decode role) of one transport."""

    kind: Literal["tcp", "nixl"]

    def sender(self, **kwargs: Any) -> KVSender:
        """Keyword arguments: those of `TcpKVSender` (`NixlKVSender` adds staging_blocks, backends)."""
        return NixlKVSender(**kwargs) if self.kind == "nixl" else TcpKVSender(**kwargs)

    def receiver(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> KVReceiver:
        """Keyword arguments: those of `TcpKVReceiver` (`NixlKVReceiver` needs block_shape and
        dtype, and adds arena_blocks, backends)."""
        if self.kind == "nixl":
            return NixlKVReceiver(host, port, **kwargs)
        return TcpKVReceiver(host, port, **kwargs)


def make_transport(kind: TransportKind | str = "auto") -> Transport:
    """`tcp`, `nixl` (KVTransferError if the nixl package cannot be imported), or `auto`: nixl
    when importable, else tcp. The two interoperate: a NIXL sender sends inline to a TCP
    receiver, and a NIXL receiver takes inline bytes from a TCP sender."""
    if kind == "tcp":
        return Transport("tcp")
    if kind == "nixl":
        if not nixl_available():
            raise KVTransferError(
                "KV transport nixl requested but the nixl package is not importable "
                "(pip install nixl[cu12] or nixl[cu13]); use tcp or auto"
            )
        return Transport("nixl")
    if kind == "auto":
        return Transport("nixl" if nixl_available() else "tcp")
    raise ValueError(f"KV transport must be auto, tcp or nixl, not {kind!r}")


__all__ = [
    "Expectation",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "NixlKVReceiver",
    "NixlKVSender",
    "ReceivedTier",
    "SendResult",
    "SendStream",
    "TcpKVReceiver",
    "TcpKVSender",
    "TransferStats",
    "TransferTarget",
    "Transport",
    "make_transport",
    "nixl_available",
]
