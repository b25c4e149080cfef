"""The router's OpenAI API (FastAPI): the same routes as a unit's `fireflyer serve`, answered by
the units behind it.

POST /v1/completions, /v1/chat/completions  forwarded to a (prefill, decode) pair or a unit (proxy.py)
GET  /v1/models, /v1/models/{id}             from a healthy unit
GET  /health                                 200 while a unit can take new requests, else 503;
                                             the units with their in-flight counts either way
GET  /metrics                                the router's own Prometheus metrics (metrics.py)

With an API key file, every route but /health and /metrics needs a key (api_keys.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fireflyer.workloads.api_keys import KeyFile, RequireApiKey
from fireflyer.workloads.router.backends import BackendSet, Listed
from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.router.policies import DEFAULT_LOAD_CAP, DEFAULT_PREFIX_CHARS, Policy, Role
from fireflyer.workloads.router.proxy import Proxy, error_response, no_healthy_backend
from fireflyer.workloads.router.stream import unless_disconnected
from fireflyer.workloads.serve.protocol import ApiError, internal_error

log = logging.getLogger("fireflyer.router")

CONNECT_TIMEOUT_S = 5.0  # a unit that takes longer to accept a connection is as good as gone
MAX_PROBE_TIMEOUT_S = 5.0
OPEN_PATHS = ("/health", "/metrics")  # probes and scrapes carry no key


@dataclass
class RouterConfig:
    backends: Sequence[tuple[str, Role] | Listed] = field(default_factory=list)  # from the flags
    backends_file: Path | None = None
    policy: Policy = "cache-aware"
    health_interval: float = 2.0
    request_timeout: float = 600.0  # for a unit's answer to begin, and between stream chunks
    load_cap: int = DEFAULT_LOAD_CAP
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    api_key_file: Path | None = None  # None: no key is asked for


class Router:
    """The router's state: its units, their health, its metrics; the proxy once serving."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.backends = BackendSet(config.backends, config.backends_file, self.metrics)
        self.api_keys = KeyFile(config.api_key_file) if config.api_key_file else None
        self._proxy: Proxy | None = None

    @property
    def proxy(self) -> Proxy:
        if self._proxy is None:
            raise RuntimeError("the router is not serving (its lifespan has not started)")
        return self._proxy

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """HTTP clients, a first health check of every unit, then the health watch until the end.
        `trust_env=False`: units are reached directly, never through a proxy from the environment."""
        c = self.config
        timeout = httpx.Timeout(c.request_timeout, connect=min(CONNECT_TIMEOUT_S, c.request_timeout))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        probe_timeout = min(max(c.health_interval, 1.0), MAX_PROBE_TIMEOUT_S)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client,
            # Probes get their own pool: a unit busy with long requests must not delay its checks.
            httpx.AsyncClient(timeout=probe_timeout, trust_env=False) as probes,
        ):
            self._proxy = Proxy(
                self.backends,
                self.metrics,
                client,
                c.policy,
                load_cap=c.load_cap,
                prefix_chars=c.prefix_chars,
                api_keys=self.api_keys,
            )
            self.backends.reload()
            await self.backends.check(probes)
            healthy = len(self.backends.healthy())
            log.info("routing %s over %d units (%d healthy)", c.policy, len(self.backends.all), healthy)
            watch = asyncio.create_task(self.backends.watch(probes, c.health_interval))
            try:
                yield
            finally:
                watch.cancel()
                await asyncio.wait({watch})
                self._proxy = None


def create_app(config: RouterConfig) -> FastAPI:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with router.serving():
            yield

    app = FastAPI(title="fireflyer router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.router = router
    _install_error_handlers(app)
    if router.api_keys is not None:
        app.add_middleware(RequireApiKey, keys=router.api_keys, open_paths=OPEN_PATHS)

    async def forward(request: Request, path: str) -> Response:
        started = time.monotonic()
        raw = await request.body()
        work = router.proxy.forward(path, raw, request.headers, started)
        response = await unless_disconnected(request.receive, work)
        return Response(status_code=499) if response is None else response  # 499: nobody reads it

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        return await router.proxy.get("/v1/models")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        return await router.proxy.get(f"/v1/models/{model_id}")

    @app.get("/health")
    async def health() -> Response:
        backends = router.backends.all
        units = [
            {"url": b.url, "role": b.role, "revision": b.revision, "healthy": b.healthy}
            | {"in_flight": b.in_flight, "draining": b.draining}
            | ({"problem": b.problem} if b.problem else {})
            for b in backends
        ]
        if not router.backends.routable():
            # The units too: the operator reads in-flight counts of a drain from here.
            error = no_healthy_backend(backends)
            body = error.body().model_dump(mode="json") | {"units": units}
            return JSONResponse(body, status_code=error.status_code)
        return JSONResponse({"status": "ok", "policy": config.policy, "units": units})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=router.metrics.content_type)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error the router itself answers comes in OpenAI's shape, as the units' do."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{exc.detail}: {request.method} {request.url.path}"
        return error_response(ApiError(exc.status_code, message, type=kind), dict(exc.headers or {}))

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(internal_error())

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
