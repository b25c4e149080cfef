"""What the router tests share: units that serve the real OpenAI API app of `fireflyer serve`
over a scripted engine (tests/workloads/api_engine.py) and a router in front of them, each on its
own loopback port in the test's event loop, and the helpers that read their answers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from fireflyer.workloads.router.app import RouterConfig, create_app
from fireflyer.workloads.router.backends import Listed
from fireflyer.workloads.router.policies import Policy
from fireflyer.workloads.serve.api import create_app as create_serve_app
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import MODEL, FakeEngine

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


def write_units(path: Path, content: str) -> None:
    """Replace the file and move its mtime on, as a ConfigMap update would change it."""
    path.write_text(content)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
