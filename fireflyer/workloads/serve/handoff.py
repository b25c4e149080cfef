"""Prefill/decode disaggregation in the engine: a decode unit asks the prefill unit the router
named (header `x-fireflyer-prefill`) to compute a prompt and push its full KV blocks; the decode
engine admits the request with those blocks as a prefix-cache hit and computes only the tail
(under 64 tokens, at least the last). Whatever does not arrive is computed locally: a failed
hand-off costs time, never a request.

Prefill side (`PrefillSends`, on the engine thread): after every step, the newly full blocks of
each prompt with a transfer go to a `SendStream`, whose thread sends them while the next step
computes."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from fireflyer.storage.kvcache import chain_keys
from fireflyer.workloads.serve.kv_transfer import KVReceiver, KVSender, SendStream, TransferTarget
from fireflyer.workloads.serve.types import BLOCK_TOKENS, Sequence

log = logging.getLogger(__name__)

PREFILL_HEADER = "x-fireflyer-prefill"
PREFILL_PATH = "/v1/kv/prefill"


@dataclass
class KVHandoff:
    """The leading KV blocks of a prompt received from a prefill unit, under this engine's own
    chain keys for them (so the block manager finds them as a cached prefix)."""

    keys: list[str]
    blocks: list[torch.Tensor | None]


@dataclass
class KVTarget:
    """Where a prefill engine sends a prompt's first `num_blocks` full blocks."""

    target: TransferTarget
    num_blocks: int
    sent: int = 0
    stream: SendStream | None = field(default=None, repr=False)


def handoff_blocks(num_prompt_tokens: int) -> int:
    """Full blocks worth handing over: those before the prompt's last token (the decode engine
    computes at least that token, to sample from it)."""
    return max(0, num_prompt_tokens - 1) // BLOCK_TOKENS


@dataclass
class FetchResult:
    handoff: KVHandoff | None
    blocks: int  # blocks that arrived
    wanted: int
    seconds: float
    failure: str | None  # why fewer than `wanted` arrived


class DecodeFetcher:
    """The decode side: receives blocks on `receiver`, asks prefill units over HTTP; `auth` gives
    the headers that carry this unit's API key, when prefill units ask for one."""

    def __init__(
        self,
        receiver: KVReceiver,
        namespace: str,
        *,
        timeout: float = 60.0,
        auth: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.receiver = receiver
        self.namespace = namespace
        self.timeout = timeout
        self.auth = auth
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0))

    async def fetch(self, prompt_ids: list[int], prefill_url: str) -> FetchResult:
        import asyncio

        wanted = handoff_blocks(len(prompt_ids))
        started = time.monotonic()
        if wanted == 0:
            return FetchResult(None, 0, 0, 0.0, None)
        transfer_id = uuid.uuid4().hex
        expectation = self.receiver.expect(transfer_id, wanted, timeout=self.timeout)
        body = {
            "prompt_token_ids": prompt_ids,
            "transfer": self.receiver.target(transfer_id).to_json(),
            "blocks": wanted,
        }
        failure: str | None = None
        try:
            headers = self.auth() if self.auth is not None else None
            response = await self._client.post(
                prefill_url.rstrip("/") + PREFILL_PATH, json=body, headers=headers
            )
            if response.status_code != 200:
                failure = f"prefill unit answered {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            failure = f"prefill unit {prefill_url} unreachable: {error!r}"
        if failure is not None:
            expectation.cancel()
            blocks: list[torch.Tensor | None] = []
        else:
            blocks = await asyncio.to_thread(expectation.wait, self.timeout)
            if expectation.error:
                failure = expectation.error
        leading = next((i for i, b in enumerate(blocks) if b is None), len(blocks))
        if failure is None and leading < wanted:
            failure = f"{leading} of {wanted} blocks arrived"
        seconds = time.monotonic() - started
        if failure is not None:
            log.warning("KV hand-off from %s: %s; computing the rest here", prefill_url, failure)
        handoff = None
        if leading:
            keys = chain_keys(prompt_ids[: leading * BLOCK_TOKENS], BLOCK_TOKENS, self.namespace)
            handoff = KVHandoff(keys, blocks[:leading])
        return FetchResult(handoff, leading, wanted, seconds, failure)

    async def close(self) -> None:
        await self._client.aclose()
        self.receiver.close()


class PrefillSends:
    """The prefill side, on the engine thread: sends each tracked prompt's blocks as they fill."""

    def __init__(self, sender_factory: Any) -> None:
        self._make_sender = sender_factory
        self._sender: KVSender | None = None

    def before_update(self, seqs: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """The block tables of the sequences with a transfer, before the step's update frees the
        blocks of those that finish (their contents stay intact until the next schedule)."""
        return [(seq, list(seq.block_table)) for seq in seqs if seq.kv_target is not None]

    def after_update(self, tracked: list[tuple[Sequence, list[int]]], read_blocks: Any) -> None:
        for seq, table in tracked:
            target: KVTarget = seq.kv_target
            if target.stream is None:
                if self._sender is None:
                    self._sender = self._make_sender()
                target.stream = self._sender.open(target.target)
            full = min(seq.num_computed_tokens // BLOCK_TOKENS, target.num_blocks, len(table))
            if full > target.sent:
                for index, block in zip(
                    range(target.sent, full), read_blocks(table[target.sent : full]), strict=True
                ):
                    target.stream.send(index, block)
                target.sent = full
            if target.sent == target.num_blocks or seq.is_finished:
                target.stream.finish(target.sent)
                seq.kv_target = None

    def abort(self, seq: Sequence, reason: str) -> None:
        target = seq.kv_target
        if target is not None and target.stream is not None:
            target.stream.abort(reason)
        seq.kv_target = None

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


__all__ = [
    "PREFILL_HEADER",
    "PREFILL_PATH",
    "DecodeFetcher",
    "FetchResult",
    "KVHandoff",
    "KVTarget",
    "PrefillSends",
    "handoff_blocks",
]
