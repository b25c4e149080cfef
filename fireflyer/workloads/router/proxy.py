"""Forwarding one request: choose a route, send the request, pass the answer back as the unit gave
it (JSON with its status code, or SSE event by event), and retry once where that is safe.

A route with a prefill unit sends the request to the decode unit as the client wrote it, plus the
`x-fireflyer-prefill` header naming the prefill unit; the decode unit fetches the prompt's KV from
there itself. The prefill unit gets nothing from the router.

Safe means nothing has reached the client yet: a decode (or whole) unit that does not answer,
answers 5xx, or ends a stream before its first event is replaced on another route without it.
The prefill unit is not left out for it: when a prefill unit fails, the decode unit prefills the
request itself. Once the first event went out, a failure ends the stream with an error event in
OpenAI's shape and `data: [DONE]`. A 4xx is the client's own and goes back as it is.

With API keys, a unit gets the router's own key (its key file's first) in place of the client's.
The units read the same Secret, but each pod sees an edit of it at its own moment: a client's new
key may not have reached a unit yet, while the first key is the last one a rotation removes.
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

from fireflyer.workloads.api_keys import KeyFile
from fireflyer.workloads.router.backends import Backend, BackendSet, describe
from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.router.policies import Policy, choose, ordered, request_key
from fireflyer.workloads.router.stream import SseEvents, UnitStream
from fireflyer.workloads.serve.protocol import ApiError

log = logging.getLogger("fireflyer.router")

MAX_ATTEMPTS = 2  # the first unit and one other
BACKEND_HEADER = "x-fireflyer-backend"  # which unit answered: for people reading logs, and tests
# To the decode unit: the base URL of the prefill unit to fetch the prompt's KV from. Also on the
# answer, naming the prefill unit that was asked.
PREFILL_HEADER = "x-fireflyer-prefill"
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
        # Only the router names a prefill unit: a client must not point a decode unit at a URL.
        PREFILL_HEADER,
    }
)


@dataclass(frozen=True)
class Pick:
    """A route, as the backends it names."""

    unit: Backend  # where the request is sent
    prefill: Backend | None  # named in PREFILL_HEADER
    whole: str  # why there is no prefill side (policies.Route.whole)

    def headers(self) -> dict[str, str]:
        """The answer's headers that say where it came from."""
        return {BACKEND_HEADER: self.unit.url} | ({PREFILL_HEADER: self.prefill.url} if self.prefill else {})


@dataclass
class _Failure:
    """An attempt that failed before anything reached the client."""

    reason: str  # unreachable | server_error
    detail: str
    response: Response | None = None  # the unit's 5xx, answered when no other unit is left


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    return Response(error.body().model_dump_json(), error.status_code, headers, media_type="application/json")


def no_healthy_backend(backends: Sequence[Backend]) -> ApiError:
    problems = "; ".join(f"{b.url}: {b.problem or 'draining'}" for b in backends[:4])
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
        api_keys: KeyFile | None = None,
    ) -> None:
        self.backends = backends
        self.api_keys = api_keys
        self.metrics = metrics
        self.client = client
        self.policy: Policy = policy
        self.load_cap = load_cap
        self.prefix_chars = prefix_chars
        self._turns = itertools.count()

    def route(self, key: str, exclude: Sequence[Backend] = ()) -> Pick | None:
        healthy = {b.url: b for b in self.backends.routable(exclude)}
        candidates = [b.candidate() for b in healthy.values()]
        chosen = choose(self.policy, candidates, key, turn=next(self._turns), load_cap=self.load_cap)
        if chosen is None:
            return None
        prefill = None if chosen.prefill is None else healthy[chosen.prefill.url]
        return Pick(healthy[chosen.unit.url], prefill, chosen.whole)

    def key(self, raw: bytes) -> str:
        if self.policy != "cache-aware":
            return ""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            return ""  # the unit will answer the malformed body with a 400
        return request_key(body, self.prefix_chars)

    async def forward(self, path: str, raw: bytes, headers: Headers, started: float) -> Response:
        """POST `raw` to `path` on a chosen route, and once more on another if that is safe."""
        key = self.key(raw)
        upstream_headers = [(k, v) for k, v in headers.items() if k not in _HOP_BY_HOP]
        if self.api_keys is not None:
            upstream_headers = [(k, v) for k, v in upstream_headers if k != "authorization"]
            upstream_headers += self.api_keys.authorization().items()
        tried: list[Backend] = []  # the units sent to; prefill units stay eligible (see above)
        failure: _Failure | None = None
        while len(tried) < MAX_ATTEMPTS:
            pick = self.route(key, exclude=tried)
            if pick is None:
                break
            if failure is not None:
                self.metrics.retries.labels(failure.reason).inc()
                log.info("retrying on %s: %s %s", pick.unit.url, tried[-1].url, failure.detail)
            tried.append(pick.unit)
            outcome = await self._attempt(pick, path, raw, upstream_headers, started)
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
        healthy = {b.url: b for b in self.backends.routable()}
        for candidate in ordered([b.candidate() for b in healthy.values()])[:MAX_ATTEMPTS]:
            backend = healthy[candidate.url]
            try:
                auth = self.api_keys.authorization() if self.api_keys is not None else None
                answer = await self.client.get(backend.url + path, headers=auth)
            except httpx.HTTPError as exc:
                log.warning("GET %s%s: %s", backend.url, path, describe(exc))
                continue
            if answer.status_code < 500:
                return _passthrough(answer, answer.content, {BACKEND_HEADER: backend.url})
        return error_response(no_healthy_backend(self.backends.all))

    async def _attempt(
        self, pick: Pick, path: str, raw: bytes, headers: list[tuple[str, str]], started: float
    ) -> Response | _Failure:
        backend, prefill = pick.unit, pick.prefill
        if prefill is not None:
            headers = [*headers, (PREFILL_HEADER, prefill.url)]
            # The prefill unit's share of the request ends when the answer begins: the decode unit
            # has the KV by then. Until then it counts toward the prefill unit's load.
            self.backends.begin(prefill)
        self.backends.begin(backend)
        prefilling = prefill is not None

        def prefilled() -> None:
            nonlocal prefilling
            if prefilling and prefill is not None:
                prefilling = False
                self.backends.end(prefill)

        def count(outcome: str) -> None:
            self.metrics.requests.labels(backend.url, outcome).inc()
            if prefill is not None:
                self.metrics.pairs.labels(prefill.url, backend.url, outcome).inc()
            else:
                self.metrics.unpaired.labels(pick.whole).inc()

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
                return _Failure("server_error", detail, _passthrough(upstream, body, pick.headers()))
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                body = await upstream.aread()
                outcome = "ok" if upstream.status_code < 400 else "client_error"
                self._observe(started, first_byte=True, done=True)
                return _passthrough(upstream, body, pick.headers())
            events = SseEvents()
            chunks = upstream.aiter_bytes()
            first = b""
            while not first:  # StopAsyncIteration: the stream ended before its first event
                first = events.feed(await anext(chunks))
            prefilled()
            self._observe(started, first_byte=True)
            handed_over = True

            def closed(outcome: str) -> None:
                self.backends.end(backend)
                count(outcome)
                self._observe(started, done=True)

            stream = UnitStream(backend.url, upstream, chunks, events, closed)
            return stream.response(first, pick.headers())
        except (httpx.HTTPError, StopAsyncIteration) as exc:
            outcome = "unreachable"
            detail = describe(exc) if isinstance(exc, httpx.HTTPError) else "no event before the stream ended"
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                # Gone, not just slow: keep it out until a health check says otherwise.
                self.backends.set_health(backend, detail)
            return _Failure("unreachable", detail)
        finally:
            prefilled()
            if not handed_over:
                if upstream is not None:
                    await upstream.aclose()
                self.backends.end(backend)
                count(outcome)

    def _observe(self, started: float, *, first_byte: bool = False, done: bool = False) -> None:
        elapsed = time.monotonic() - started
        if first_byte:
            self.metrics.first_byte.observe(elapsed)
        if done:
            self.metrics.duration.observe(elapsed)


def _passthrough(upstream: httpx.Response, body: bytes, headers: dict[str, str]) -> Response:
    media_type = upstream.headers.get("content-type", "application/json")
    return Response(body, upstream.status_code, headers, media_type=media_type)
