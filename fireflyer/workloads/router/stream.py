"""The streaming half of forwarding: an SSE answer passed to the client event by event, ended
with an error event in OpenAI's shape (then `data: [DONE]`) when the unit fails mid-way, and the
watch for a client that goes away before an answer begins."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fireflyer.workloads.router.backends import describe
from fireflyer.workloads.serve.protocol import ApiError

log = logging.getLogger("fireflyer.router")
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Truncated(Exception):
    """The unit closed a stream without its `data: [DONE]`."""


class SseEvents:
    """Cuts a byte stream at event boundaries, so only whole events go on: a unit that fails
    mid-event leaves no half event in front of the router's error event."""

    def __init__(self) -> None:
        self._pending = b""
        self.done = False  # `data: [DONE]` went through

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        ends = (i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := data.rfind(sep)) >= 0)
        cut = max(ends, default=0)
        whole, self._pending = data[:cut], data[cut:]
        if whole.rstrip().endswith(b"data: [DONE]"):
            self.done = True
        return whole


def error_event(error: ApiError) -> bytes:
    return b"data: " + error.body().model_dump_json().encode() + b"\n\ndata: [DONE]\n\n"


class UnitStream:
    """A unit's SSE answer, its first events already read. `on_close(outcome)` runs exactly once,
    at the end of the relay or of the response, whichever comes first: a client that leaves
    before the body is first iterated never runs the relay's own cleanup."""

    def __init__(
        self,
        url: str,
        upstream: httpx.Response,
        chunks: AsyncIterator[bytes],
        events: SseEvents,
        on_close: Callable[[str], None],
    ) -> None:
        self.url = url
        self.upstream = upstream
        self._chunks = chunks
        self._events = events
        self._on_close = on_close
        self.outcome = "cancelled"  # the client went away, unless the stream gets to its end
        self._closed = False

    async def relay(self, first: bytes) -> AsyncIterator[bytes]:
        try:
            yield first
            try:
                async for chunk in self._chunks:
                    data = self._events.feed(chunk)
                    if data:
                        yield data
                if not self._events.done:
                    raise _Truncated("the stream ended without data: [DONE]")
                self.outcome = "ok"
            except Exception as exc:  # the status line is out: report in the stream, never hang
                self.outcome = "stream_error"
                log.warning("stream from %s broke: %s", self.url, describe(exc))
                message = f"The unit {self.url} failed while streaming this answer: {describe(exc)}."
                yield error_event(ApiError(502, message, type="server_error", code="backend_stream_error"))
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close(self.outcome)
        await self.upstream.aclose()

    def response(self, first: bytes, headers: dict[str, str]) -> StreamingResponse:
        return _EventStream(self, first, {**SSE_HEADERS, **headers})


class _EventStream(StreamingResponse):
    def __init__(self, stream: UnitStream, first: bytes, headers: dict[str, str]) -> None:
        status = stream.upstream.status_code
        super().__init__(stream.relay(first), status, headers, media_type="text/event-stream")
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.close()


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None as soon as the client goes away first: `work` is cancelled, which
    closes its connection to the unit, and the unit aborts the request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # its cleanup (closing the unit's connection) runs before we answer
    return None
