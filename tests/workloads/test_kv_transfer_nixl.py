"""The KV hand-off over NIXL (where the nixl package is importable): one-sided writes, the
inline-bytes fallback, and a receiver failure that stops the sender."""

from __future__ import annotations

import time

import pytest
import torch

from fireflyer.workloads.serve.kv_transfer import (
    KVTransferError,
    TcpKVReceiver,
    TcpKVSender,
    make_transport,
    nixl_available,
)
from tests.workloads.test_kv_transfer import BLOCK_BYTES, LATENT, LAYERS, TOKENS, random_blocks, same_bits

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="the nixl package is not installed")


@needs_nixl
def test_nixl_round_trip_uses_one_sided_writes() -> None:
    transport = make_transport("nixl")
    receiver = transport.receiver(block_shape=(TOKENS, LAYERS, LATENT), dtype=torch.bfloat16, arena_blocks=8)
    sender = transport.sender(staging_blocks=2)  # fewer than the blocks: slots are reused
    try:
        blocks = random_blocks(6, torch.bfloat16)
        expectation = receiver.expect("n-1", 6)
        stream = sender.open(receiver.target("n-1"))
        for index in (3, 1, 0, 5, 2, 4):
            stream.send(index, blocks[index])
        stream.finish(6)
        received = expectation.wait(timeout=20)
        assert stream.wait(timeout=20).blocks == 6
        assert stream.mode == "nixl" and expectation.ok
        assert [same_bits(got, want) for got, want in zip(received, blocks, strict=True)] == [True] * 6
        assert receiver.stats.bytes == sender.stats.bytes == 6 * BLOCK_BYTES

        # The arena slots came back: a transfer needing all of them still goes by NIXL.
        expectation = receiver.expect("n-2", 8)
        stream = sender.open(receiver.target("n-2"))
        more = random_blocks(8, torch.bfloat16)
        for index, block in enumerate(more):
            stream.send(index, block)
        stream.finish(8)
        assert all(same_bits(g, w) for g, w in zip(expectation.wait(timeout=20), more, strict=True))
        assert stream.mode == "nixl"
    finally:
        sender.close()
        receiver.close()


@needs_nixl
def test_nixl_falls_back_to_inline_bytes() -> None:
    nixl = make_transport("nixl")
    receiver = nixl.receiver(block_shape=(TOKENS, LAYERS, LATENT), dtype=torch.bfloat16, arena_blocks=2)
    tcp_receiver = TcpKVReceiver()
    sender = nixl.sender()
    tcp_sender = TcpKVSender()
    try:
        cases = [
            (receiver, sender, "f-arena", 3),  # more blocks than the arena holds
            (tcp_receiver, sender, "f-tcp-receiver", 2),  # a receiver without NIXL
            (receiver, tcp_sender, "f-tcp-sender", 2),  # a sender without NIXL
        ]
        for rx, tx, transfer_id, n in cases:
            blocks = random_blocks(n, torch.bfloat16)
            expectation = rx.expect(transfer_id, n)
            stream = tx.open(rx.target(transfer_id))
            for index, block in enumerate(blocks):
                stream.send(index, block)
            stream.finish(n)
            received = expectation.wait(timeout=20)
            stream.wait(timeout=20)
            assert stream.mode == "inline", transfer_id
            assert all(same_bits(g, w) for g, w in zip(received, blocks, strict=True)), transfer_id
    finally:
        for closable in (sender, tcp_sender, receiver, tcp_receiver):
            closable.close()


@needs_nixl
def test_nixl_receiver_failure_stops_the_sender_and_recycles_slots() -> None:
    transport = make_transport("nixl")
    receiver = transport.receiver(block_shape=(TOKENS, LAYERS, LATENT), dtype=torch.bfloat16, arena_blocks=4)
    sender = transport.sender(staging_blocks=2)
    try:
        blocks = random_blocks(4, torch.bfloat16)
        expectation = receiver.expect("n-cut", 4, timeout=30)
        stream = sender.open(receiver.target("n-cut"))
        stream.send(0, blocks[0])
        assert expectation._wait_received(1, timeout=10)
        expectation.wait(timeout=0.1)  # the decode side gives up
        stream.send(1, blocks[1])
        stream.finish(4)
        with pytest.raises(KVTransferError, match="timed out"):
            stream.wait(timeout=20)
        deadline = time.monotonic() + 10
        while len(receiver._free_slots) < 4 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.02)
        assert len(receiver._free_slots) == 4  # type: ignore[attr-defined]
    finally:
        sender.close()
        receiver.close()
