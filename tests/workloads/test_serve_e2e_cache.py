"""End to end: `fireflyer serve` as a real process, driven over HTTP (tests/workloads/serve_servers.py),
on tight budgets: the small server (preempted sequences against the offline engine) and the tier
server (the on-disk KV tier across a restart, and a full queue)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fireflyer.workloads.serve.types import BLOCK_TOKENS
from tests.workloads.serve_servers import (
    PREEMPTIONS,
    REQUEST_TIMEOUT_S,
    TIER_HIT,
    Completion,
    Reference,
    Server,
    assert_error,
    assert_matches,
    client,
    logs_on_failure,
    metrics,
    random_prompt,
    read_usage,
    run_all,
    run_one,
    started_servers,
)
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.serve_servers import reference as reference


@pytest.fixture(scope="module")
def servers(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Both servers of this module, started at once so they load in parallel."""
    with started_servers(["small", "tier"], checkpoint, tmp_path_factory) as started:
        yield started


@pytest.fixture(scope="module")
def small_server(servers: dict[str, Server]) -> Server:
    return servers["small"].wait_ready()


@pytest.fixture(scope="module")
def tier_server(servers: dict[str, Server]) -> Server:
    return servers["tier"].wait_ready()


# -- tests -------------------------------------------------------------------------------------


def test_preempted_sequences_give_unpreempted_output(small_server: Server, reference: Reference) -> None:
    # Each prompt fits 2 blocks and outgrows them while decoding: 12 blocks hold 6 such prompts at
    # admission, and none of them can take its third block without preempting another.
    rng = random.Random(3)
    prompts = [random_prompt(rng, rng.randint(105, 124)) for _ in range(12)]
    max_tokens = [rng.randint(24, 28) for _ in prompts]
    streamed = [i % 2 == 1 for i in range(len(prompts))]
    expected = reference.texts(prompts, max_tokens)
    with logs_on_failure(small_server):
        before = metrics(small_server)
        results = run_all(small_server, prompts, max_tokens, streamed)
        assert_matches(results, expected, prompts, max_tokens)
        after = metrics(small_server)
        assert after[PREEMPTIONS] - before[PREEMPTIONS] > 0, "the block budget should force preemption"


def test_kv_tier_serves_evicted_prefix_across_restart(tier_server: Server) -> None:
    rng = random.Random(4)
    full_blocks = 4
    a = random_prompt(rng, full_blocks * BLOCK_TOKENS + 10)
    # With 8 blocks, two prompts of 5 blocks evict every block of A (LRU); a third makes sure.
    others = [random_prompt(rng, full_blocks * BLOCK_TOKENS + 10) for _ in range(3)]
    with logs_on_failure(tier_server):
        first = run_one(tier_server, a, 16)
        assert first.status == 200 and first.completion_tokens == 16, first
        assert first.cached_tokens == 0
        for prompt in others:
            assert run_one(tier_server, prompt, 8).status == 200
        before = metrics(tier_server)
        second = run_one(tier_server, a, 16, stream=True)
        after = metrics(tier_server)
        assert second.status == 200 and second.completion_tokens == 16, second
        assert second.cached_tokens == full_blocks * BLOCK_TOKENS
        assert after[TIER_HIT] - before[TIER_HIT] == full_blocks * BLOCK_TOKENS, "A's blocks came from disk"
        assert second.text == first.text

        tier_server.restart()  # a new process: an empty device cache over the same directory
        third = run_one(tier_server, a, 16)
        assert third.status == 200 and third.completion_tokens == 16, third
        assert third.cached_tokens == full_blocks * BLOCK_TOKENS
        assert metrics(tier_server)[TIER_HIT] == full_blocks * BLOCK_TOKENS
        assert third.text == first.text


def test_full_queue_answers_503_while_in_flight_completes(tier_server: Server) -> None:
    # The tier server runs one sequence and queues one more: with one running, of a burst of
    # five the first waits and the others find the queue full.
    rng = random.Random(5)
    long_prompt, short_prompt = random_prompt(rng, 20), random_prompt(rng, 6)

    async def scenario() -> tuple[Completion, list[httpx.Response]]:
        async with client(tier_server) as c:
            running = asyncio.Event()
            body = {"prompt": long_prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
            body |= {"stream": True, "stream_options": {"include_usage": True}}

            async def in_flight() -> Completion:
                result = Completion(0)
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    result.status = r.status_code
                    async for line in r.aiter_lines():
                        running.set()
                        payload = line.removeprefix("data: ")
                        if line and payload != "[DONE]":
                            event = json.loads(payload)
                            result.chunks += 1
                            if event.get("usage"):
                                read_usage(result, event["usage"])
                            for choice in event["choices"]:
                                result.finish_reason = choice["finish_reason"] or result.finish_reason
                running.set()
                return result

            task = asyncio.ensure_future(in_flight())
            await asyncio.wait_for(running.wait(), REQUEST_TIMEOUT_S)
            short = {"prompt": short_prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
            burst = await asyncio.gather(*(c.post("/v1/completions", json=short) for _ in range(5)))
            return await task, list(burst)

    with logs_on_failure(tier_server):
        long_one, burst = asyncio.run(scenario())
        assert long_one.status == 200
        assert long_one.completion_tokens == 64 and long_one.finish_reason == "length", long_one
        statuses = sorted(r.status_code for r in burst)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
        texts = set()
        for r in burst:
            if r.status_code == 503:
                assert_error(r, 503, code="server_overloaded")
            else:
                assert r.json()["usage"]["completion_tokens"] == 4
                texts.add(r.json()["choices"][0]["text"])
        assert len(texts) == 1, f"one prompt served alone each time gave different texts: {texts}"
        after = run_one(tier_server, short_prompt, 4)
        assert after.status == 200 and after.completion_tokens == 4 and after.text in texts
