"""The KV hand-off transport over loopback: exact round trips, ordering, every way a transfer
ends early, memory bounds, and the factory. The tier that installs received blocks is in
test_kv_received_tier.py, the NIXL data path in test_kv_transfer_nixl.py."""

from __future__ import annotations

import gc
import json
import socket
import struct
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fireflyer.workloads.serve import kv_transfer
from fireflyer.workloads.serve.kv_transfer import (
    KVTransferError,
    TcpKVReceiver,
    TcpKVSender,
    TransferTarget,
    make_transport,
)

TOKENS, LAYERS, LATENT = 64, 3, 16
BLOCK_BYTES = TOKENS * LAYERS * LATENT * 2  # one BF16 block


def random_blocks(
    n: int, dtype: torch.dtype, shape: tuple[int, ...] = (TOKENS, LAYERS, LATENT)
) -> list[torch.Tensor]:
    """Random bit patterns (NaNs and infinities included), so only a byte-exact path compares
    equal."""
    generator = torch.Generator().manual_seed(n)
    nbytes = torch.empty((), dtype=dtype).element_size()
    out = []
    for _ in range(n):
        raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * nbytes), dtype=torch.uint8, generator=generator)
        out.append(raw.view(dtype))
    return out


def same_bits(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return (
        a is not None
        and a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


@pytest.fixture
def receiver() -> Iterator[TcpKVReceiver]:
    with TcpKVReceiver("127.0.0.1", 0, default_timeout=10.0, io_timeout=5.0) as r:
        yield r


@pytest.fixture
def sender() -> Iterator[TcpKVSender]:
    s = TcpKVSender(connect_timeout=2.0, io_timeout=5.0)
    yield s
    s.close()


class RawSender:
    """Speaks the wire format by hand, to play senders that misbehave."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5.0)

    def frame(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = json.dumps(header).encode()
        self.sock.sendall(struct.pack(">I", len(data)) + data + payload)

    def reply(self) -> dict[str, Any]:
        (length,) = struct.unpack(">I", self._exact(4))
        result: dict[str, Any] = json.loads(self._exact(length))
        return result

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def open(self, transfer_id: str) -> dict[str, Any]:
        self.frame({"type": "open", "version": 1, "transfer_id": transfer_id, "data": ["inline"]})
        return self.reply()

    def block(self, transfer_id: str, index: int, block: torch.Tensor) -> None:
        payload = block.contiguous().view(torch.uint8).numpy().tobytes()
        header = {
            "type": "block",
            "transfer_id": transfer_id,
            "index": index,
            "dtype": str(block.dtype).removeprefix("torch."),
            "shape": list(block.shape),
            "nbytes": len(payload),
        }
        self.frame(header, payload)

    def close(self) -> None:
        self.sock.close()


# -- the target --------------------------------------------------------------------------------


def test_target_round_trips_through_json_and_rejects_bad_fields() -> None:
    target = TransferTarget("10.0.0.7", 7100, "req-1-abc")
    assert TransferTarget.from_json(json.loads(json.dumps(target.to_json()))) == target
    for bad in ({"host": "", "port": 1, "transfer_id": "x"}, {"host": "h", "port": 0, "transfer_id": "x"}):
        with pytest.raises(ValueError, match="transfer target"):
            TransferTarget.from_json(bad)
    with pytest.raises(ValueError, match="port"):
        TransferTarget.from_json({"host": "h", "port": "7100", "transfer_id": "x"})
    with pytest.raises(ValueError, match="transfer_id"):
        TransferTarget.from_json({"host": "h", "port": 7100})


# -- TCP round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocks_round_trip_bit_exact(
    receiver: TcpKVReceiver, sender: TcpKVSender, dtype: torch.dtype
) -> None:
    blocks = random_blocks(5, dtype)
    expectation = receiver.expect("t-exact", 5, block_shape=(TOKENS, LAYERS, LATENT), dtype=dtype)
    stream = sender.open(receiver.target("t-exact"))
    for index, block in enumerate(blocks):
        stream.send(index, block)
    stream.finish(5)

    received = expectation.wait(timeout=10)
    result = stream.wait(timeout=10)
    assert expectation.ok and expectation.error is None
    assert all(same_bits(got, want) for got, want in zip(received, blocks, strict=True))
    assert stream.mode == "inline" and result.blocks == 5
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    assert result.bytes == nbytes
    assert receiver.stats.bytes == nbytes and receiver.stats.blocks == 5
    assert receiver.stats.transfers_ok == 1 and receiver.stats.transfers_failed == 0
    assert sender.stats.transfers_ok == 1 and sender.stats.bytes == nbytes
    assert receiver.pending == 0  # collected


def test_blocks_sent_out_of_order_land_in_their_slots(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    blocks = random_blocks(8, torch.bfloat16)
    expectation = receiver.expect("t-order", 8)
    stream = sender.open(receiver.target("t-order"))
    for index in (5, 0, 7, 2, 1, 6, 3, 4):
        stream.send(index, blocks[index])
    stream.finish(8)
    received = expectation.wait(timeout=10)
    assert expectation.ok
    assert [same_bits(got, want) for got, want in zip(received, blocks, strict=True)] == [True] * 8


def test_only_the_blocks_the_receiver_wants_are_sent(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    # A prompt of exactly 3 blocks: the decode side computes the last block itself.
    blocks = random_blocks(3, torch.bfloat16)
    expectation = receiver.expect("t-wanted", 2)
    stream = sender.open(receiver.target("t-wanted"))
    for index, block in enumerate(blocks):
        stream.send(index, block)
    stream.finish(3)
    received = expectation.wait(timeout=10)
    assert expectation.ok and len(received) == 2
    assert stream.wait(timeout=10).blocks == 2
    assert receiver.stats.blocks == 2


def test_fewer_blocks_than_wanted_complete_with_gaps(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    blocks = random_blocks(2, torch.bfloat16)
    expectation = receiver.expect("t-short", 4)
    stream = sender.open(receiver.target("t-short"))
    for index, block in enumerate(blocks):
        stream.send(index, block)
    stream.finish(2)
    received = expectation.wait(timeout=10)
    assert expectation.ok
    assert same_bits(received[1], blocks[1]) and received[2:] == [None, None]


def test_an_announced_block_that_never_came_fails_the_transfer(
    receiver: TcpKVReceiver, sender: TcpKVSender
) -> None:
    blocks = random_blocks(3, torch.bfloat16)
    expectation = receiver.expect("t-gap", 3)
    stream = sender.open(receiver.target("t-gap"))
    stream.send(0, blocks[0])
    stream.send(2, blocks[2])
    stream.finish(3)
    received = expectation.wait(timeout=10)
    assert expectation.error is not None and "first missing: 1" in expectation.error
    assert same_bits(received[0], blocks[0]) and received[1] is None
    with pytest.raises(KVTransferError, match="never arrived"):
        stream.wait(timeout=10)


# -- transfers that end early ------------------------------------------------------------------


def test_sender_disconnecting_midway_returns_what_arrived(receiver: TcpKVReceiver) -> None:
    blocks = random_blocks(6, torch.bfloat16)
    expectation = receiver.expect("t-drop", 6, timeout=30)
    raw = RawSender(receiver.address)
    assert raw.open("t-drop") == {"type": "accept", "blocks": 6, "data": "inline"}
    raw.block("t-drop", 0, blocks[0])
    raw.block("t-drop", 3, blocks[3])
    raw.close()

    start = time.monotonic()
    received = expectation.wait()  # until the deadline at most: returns early on the disconnect
    assert time.monotonic() - start < 5
    assert expectation.error is not None and "disconnected after 2 of 6 blocks" in expectation.error
    assert same_bits(received[0], blocks[0]) and same_bits(received[3], blocks[3])
    assert [b is None for b in received] == [False, True, True, False, True, True]
    assert receiver.stats.transfers_failed == 1 and receiver.stats.blocks == 2


def test_sender_abort_reaches_the_waiting_receiver(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    blocks = random_blocks(4, torch.bfloat16)
    expectation = receiver.expect("t-abort", 4, timeout=30)
    stream = sender.open(receiver.target("t-abort"))
    stream.send(0, blocks[0])
    assert expectation._wait_received(1, timeout=5)
    stream.abort("request cancelled")
    received = expectation.wait(timeout=10)
    assert expectation.error == "sender aborted: request cancelled"
    assert same_bits(received[0], blocks[0]) and received[1:] == [None] * 3
    with pytest.raises(KVTransferError, match="aborted: request cancelled"):
        stream.wait(timeout=10)
    with pytest.raises(ValueError, match="already finished or aborted"):
        stream.send(1, blocks[1])


def test_unknown_transfer_id_is_refused(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    expectation = receiver.expect("t-known", 1)
    stream = sender.open(receiver.target("t-unknown"))
    stream.send(0, random_blocks(1, torch.bfloat16)[0])
    stream.finish(1)
    with pytest.raises(KVTransferError, match="refused by the receiver: unknown or expired transfer id"):
        stream.wait(timeout=10)
    assert receiver.stats.refused == 1 and sender.stats.refused == 1
    assert not expectation.done and receiver.pending == 1  # the real transfer is untouched


def test_a_second_sender_for_the_same_transfer_is_refused(receiver: TcpKVReceiver) -> None:
    receiver.expect("t-twice", 2)
    first = RawSender(receiver.address)
    assert first.open("t-twice")["type"] == "accept"
    second = RawSender(receiver.address)
    assert second.open("t-twice") == {"type": "refuse", "reason": "transfer t-twice already has a sender"}
    first.close()
    second.close()


def test_layout_mismatch_fails_the_transfer(sender: TcpKVSender) -> None:
    with TcpKVReceiver(
        block_shape=(TOKENS, LAYERS, LATENT), dtype=torch.bfloat16, io_timeout=5.0
    ) as receiver:
        expectation = receiver.expect("t-layout", 2)
        stream = sender.open(receiver.target("t-layout"))
        stream.send(0, random_blocks(1, torch.float32)[0])
        stream.finish(2)
        expectation.wait(timeout=10)
        assert expectation.error is not None and "expected [64, 3, 16] torch.bfloat16" in expectation.error
        with pytest.raises(KVTransferError, match="receiver failed the transfer: block 0 is"):
            stream.wait(timeout=10)


def test_blocks_of_one_transfer_must_share_a_layout(receiver: TcpKVReceiver) -> None:
    expectation = receiver.expect("t-mixed", 2)  # no layout given: the first block sets it
    raw = RawSender(receiver.address)
    raw.open("t-mixed")
    raw.block("t-mixed", 0, random_blocks(1, torch.bfloat16)[0])
    raw.block("t-mixed", 1, random_blocks(1, torch.bfloat16, (TOKENS, LAYERS, LATENT * 2))[0])
    assert raw.reply()["type"] == "error"
    raw.close()
    received = expectation.wait(timeout=10)
    assert expectation.error is not None and "block 1 is [64, 3, 32]" in expectation.error
    assert received[0] is not None


def test_malformed_frames_fail_the_transfer_not_the_receiver(
    receiver: TcpKVReceiver, sender: TcpKVSender
) -> None:
    expectation = receiver.expect("t-lies", 1)
    raw = RawSender(receiver.address)
    raw.open("t-lies")
    # 10 bytes announced for a 64x3x16 bf16 block: refused before any payload is read.
    raw.frame(
        {
            "type": "block",
            "transfer_id": "t-lies",
            "index": 0,
            "dtype": "bfloat16",
            "shape": [64, 3, 16],
            "nbytes": 10,
        }
    )
    assert "announces 10 bytes" in raw.reply()["reason"]
    raw.close()
    garbage = socket.create_connection(receiver.address, timeout=5)
    garbage.sendall(b"\xff\xff\xff\xff not a frame")
    garbage.close()
    expectation.wait(timeout=10)
    assert expectation.error is not None and "announces 10 bytes" in expectation.error

    blocks = random_blocks(1, torch.bfloat16)
    good = receiver.expect("t-after", 1)  # the receiver still serves
    stream = sender.open(receiver.target("t-after"))
    stream.send(0, blocks[0])
    stream.finish(1)
    assert same_bits(good.wait(timeout=10)[0], blocks[0])


def test_wait_timeout_returns_what_arrived_and_cuts_the_sender_off(
    receiver: TcpKVReceiver, sender: TcpKVSender
) -> None:
    blocks = random_blocks(3, torch.bfloat16)
    expectation = receiver.expect("t-slow", 3, timeout=30)
    stream = sender.open(receiver.target("t-slow"))
    stream.send(0, blocks[0])
    assert expectation._wait_received(1, timeout=5)
    received = expectation.wait(timeout=0.2)
    assert expectation.error is not None and expectation.error.startswith("timed out after 0.2s with 1 of 3")
    assert same_bits(received[0], blocks[0]) and received[1:] == [None, None]
    assert receiver.pending == 0
    stream.send(1, blocks[1])  # the prefill engine did not hear about it: its next frame fails
    stream.finish(3)
    with pytest.raises(KVTransferError, match=r"timed out after 0\.2s"):
        stream.wait(timeout=10)


def test_expired_expectation_frees_its_blocks(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    blocks = random_blocks(4, torch.bfloat16)
    expectation = receiver.expect("t-expire", 4, timeout=0.5)
    stream = sender.open(receiver.target("t-expire"))
    stream.send(0, blocks[0])
    stream.send(1, blocks[1])
    assert expectation._wait_received(2, timeout=5)
    held = [weakref.ref(b) for b in expectation._blocks if b is not None]
    assert len(held) == 2

    deadline = time.monotonic() + 5
    while receiver.pending and time.monotonic() < deadline:  # nobody waits: the reaper expires it
        time.sleep(0.05)
    gc.collect()
    assert receiver.pending == 0
    assert expectation.error is not None and expectation.error.startswith("expired with 2 of 4 blocks")
    assert all(ref() is None for ref in held)
    assert expectation.wait() == [None] * 4
    stream.finish(4)
    with pytest.raises(KVTransferError):
        stream.wait(timeout=10)
    late = sender.open(receiver.target("t-expire"))  # a sender arriving after expiry is refused
    late.finish(0)
    with pytest.raises(KVTransferError, match="unknown or expired"):
        late.wait(timeout=10)


def test_connection_refused_is_reported_by_wait(sender: TcpKVSender) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = sender.open(TransferTarget("127.0.0.1", port, "t-nobody"))
    stream.send(0, random_blocks(1, torch.bfloat16)[0])
    stream.finish(1)  # never raises for the transport: the engine loop calls it unguarded
    with pytest.raises(KVTransferError, match="ConnectionRefusedError"):
        stream.wait(timeout=10)
    assert stream.done and stream.error is not None and sender.stats.transfers_failed == 1


def test_closing_the_receiver_fails_pending_expectations() -> None:
    receiver = TcpKVReceiver()
    expectation = receiver.expect("t-closing", 2)
    raw = RawSender(receiver.address)
    raw.open("t-closing")
    receiver.close()
    assert expectation.wait(timeout=5) == [None, None]
    assert expectation.error == "the receiver closed"
    raw.close()
    with pytest.raises(KVTransferError, match="closed"):
        receiver.expect("t-later", 1)


def test_expect_rejects_duplicates(receiver: TcpKVReceiver) -> None:
    receiver.expect("t-dup", 1)
    with pytest.raises(ValueError, match="already expected"):
        receiver.expect("t-dup", 1)


def test_loopback_throughput(receiver: TcpKVReceiver, sender: TcpKVSender) -> None:
    blocks = [torch.randn(TOKENS, 4, 512).to(torch.bfloat16) for _ in range(64)]
    mib = sum(b.numel() * b.element_size() for b in blocks) / 2**20
    for round_ in ("cold", "warm"):  # the first pays for connection and thread start-up
        expectation = receiver.expect(f"t-bulk-{round_}", 64)
        start = time.perf_counter()
        stream = sender.open(receiver.target(f"t-bulk-{round_}"))
        for index, block in enumerate(blocks):
            stream.send(index, block)
        stream.finish(64)
        received = expectation.wait(timeout=30)
        seconds = time.perf_counter() - start
        stream.wait(timeout=30)
        assert expectation.ok and same_bits(received[-1], blocks[-1])
        rate = mib / seconds
        print(
            f"\nKV hand-off over TCP loopback, {round_}: {mib:.0f} MiB in {seconds:.3f}s = {rate:.0f} MiB/s"
        )
        assert seconds < 10


# -- the factory -------------------------------------------------------------------------------


def test_make_transport_without_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_transfer, "nixl_available", lambda: False)
    assert make_transport("tcp").kind == "tcp"
    assert make_transport("auto").kind == "tcp"
    with pytest.raises(KVTransferError, match="nixl requested but the nixl package is not importable"):
        make_transport("nixl")
    with pytest.raises(ValueError, match="auto, tcp or nixl"):
        make_transport("rdma")
    receiver = make_transport("tcp").receiver()
    sender = make_transport("tcp").sender()
    try:
        assert isinstance(receiver, TcpKVReceiver) and isinstance(sender, TcpKVSender)
    finally:
        receiver.close()
        sender.close()
