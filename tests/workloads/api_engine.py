"""A scripted engine that keeps AsyncEngine's contract, the fixtures that serve it through the
OpenAI API app, and the request and response helpers the API tests share.

Test modules import the fixtures as `from tests.workloads.api_engine import client as client`:
pytest finds them in the module, and the `as` form (an explicit re-export) keeps ruff from taking
the test parameters of the same names for redefinitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fireflyer.workloads.model.tokenizer_files import write_tokenizer
from fireflyer.workloads.serve.api import LoadSource, create_app
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import FinishReason, QueueFullError, SamplingParams, TokenEvent

MODEL = "deepseek-tiny"
MAX_MODEL_LEN = 256
CACHED = 3  # the engine double reports this many prompt tokens as served from the prefix cache


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeStream:
    """One request. Like the real engine, it generates on its own (a task per request) whether or
    not anybody reads the events, until it finishes or is aborted: `script` (then eos), or the
    prompt's ids over and over."""

    def __init__(self, engine: FakeEngine, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine = engine
        self.request_id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.aborted = False
        self.finished = False
        self.generated: list[int] = []
        self._events: asyncio.Queue[TokenEvent | Exception] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._generate())

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None:
        self.aborted = True
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def _next_token(self, i: int) -> int:
        script = self.engine.script
        if script is None:
            return self.prompt_ids[i % len(self.prompt_ids)]
        return script[i] if i < len(script) else self.engine.eos_id

    def _event(self, token: int | None, reason: FinishReason | None) -> TokenEvent:
        return TokenEvent(token, reason, len(self.prompt_ids), min(CACHED, len(self.prompt_ids)))

    async def _generate(self) -> None:
        try:
            for i in range(self.params.max_tokens):
                await self.engine.gate.wait()
                if self.engine.delay:
                    with contextlib.suppress(TimeoutError):  # a sleep that an abort cuts short
                        await asyncio.wait_for(self._wake.wait(), self.engine.delay)
                if self.aborted:
                    self._events.put_nowait(self._event(None, FinishReason.ABORT))
                    return
                if self.engine.fail_after is not None and i >= self.engine.fail_after:
                    self._events.put_nowait(RuntimeError("engine exploded"))
                    return
                token = self._next_token(i)
                self.generated.append(token)
                eos = token == self.engine.eos_id and not self.params.ignore_eos
                if eos or token in self.params.stop_token_ids:
                    self._events.put_nowait(self._event(token, FinishReason.STOP))
                    return
                last = i + 1 == self.params.max_tokens
                self._events.put_nowait(self._event(token, FinishReason.LENGTH if last else None))
        finally:
            self.finished = True
            self.engine.active.discard(self)


class FakeEngine:
    def __init__(self, tokenizer: ServeTokenizer, capacity: int = 64) -> None:
        self.model_name = MODEL
        self.max_model_len = MAX_MODEL_LEN
        self.tokenizer = tokenizer
        self.metrics = EngineMetrics()
        self.eos_id = tokenizer.eos_token_id or 0
        self.capacity = capacity
        self.healthy = True
        self.script: list[int] | None = None
        self.delay = 0.0
        self.fail_after: int | None = None
        self.submit_error: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.streams: list[FakeStream] = []
        self.active: set[FakeStream] = set()
        self.placement_generation: int | None = None
        self.prefill_urls: list[str] = []  # the x-fireflyer-prefill of each request, if any
        self.placement_error: str | None = None
        self.eplb_window: LoadSource | None = None  # a dense model: no expert load to report

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, *, handoff: Any = None, kv_target: Any = None
    ) -> FakeStream:
        if self.submit_error is not None:
            raise self.submit_error
        if len(self.active) >= self.capacity:
            raise QueueFullError("queue full")
        stream = FakeStream(self, f"req-{len(self.streams)}", list(prompt_ids), params)
        self.streams.append(stream)
        self.active.add(stream)
        return stream

    async def fetch_kv(self, prompt_ids: list[int], prefill_url: str) -> None:
        """A scripted engine takes no KV hand-offs: it computes every request itself."""
        self.prefill_urls.append(prefill_url)

    def submit_prefill(self, prompt_ids: list[int], target: Any) -> FakeStream:
        return self.submit(prompt_ids, SamplingParams(max_tokens=1, temperature=0), kv_target=target)

    def gpu_tokens(self) -> list[list[int]] | None:
        return None

    def is_healthy(self) -> bool:
        return self.healthy

    def say(self, text: str) -> list[int]:
        """Script the next generations to spell `text` (then eos)."""
        self.script = self.tokenizer.encode(text, add_special_tokens=False)
        return self.script


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ServeTokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return ServeTokenizer.from_pretrained(path)


@pytest.fixture
def engine(tokenizer: ServeTokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body; [DONE] as the string."""
    assert body.endswith("\n\n")
    events = []
    for block in body.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, type_: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    assert error["type"] == (type_ or ("invalid_request_error" if status < 500 else "server_error"))
    return error


async def complete(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": MODEL, **body})


async def chat(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    messages = body.pop("messages", [{"role": "user", "content": "Hello!"}])
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body})
