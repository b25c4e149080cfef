"""`fireflyer router` over HTTP, in front of units that serve the real OpenAI API app of
`fireflyer serve` over a scripted engine (tests/workloads/router_harness.py).

Covered here: each policy's choice, cache-aware affinity and its load cap, a retry when a unit is
dead or answers 5xx before the first token, a stream broken or stalled mid-way, a client that
leaves, /health when no unit is healthy, pass-through of JSON and SSE, and the metrics. The
backends file, (prefill, decode) pairs, the operator's command line and a real `fireflyer serve`
process are in test_router_units.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fireflyer.workloads.router.policies import Candidate, affine, request_key
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import MODEL, sse_events
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import tokenizer as tokenizer
from tests.workloads.router_harness import (
    BACKEND,
    Unit,
    assert_openai_error,
    body,
    eventually,
    health,
    metrics,
    routing,
    sample,
    serving,
    without_ids,
)

pytestmark = pytest.mark.anyio


# -- pass-through and the policies ---------------------------------------------------------------


async def test_round_robin_passes_answers_through_unchanged(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 2) as units, routing(units) as client:
        urls = [u.url for u in units]
        served = []
        for i in range(4):
            r = await client.post("/v1/completions", json=body(f"request {i}"))
            assert r.status_code == 200, r.text
            served.append(r.headers[BACKEND])
            async with httpx.AsyncClient(base_url=r.headers[BACKEND], trust_env=False) as direct:
                same = await direct.post("/v1/completions", json=body(f"request {i}"))
            assert without_ids(r.json()) == without_ids(same.json())
        assert sorted(served) == sorted(urls * 2) and served[0] != served[1]
        assert [u.requests for u in units] == [4, 4]  # 2 through the router and 2 direct each

        for path, request in (
            ("/v1/completions", body("Stream me", stream=True, stream_options={"include_usage": True})),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
        ):
            r = await client.post(path, json=request)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async with httpx.AsyncClient(base_url=r.headers[BACKEND], trust_env=False) as direct:
                same = await direct.post(path, json=request)
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and len(events) > 3
            assert [without_ids(e) for e in events] == [without_ids(e) for e in sse_events(same.text)]

        # Each unit's model card carries its own start time: compare with the unit that answered.
        r = await client.get("/v1/models")
        assert r.headers[BACKEND] in urls
        async with httpx.AsyncClient(base_url=r.headers[BACKEND], trust_env=False) as direct:
            assert r.json() == (await direct.get("/v1/models")).json()
        assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL

        # A 4xx is the client's: passed through as the unit said it, not retried.
        before = sum(u.requests for u in units)
        r = await client.post("/v1/completions", json=body(model="no-such-model"))
        assert_openai_error(r, 404, "model_not_found")
        r = await client.post(
            "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}
        )
        assert_openai_error(r, 400, None)
        assert sum(u.requests for u in units) == before

        m = await metrics(client)
        assert sum(sample(m, "requests_total", backend=u, outcome="ok") for u in urls) == 6
        assert sum(sample(m, "requests_total", backend=u, outcome="client_error") for u in urls) == 2
        assert sample(m, "retries_total", reason="server_error") == 0
        assert sample(m, "time_to_first_byte_seconds_count") == 8
        assert sample(m, "request_duration_seconds_count") == 8
        assert all(sample(m, "backend_healthy", backend=u, role="decode") == 1 for u in urls)
        assert all(sample(m, "in_flight_requests", backend=u) == 0 for u in urls)


async def test_least_load_sends_requests_to_the_idle_unit(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 2) as (idle, stuck), routing([idle, stuck], "least-load") as client:
        stuck.engine.gate.clear()  # what `stuck` is given stays in flight
        pending = []
        for i in range(6):  # one at a time: each lands on a unit before the next is sent
            before = stuck.requests
            task = asyncio.create_task(client.post("/v1/completions", json=body(f"request {i}")))
            await eventually(functools.partial(_landed, task, stuck, before))
            pending.append(task)
        assert stuck.requests == 1 and idle.requests == 5
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=stuck.url) == 1
        assert sample(m, "in_flight_requests", backend=idle.url) == 0
        stuck.engine.gate.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(*pending))
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=stuck.url) == 0


async def test_cache_aware_keeps_a_prefix_on_its_unit_up_to_the_load_cap(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 3) as units:
        by_url = {u.url: u for u in units}
        async with routing(units, "cache-aware", load_cap=1, prefix_chars=32) as client:
            shared = "You are a helpful assistant. Answer briefly."  # longer than the 32-char key
            key = request_key(body(shared), 32)
            home = affine([Candidate(u.url, "decode", 0) for u in units], key).url
            for i in range(5):
                r = await client.post("/v1/completions", json=body(f"{shared} Question {i}?"))
                assert r.status_code == 200 and r.headers[BACKEND] == home
            spread = set()
            for i in range(12):
                r = await client.post("/v1/completions", json=body(f"{i} unrelated prompt"))
                spread.add(r.headers[BACKEND])
            assert len(spread) > 1

            # The load cap: home keeps its prefix while it has at most 1 request more in flight
            # than the least-loaded unit; beyond that the request goes to the least-loaded one.
            by_url[home].engine.gate.clear()
            held = []
            for i in range(2):
                held.append(asyncio.create_task(client.post("/v1/completions", json=body(f"{shared} {i}"))))
                await eventually(functools.partial(_open, by_url[home], i + 1))
            r = await client.post("/v1/completions", json=body(f"{shared} one more"))
            assert r.status_code == 200 and r.headers[BACKEND] != home
            by_url[home].engine.gate.set()
            results = await asyncio.wait_for(asyncio.gather(*held), 10)
            assert [h.headers[BACKEND] for h in results] == [home] * 2


def _landed(task: asyncio.Task[httpx.Response], unit: Unit, before: int) -> bool:
    """The request is done (elsewhere), or `unit` has taken it."""
    return task.done() or unit.requests > before


def _open(unit: Unit, n: int) -> bool:
    """`unit` has `n` requests open."""
    return sum(not s.finished for s in unit.engine.streams) == n


# -- failures --------------------------------------------------------------------------------------


async def test_retry_on_another_unit_before_the_first_token(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 2) as (dead, alive), routing([dead, alive], health_interval=60) as client:
        await dead.running.stop()  # the router's last check said healthy; it learns on the next request
        for i in range(2):
            r = await client.post("/v1/completions", json=body(f"request {i}", stream=True))
            assert r.status_code == 200 and r.headers[BACKEND] == alive.url
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        m = await metrics(client)
        assert sample(m, "retries_total", reason="unreachable") == 1  # then `dead` is left out
        assert sample(m, "requests_total", backend=dead.url, outcome="unreachable") == 1
        assert sample(m, "requests_total", backend=alive.url, outcome="ok") == 2
        assert sample(m, "backend_healthy", backend=dead.url, role="decode") == 0
        units = {u["url"]: u for u in (await health(client))["units"]}
        assert not units[dead.url]["healthy"] and "ConnectError" in units[dead.url]["problem"]

    async with serving(tokenizer, 2) as (failing, alive), routing([failing, alive]) as client:
        failing.engine.submit_error = RuntimeError("the unit's engine broke")  # → 500 from the unit
        for i in range(2):
            r = await client.post("/v1/completions", json=body(f"request {i}"))
            assert r.status_code == 200 and r.headers[BACKEND] == alive.url
        m = await metrics(client)
        retries = sample(m, "retries_total", reason="server_error")
        assert retries >= 1 and retries == sample(
            m, "requests_total", backend=failing.url, outcome="server_error"
        )

    async with serving(tokenizer, 1) as (failing,), routing([failing], health_interval=60) as client:
        failing.engine.submit_error = RuntimeError("the unit's engine broke")
        r = await client.post("/v1/completions", json=body())  # nobody else: the unit's 500 as it is
        assert_openai_error(r, 500, None)
        assert r.json()["error"]["type"] == "server_error" and r.headers[BACKEND] == failing.url
        await failing.running.stop()
        r = await client.post("/v1/completions", json=body())
        assert "did not answer" in assert_openai_error(r, 502, "backend_unreachable")


class _Cut(Exception):
    pass


def cut_after(events: int) -> Callable[[ASGIApp], ASGIApp]:
    """A unit that dies after sending `events` body chunks: the connection closes mid-response."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def cut(scope: Scope, receive: Receive, send: Send) -> None:
            sent = 0

            async def counting(message: Message) -> None:
                nonlocal sent
                if message["type"] == "http.response.body" and message.get("body"):
                    if sent == events:
                        raise _Cut
                    sent += 1
                await send(message)

            with contextlib.suppress(_Cut):
                await app(scope, receive, counting)

        return cut

    return wrap


async def test_a_stream_broken_midway_ends_with_an_error_event(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 1, wrap=cut_after(3)) as units, routing(units) as client:
        request = body("Tell me a long story", stream=True, max_tokens=20)
        r = await asyncio.wait_for(client.post("/v1/completions", json=request), 10)
        assert r.status_code == 200
        events = sse_events(r.text)
        assert len(events) == 5 and events[-1] == "[DONE]"
        assert all("choices" in e for e in events[:3])
        error = events[3]["error"]
        assert error["code"] == "backend_stream_error" and error["type"] == "server_error"
        assert units[0].url in error["message"]
        m = await metrics(client)
        assert sample(m, "requests_total", backend=units[0].url, outcome="stream_error") == 1
        assert sample(m, "retries_total", reason="unreachable") == 0  # too late to retry

    # A unit that stalls mid-stream: --request-timeout ends the stream instead of a hang.
    async with serving(tokenizer, 1) as (unit,), routing([unit], request_timeout=0.5) as client:
        unit.engine.delay = 0.05
        request = body("Tell me a long story", stream=True, max_tokens=50)
        async with client.stream("POST", "/v1/completions", json=request) as r:
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    unit.engine.gate.clear()  # no token after the first
        events = [json.loads(x[6:]) if x != "data: [DONE]" else "[DONE]" for x in lines]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "backend_stream_error"
        assert "ReadTimeout" in events[-2]["error"]["message"]
        unit.engine.gate.set()


async def test_a_client_that_leaves_cancels_its_request_on_the_unit(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 1) as (unit,), routing([unit]) as client:
        unit.engine.gate.clear()  # before its answer begins
        for stream in (False, True):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.post("/v1/completions", json=body(stream=stream)), 0.3)
        unit.engine.delay = 0.05  # and while it streams
        unit.engine.gate.set()
        async with client.stream("POST", "/v1/completions", json=body(stream=True, max_tokens=100)) as r:
            async for line in r.aiter_lines():
                if line:
                    break
        await eventually(lambda: all(s.aborted for s in unit.engine.streams))
        assert len(unit.engine.streams) == 3

        async def all_cancelled() -> bool:
            m = await metrics(client)
            cancelled = sample(m, "requests_total", backend=unit.url, outcome="cancelled")
            return cancelled == 3 and sample(m, "in_flight_requests", backend=unit.url) == 0

        await eventually(all_cancelled)


async def test_health_is_503_while_no_unit_is_healthy(tokenizer: ServeTokenizer) -> None:
    async with serving(tokenizer, 2) as units:
        for unit in units:
            unit.engine.healthy = False
        async with routing(units) as client:
            r = await client.get("/health")
            message = assert_openai_error(r, 503, "no_healthy_backend")
            assert all(u.url in message for u in units) and "/health answered 503" in message
            r = await client.post("/v1/completions", json=body())
            assert_openai_error(r, 503, "no_healthy_backend")
            m = await metrics(client)
            assert sample(m, "requests_total", backend="", outcome="no_backend") == 1
            assert sample(m, "backend_healthy", backend=units[0].url, role="decode") == 0

            units[1].engine.healthy = True  # back within a health interval
            await eventually(lambda: _status(client, "/health", 200))
            r = await client.post("/v1/completions", json=body())
            assert r.status_code == 200 and r.headers[BACKEND] == units[1].url


async def _status(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status
