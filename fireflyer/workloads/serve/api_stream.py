"""Streaming for the OpenAI API (`api`): server-sent events, and generations that stop as soon as
the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from fireflyer.workloads.serve import protocol as p
from fireflyer.workloads.serve.text_output import Delta, Generation

log = logging.getLogger(__name__)
T = TypeVar("T")


class Disconnected(Exception):
    """The client went away before the answer was complete."""


class ResponseMeta:
    """What every chunk of one response repeats: its id, creation time and model."""

    def __init__(self, id: str, created: int, model: str) -> None:
        self.id = id
        self.created = created
        self.model = model


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, source: AsyncIterator[T]) -> AsyncIterator[T]:
    """The items of `source`; raises Disconnected as soon as the client goes away, even while
    `source` is waiting (a queued request produces nothing for a while)."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(_next(source))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise Disconnected
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        # Also when the server cancels this generator: no task is left waiting on the engine.
        watcher.cancel()
        if step is not None and not step.done():
            step.cancel()


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


def json_response(model: Any) -> Response:
    return Response(content=model.model_dump_json(), media_type="application/json")


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse(request: Request, generation: Generation, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in until_disconnect(request, chunks):
                yield chunk
        except Disconnected:
            log.info("client went away: aborting %s", generation.request_id)
        except Exception:
            # The status line is sent already: report in the stream, the way OpenAI clients parse.
            log.exception("streaming %s failed", generation.request_id)
            yield event(p.internal_error().body().model_dump())
            yield b"data: [DONE]\n\n"
        finally:
            generation.close()

    return _EventStream(body(), generation)


class _EventStream(StreamingResponse):
    """An SSE response that closes its generation however the response ends, even when the
    client leaves before the body is first iterated (the body's own `finally` never runs then)."""

    def __init__(self, content: AsyncIterator[bytes], generation: Generation) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.close()


async def completion_chunks(
    generation: Generation, meta: ResponseMeta, echo: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(text: str, finish: p.FinishReasonText) -> bytes:
        data = p.CompletionResponse(
            id=meta.id,
            created=meta.created,
            model=meta.model,
            choices=[p.CompletionChoice(text=text, finish_reason=finish)],
        ).model_dump()
        if not include_usage:
            del data["usage"]
        return event(data)

    if echo:
        yield chunk(echo, None)
    async for delta in generation.deltas():
        if delta.text or delta.finish_reason is not None:
            yield chunk(delta.text, delta.finish_reason)
    if include_usage:
        data = p.CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=generation.usage()
        ).model_dump()
        yield event(data)
    yield b"data: [DONE]\n\n"


async def chat_chunks(
    generation: Generation, meta: ResponseMeta, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> bytes:
        data = p.ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage
        ).model_dump()
        for choice in data["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            del data["usage"]
        return event(data)

    yield chunk([p.ChatChunkChoice(delta=p.ChatDelta(role="assistant", content=""))])
    delta: Delta
    async for delta in generation.deltas():
        content = delta.text if delta.text else None
        if content is not None or delta.finish_reason is not None:
            choice = p.ChatChunkChoice(delta=p.ChatDelta(content=content), finish_reason=delta.finish_reason)
            yield chunk([choice])
    if include_usage:
        yield chunk([], generation.usage())
    yield b"data: [DONE]\n\n"
