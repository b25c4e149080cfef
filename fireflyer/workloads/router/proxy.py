"""Forwarding one request: choose a unit, send the request, pass the answer back as the unit gave
it (JSON with its status code, or SSE event by event), and retry once where that is safe.

Safe means nothing has reached the client yet: a unit that does not answer, answers 5xx, or ends
a stream before its first event is replaced by another healthy unit. Once the first event went
out, a failure ends the stream with an error event in OpenAI's shape and `data: [DONE]`. A 4xx is
the client's own and goes back as it is.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.datastructures import Headers
from starlette.responses import Response

from fireflyer.workloads.router.backends import Backend, BackendSet, describe
from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.router.policies import Policy, choose, ordered, request_key
from fireflyer.workloads.router.stream import SseEvents, UnitStream
from fireflyer.workloads.serve.protocol import ApiError

log = logging.getLogger("fireflyer.router")

MAX_ATTEMPTS = 2  # the first unit and one other
BACKEND_HEADER = "x-fireflyer-backend"  # which unit answered: for people reading logs, and tests
# Not forwarded: they describe one hop, and httpx sets its own (no compression, so bytes pass as sent).
_HOP_BY_HOP = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "accept-encoding",
    }
)


@dataclass
class _Failure:
    """An attempt that failed before anything reached the client."""

    reason: str  # unreachable | server_error
    detail: str
    response: Response | None = None  # the unit's 5xx, answered when no other unit is left


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return Response(error.body().model_dump_json(), error.status_code, headers, media_type="application/json")


def no_healthy_backend(backends: Sequence[Backend]) -> ApiError:
    problems = "; ".join(f"{b.url}: {b.problem}" for b in backends[:4])
    more = f"; and {len(backends) - 4} more" if len(backends) > 4 else ""
    detail = f" ({problems}{more})" if backends else " (none is configured)"
    return ApiError(
        503,
        f"No healthy unit to serve this request: {len(backends)} known{detail}. Please retry later.",
        type="service_unavailable_error",
        code="no_healthy_backend",
    )


class Proxy:
    """Chooses units by `policy` and forwards requests to them over `client`."""

    def __init__(
        self,
        backends: BackendSet,
        metrics: RouterMetrics,
        client: httpx.AsyncClient,
        policy: Policy,
        *,
        load_cap: int,
        prefix_chars: int,
    ) -> None:
        self.backends = backends
        self.metrics = metrics
        self.client = client
        self.policy: Policy = policy
        self.load_cap = load_cap
        self.prefix_chars = prefix_chars
        self._turns = itertools.count()

    def route(self, key: str, exclude: Sequence[Backend] = ()) -> Backend | None:
        healthy = {b.url: b for b in self.backends.healthy(exclude)}
        candidates = [b.candidate() for b in healthy.values()]
        chosen = choose(self.policy, candidates, key, turn=next(self._turns), load_cap=self.load_cap)
        return None if chosen is None else healthy[chosen.unit.url]

    def key(self, raw: bytes) -> str:
        if self.policy != "cache-aware":
            return ""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            return ""  # the unit will answer the malformed body with a 400
        return request_key(body, self.prefix_chars)

    async def forward(self, path: str, raw: bytes, headers: Headers, started: float) -> Response:
        """POST `raw` to `path` on a chosen unit, and once more on another if that is safe."""
        key = self.key(raw)
        upstream_headers = [(k, v) for k, v in headers.items() if k not in _HOP_BY_HOP]
        tried: list[Backend] = []
        failure: _Failure | None = None
        while len(tried) < MAX_ATTEMPTS:
            backend = self.route(key, exclude=tried)
            if backend is None:
                break
            if failure is not None:
                self.metrics.retries.labels(failure.reason).inc()
                log.info("retrying on %s: %s %s", backend.url, tried[-1].url, failure.detail)
            tried.append(backend)
            outcome = await self._attempt(backend, path, raw, upstream_headers, started)
            if not isinstance(outcome, _Failure):
                return outcome
            failure = outcome
        if failure is None:
            self.metrics.requests.labels("", "no_backend").inc()
            return error_response(no_healthy_backend(self.backends.all))
        if failure.response is not None:
            return failure.response
        message = f"The unit {tried[-1].url} did not answer: {failure.detail}."
        return error_response(ApiError(502, message, type="server_error", code="backend_unreachable"))

    async def get(self, path: str) -> Response:
        """GET `path` from a healthy unit (decode units first), trying a second one if needed."""
        healthy = {b.url: b for b in self.backends.healthy()}
        for candidate in ordered([b.candidate() for b in healthy.values()])[:MAX_ATTEMPTS]:
            backend = healthy[candidate.url]
            try:
                answer = await self.client.get(backend.url + path)
            except httpx.HTTPError as exc:
                log.warning("GET %s%s: %s", backend.url, path, describe(exc))
                continue
            if answer.status_code < 500:
                return _passthrough(answer, answer.content, backend)
        return error_response(no_healthy_backend(self.backends.all))

    async def _attempt(
        self, backend: Backend, path: str, raw: bytes, headers: list[tuple[str, str]], started: float
    ) -> Response | _Failure:
        self.backends.begin(backend)
        upstream: httpx.Response | None = None
        outcome = "cancelled"  # until we know better
        handed_over = False  # to a UnitStream, which then owns `upstream` and the in-flight count
        try:
            request = self.client.build_request("POST", backend.url + path, content=raw, headers=headers)
            upstream = await self.client.send(request, stream=True)
            if upstream.status_code >= 500:
                outcome = "server_error"
                body = await upstream.aread()
                detail = f"answered {upstream.status_code}"
                return _Failure("server_error", detail, _passthrough(upstream, body, backend))
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                body = await upstream.aread()
                outcome = "ok" if upstream.status_code < 400 else "client_error"
                self._observe(started, first_byte=True, done=True)
                return _passthrough(upstream, body, backend)
            events = SseEvents()
            chunks = upstream.aiter_bytes()
            first = b""
            while not first:  # StopAsyncIteration: the stream ended before its first event
                first = events.feed(await anext(chunks))
            self._observe(started, first_byte=True)
            handed_over = True

            def closed(outcome: str) -> None:
                self.backends.end(backend)
                self.metrics.requests.labels(backend.url, outcome).inc()
                self._observe(started, done=True)

            stream = UnitStream(backend.url, upstream, chunks, events, closed)
            return stream.response(first, {BACKEND_HEADER: backend.url})
        except (httpx.HTTPError, StopAsyncIteration) as exc:
            outcome = "unreachable"
            detail = describe(exc) if isinstance(exc, httpx.HTTPError) else "no event before the stream ended"
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                # Gone, not just slow: keep it out until a health check says otherwise.
                self.backends.set_health(backend, detail)
            return _Failure("unreachable", detail)
        finally:
            if not handed_over:
                if upstream is not None:
                    await upstream.aclose()
                self.backends.end(backend)
                self.metrics.requests.labels(backend.url, outcome).inc()

    def _observe(self, started: float, *, first_byte: bool = False, done: bool = False) -> None:
        elapsed = time.monotonic() - started
        if first_byte:
            self.metrics.first_byte.observe(elapsed)
        if done:
            self.metrics.duration.observe(elapsed)


def _passthrough(upstream: httpx.Response, body: bytes, backend: Backend) -> Response:
    media_type = upstream.headers.get("content-type", "application/json")
    return Response(body, upstream.status_code, {BACKEND_HEADER: backend.url}, media_type=media_type)
