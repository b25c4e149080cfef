"""`fireflyer router` over HTTP, in front of units that serve the real OpenAI API app of
`fireflyer serve` (fireflyer/workloads/serve/api.py) over a scripted engine
(tests/workloads/api_engine.py), each on its own loopback port in this test's event loop; and
once in front of a real `fireflyer serve` process on the tiny model.

Covered: each policy's choice, cache-aware affinity and its load cap, (prefill, decode) pairs
within one revision and the header that names the prefill unit, a retry when a unit is dead or
answers 5xx before the first token, a stream broken or stalled mid-way, a client that leaves,
/health when no unit is healthy, the backends file, pass-through of JSON and SSE, the metrics, and
the command line and backends file the operator renders."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fireflyer.api.inference import InferenceDeployment
from fireflyer.cli import build_parser
from fireflyer.operator.inference import children
from fireflyer.operator.inference.pairing import pairing_revision
from fireflyer.workloads.router.app import RouterConfig, create_app
from fireflyer.workloads.router.backends import Listed, read_backends_file
from fireflyer.workloads.router.policies import Candidate, Policy, affine, request_key
from fireflyer.workloads.serve.api import create_app as create_serve_app
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import MODEL, FakeEngine, sse_events
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import tokenizer as tokenizer
from tests.workloads.serve_servers import REPO, Server, _die_with_parent, free_port, logs_on_failure
from tests.workloads.serve_servers import checkpoint as checkpoint

pytestmark = pytest.mark.anyio

BACKEND = "x-fireflyer-backend"
PREFILL = "x-fireflyer-prefill"
R = "fireflyer_router_"


# -- servers in this event loop ----------------------------------------------------------------


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # several servers share the test's process: signals stay pytest's


class Running:
    """An ASGI app served by uvicorn on a loopback port, as a task of the running loop."""

    def __init__(self, app: ASGIApp) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=1
        )
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> Running:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn exited during startup")
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.server.should_exit = True
            await self.task


class Unit:
    """A stand-in for one unit: the real `fireflyer serve` API over a scripted engine."""

    def __init__(self, tokenizer: ServeTokenizer, wrap: Callable[[ASGIApp], ASGIApp] | None = None) -> None:
        self.engine = FakeEngine(tokenizer)
        self.posts: list[dict[str, str]] = []  # the headers of each POST it was sent
        app: ASGIApp = create_serve_app(self.engine)
        self.running = Running(self._recording(wrap(app) if wrap else app))

    def _recording(self, app: ASGIApp) -> ASGIApp:
        async def record(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["method"] == "POST":
                headers: dict[str, str] = {}
                for k, v in scope["headers"]:  # a repeated header reads as its values joined
                    headers[k.decode()] = ", ".join(filter(None, (headers.get(k.decode()), v.decode())))
                self.posts.append(headers)
            await app(scope, receive, send)

        return record

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def requests(self) -> int:
        return len(self.engine.streams)


@contextlib.asynccontextmanager
async def serving(
    tokenizer: ServeTokenizer, n: int, wrap: Callable[[ASGIApp], ASGIApp] | None = None
) -> AsyncIterator[list[Unit]]:
    units = [Unit(tokenizer, wrap) for _ in range(n)]
    try:
        for unit in units:
            await unit.running.start()
        yield units
    finally:
        for unit in units:
            await unit.running.stop()


@contextlib.asynccontextmanager
async def routing(
    decode: list[Unit], policy: Policy = "round-robin", *, prefill: Sequence[Unit] = (), **options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A router in front of `decode` (and `prefill`), and a client of it."""
    options.setdefault("health_interval", 0.1)
    units = [Listed(u.url, "decode") for u in decode] + [Listed(u.url, "prefill") for u in prefill]
    config = RouterConfig(backends=units, policy=policy, **options)
    router = Running(create_app(config))
    await router.start()
    try:
        async with httpx.AsyncClient(base_url=router.url, timeout=30.0, trust_env=False) as client:
            yield client
    finally:
        await router.stop()


# -- helpers -----------------------------------------------------------------------------------


def body(prompt: Any = "Hello there", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **fields}


def without_ids(event: Any) -> Any:
    """A response or SSE event less what differs between two identical requests."""
    if isinstance(event, dict):
        return {k: v for k, v in event.items() if k not in ("id", "created")}
    return event


async def metrics(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((R + name, frozenset(labels.items())), 0.0)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    answer: dict[str, Any] = (await client.get("/health")).json()
    return answer


def assert_openai_error(r: httpx.Response, status: int, code: str | None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return str(error["message"])


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

        r = await client.get("/v1/models")
        async with httpx.AsyncClient(base_url=urls[0], trust_env=False) as direct:
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


# -- the backends file ---------------------------------------------------------------------------


def write_units(path: Path, content: str) -> None:
    """Replace the file and move its mtime on, as a ConfigMap update would change it."""
    path.write_text(content)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_backends_file_adds_and_removes_units_without_restart(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 3) as (a, b, c):
        write_units(path, json.dumps({"decode": [b.url]}))
        async with routing([a], backends_file=path) as client:

            async def units_are(*expected: Unit) -> bool:
                units = (await health(client)).get("units", [])
                return {u["url"] for u in units if u["healthy"]} == {e.url for e in expected}

            async def served(n: int) -> set[str]:
                rs = [await client.post("/v1/completions", json=body(f"request {i}")) for i in range(n)]
                assert all(r.status_code == 200 for r in rs)
                return {r.headers[BACKEND] for r in rs}

            await eventually(lambda: units_are(a, b))
            assert await served(4) == {a.url, b.url}

            write_units(path, json.dumps({"prefill": [c.url], "decode": []}))  # b leaves, c joins
            await eventually(lambda: units_are(a, c))
            before = b.requests
            # c is a prefill unit: a, the one decode unit left, answers and fetches the KV from c.
            assert await served(4) == {a.url} and b.requests == before
            assert [h.get(PREFILL) for h in a.posts[-4:]] == [c.url] * 4 and c.posts == []
            m = await metrics(client)
            assert sample(m, "backend_healthy", backend=c.url, role="prefill") == 1
            assert (R + "backend_healthy", frozenset({"backend": b.url, "role": "decode"}.items())) not in m

            write_units(path, '{"decode": [')  # half-written: the units read before stay
            await asyncio.sleep(0.3)
            assert await units_are(a, c)


# -- (prefill, decode) pairs ------------------------------------------------------------------------


def units_file(path: Path, **roles: list[tuple[Unit, str]]) -> None:
    write_units(
        path,
        json.dumps(
            {role: [{"url": u.url, "revision": rev} for u, rev in units] for role, units in roles.items()}
        ),
    )


async def test_a_request_reaches_the_decode_unit_naming_a_prefill_unit_of_its_revision(
    tokenizer: ServeTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "units.json"
    async with serving(tokenizer, 5) as (p_old, p_new, d_old, d_new, p_new2):
        units_file(path, prefill=[(p_old, "r1")], decode=[(d_old, "r1"), (d_new, "r2")])
        async with routing([], backends_file=path) as client:
            await eventually(lambda: _healthy_count(client, 3))

            async def send(n: int, stream: bool = False) -> list[httpx.Response]:
                rs = [
                    await client.post("/v1/completions", json=body(f"q {i}", stream=stream)) for i in range(n)
                ]
                assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
                return rs

            # d_new (r2) has no prefill unit of its revision yet: it computes whole, no header.
            rs = await send(4) + await send(2, stream=True)
            assert {r.headers[BACKEND] for r in rs} == {d_old.url, d_new.url}
            assert {h.get(PREFILL) for h in d_old.posts} == {p_old.url}
            assert d_new.posts and all(PREFILL not in h for h in d_new.posts)
            for r in rs:  # the answer names the prefill unit that was asked, if any
                assert r.headers.get(PREFILL) == (p_old.url if r.headers[BACKEND] == d_old.url else None)
            stream = next(r for r in rs[4:] if r.headers[BACKEND] == d_old.url)
            assert sse_events(stream.text)[-1] == "[DONE]"

            # A prefill unit of r2 joins through the file, without a restart: d_new pairs with it.
            units_file(
                path,
                prefill=[(p_old, "r1"), (p_new, "r2"), (p_new2, "r2")],
                decode=[(d_old, "r1"), (d_new, "r2")],
            )
            await eventually(lambda: _healthy_count(client, 5))
            seen = len(d_new.posts)
            await send(8)
            assert {h.get(PREFILL) for h in d_new.posts[seen:]} == {p_new.url, p_new2.url}

            # A client cannot name the prefill unit itself: the router's own choice replaces it.
            forged = {PREFILL: "http://169.254.169.254:80"}
            for _ in range(2):
                r = await client.post("/v1/completions", json=body("x"), headers=forged)
                assert r.status_code == 200 and r.headers[PREFILL] != forged[PREFILL]
            assert {h.get(PREFILL) for h in d_old.posts} == {p_old.url}  # never across revisions
            assert {h.get(PREFILL) for h in d_new.posts[seen:]} == {p_new.url, p_new2.url}

            # The prefill units are named, never sent to.
            assert p_old.posts == p_new.posts == p_new2.posts == []
            assert p_old.requests == p_new.requests == p_new2.requests == 0

            m = await metrics(client)
            paired = sample(m, "pairs_total", prefill=p_old.url, decode=d_old.url, outcome="ok")
            assert paired == len(d_old.posts) >= 4
            assert sample(m, "unpaired_total", reason="revision_mismatch") == 3  # d_new's first 3
            pairs_new = [
                sample(m, "pairs_total", prefill=p.url, decode=d_new.url, outcome="ok")
                for p in (p_new, p_new2)
            ]
            assert sum(pairs_new) == len(d_new.posts) - 3
            assert sample(m, "pairs_total", prefill=p_old.url, decode=d_new.url, outcome="ok") == 0
            assert all(sample(m, "in_flight_requests", backend=u.url) == 0 for u in (p_old, p_new, p_new2))

            # A rollout recreates d_old at its URL with r2: from then on it pairs with r2 only.
            units_file(path, prefill=[(p_old, "r1"), (p_new, "r2")], decode=[(d_old, "r2"), (d_new, "r2")])
            await eventually(lambda: _revision_is(client, d_old.url, "r2"))
            seen = len(d_old.posts)
            await send(4)
            assert {h.get(PREFILL) for h in d_old.posts[seen:]} == {p_new.url}


async def _healthy_count(client: httpx.AsyncClient, n: int) -> bool:
    return sum(u["healthy"] for u in (await health(client)).get("units", [])) == n


async def _revision_is(client: httpx.AsyncClient, url: str, revision: str) -> bool:
    return any(u["url"] == url and u["revision"] == revision for u in (await health(client))["units"])


async def test_a_prefill_unit_counts_a_request_as_its_load_until_the_answer_begins(
    tokenizer: ServeTokenizer,
) -> None:
    async with serving(tokenizer, 2) as (p, d), routing([d], "least-load", prefill=[p]) as client:
        d.engine.gate.clear()  # the answer does not begin
        task = asyncio.create_task(client.post("/v1/completions", json=body(stream=True)))
        await eventually(lambda: d.requests == 1)
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=p.url) == 1
        assert sample(m, "in_flight_requests", backend=d.url) == 1
        d.engine.gate.set()
        r = await asyncio.wait_for(task, 10)
        assert r.status_code == 200 and r.headers[PREFILL] == p.url
        m = await metrics(client)
        assert sample(m, "in_flight_requests", backend=p.url) == 0
        assert sample(m, "in_flight_requests", backend=d.url) == 0


async def test_a_failed_decode_unit_is_retried_on_another_pair(tokenizer: ServeTokenizer) -> None:
    async with (
        serving(tokenizer, 3) as (p, dead, alive),
        routing([dead, alive], prefill=[p], health_interval=60) as client,
    ):
        await dead.running.stop()  # the router's last check said healthy
        for i in range(2):
            r = await client.post("/v1/completions", json=body(f"request {i}", stream=True))
            assert r.status_code == 200 and r.headers[BACKEND] == alive.url and r.headers[PREFILL] == p.url
        # The retry went to another decode unit with the same prefill unit named.
        assert [h[PREFILL] for h in alive.posts] == [p.url, p.url] and p.posts == []
        m = await metrics(client)
        assert sample(m, "retries_total", reason="unreachable") == 1
        assert sample(m, "pairs_total", prefill=p.url, decode=dead.url, outcome="unreachable") == 1
        assert sample(m, "pairs_total", prefill=p.url, decode=alive.url, outcome="ok") == 2
        assert sample(m, "backend_healthy", backend=p.url, role="prefill") == 1  # not blamed
        assert sample(m, "in_flight_requests", backend=p.url) == 0

    # Only prefill units are healthy: one computes the request whole, with no header.
    async with serving(tokenizer, 2) as (p, d), routing([d], prefill=[p]) as client:
        d.engine.healthy = False
        await eventually(lambda: _healthy_count(client, 1))
        r = await client.post("/v1/completions", json=body())
        assert r.status_code == 200 and r.headers[BACKEND] == p.url and PREFILL not in r.headers
        assert len(p.posts) == 1 and PREFILL not in p.posts[0]
        m = await metrics(client)
        assert sample(m, "unpaired_total", reason="no_decode_unit") == 1


# -- the command line and a real unit --------------------------------------------------------------


def test_the_operator_rendered_command_parses(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "manifests/samples/small/inference.yaml").read_text())
    doc["metadata"] |= {"namespace": "default", "uid": "u-1"}
    spec = InferenceDeployment.model_validate(doc).spec
    hosts = {"prefill": ["p0.svc"], "decode": ["d0.svc", "d1.svc"]}
    deployment, units, _service = children.router(doc, spec, hosts)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["fireflyer"]
    args = build_parser().parse_args(container["args"])
    assert args.command == "router" and args.policy == spec.router.policy
    assert args.port == children.ROUTER_PORT and args.health_interval == 2.0
    # The units come from the mounted ConfigMap, in the file format the router reads.
    mount = container["volumeMounts"][0]
    assert args.backends_file == f"{mount['mountPath']}/{children.ROUTER_BACKENDS_FILE}"
    assert (
        deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == units["metadata"]["name"]
    )
    written = tmp_path / "backends.json"
    written.write_text(units["data"][children.ROUTER_BACKENDS_FILE])
    rev = pairing_revision(spec)
    assert sorted(read_backends_file(written)) == [
        ("http://d0.svc:30000", "decode", rev, False),
        ("http://d1.svc:30000", "decode", rev, False),
        ("http://p0.svc:30000", "prefill", rev, False),
    ]
    assert json.loads(units["data"][children.ROUTER_BACKENDS_FILE])["prefill"] == [
        {"url": "http://p0.svc:30000", "revision": rev}
    ]
    # A scaled role changes the file, not the pod template: the router is not restarted.
    more = children.router(doc, spec, {**hosts, "decode": [*hosts["decode"], "d2.svc"]})
    assert more[0] == deployment and more[1]["data"] != units["data"]
    # A unit whose pods still run an older spec is listed with that spec's pairing revision: the
    # router never pairs it with a unit of the new one.
    rolling = children.router(doc, spec, hosts, unit_revisions={"d1.svc": "0ld"})
    written.write_text(rolling[1]["data"][children.ROUTER_BACKENDS_FILE])
    assert sorted(read_backends_file(written))[1] == ("http://d1.svc:30000", "decode", "0ld", False)
    assert rolling[0] == deployment


def test_router_in_front_of_a_real_serve_process(checkpoint: Path, tmp_path: Path) -> None:
    unit = Server("unit", checkpoint, tmp_path, ["--dtype", "float32", "--num-kv-blocks", "64"])
    unit.start()
    port = free_port()
    cmd = [sys.executable, "-m", "fireflyer.cli", "router", "--decode", unit.url, "--port", str(port)]
    cmd += ["--host", "127.0.0.1", "--health-interval", "0.5"]
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log:
        router = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent
        )
    try:
        with logs_on_failure(unit):
            unit.wait_ready()
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=60.0, trust_env=False) as c:
                deadline = time.monotonic() + 30
                while not _answers(c, url + "/health"):
                    assert router.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.1)
                request = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
                routed = c.post(url + "/v1/completions", json=request)
                direct = c.post(unit.url + "/v1/completions", json=request)
                assert routed.status_code == 200, routed.text
                assert routed.headers[BACKEND] == unit.url
                assert without_ids(routed.json()) == without_ids(direct.json())
                stream = request | {"stream": True}
                routed_events = sse_events(c.post(url + "/v1/completions", json=stream).text)
                direct_events = sse_events(c.post(unit.url + "/v1/completions", json=stream).text)
                assert [without_ids(e) for e in routed_events] == [without_ids(e) for e in direct_events]
                chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
                routed = c.post(url + "/v1/chat/completions", json=chat)
                direct = c.post(unit.url + "/v1/chat/completions", json=chat)
                assert routed.status_code == 200 and without_ids(routed.json()) == without_ids(direct.json())
                assert c.get(url + "/v1/models").json() == c.get(unit.url + "/v1/models").json()
                text = c.get(url + "/metrics").text
                assert f'{R}requests_total{{backend="{unit.url}",outcome="ok"}} 3.0' in text

                unit.stop()  # the unit goes: the router says so within a health interval
                deadline = time.monotonic() + 10
                while c.get(url + "/health").status_code != 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
    finally:
        router.terminate()
        router.wait(timeout=20)
        unit.stop()


def _answers(c: httpx.Client, url: str) -> bool:
    try:
        return c.get(url).status_code == 200
    except httpx.HTTPError:
        return False
