"""The OpenAI API's behaviour against a scripted engine that keeps AsyncEngine's contract:
response shapes, streaming, usage, stop strings, errors, overload, disconnects, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from fireflyer.workloads.model.tokenizer_files import write_tokenizer
from fireflyer.workloads.serve.api import create_app
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.text_output import StopStringFilter
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import FinishReason, QueueFullError, SamplingParams, TokenEvent

MODEL = "deepseek-tiny"
MAX_MODEL_LEN = 256
CACHED = 3  # the engine double reports this many prompt tokens as served from the prefix cache

pytestmark = pytest.mark.anyio


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

    def abort(self) -> None:
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

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> FakeStream:
        if self.submit_error is not None:
            raise self.submit_error
        if len(self.active) >= self.capacity:
            raise QueueFullError("queue full")
        stream = FakeStream(self, f"req-{len(self.streams)}", list(prompt_ids), params)
        self.streams.append(stream)
        self.active.add(stream)
        return stream

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


# -- shapes ------------------------------------------------------------------------------------


async def test_completion_shape_and_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await complete(client, prompt="Hello world", max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    prompt_ids = engine.tokenizer.encode("Hello world")
    (choice,) = body["choices"]
    text = engine.tokenizer.decode(engine.streams[0].generated)
    assert choice == {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    assert len(engine.streams[0].generated) == 5
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
        "prompt_tokens_details": {"cached_tokens": CACHED},
    }
    assert engine.streams[0].prompt_ids == prompt_ids
    assert engine.streams[0].params.temperature == 0


async def test_completion_sampling_fields_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    fields = {"temperature": 0.7, "top_p": 0.5, "top_k": -1, "seed": 7, "stop_token_ids": [5, 6]}
    r = await complete(client, prompt="Hi", max_tokens=3, ignore_eos=True, **fields)
    assert r.status_code == 200, r.text
    assert engine.streams[0].params == SamplingParams(
        max_tokens=3, temperature=0.7, top_p=0.5, top_k=0, seed=7, stop_token_ids=(5, 6), ignore_eos=True
    )
    await complete(client, prompt="Hi", top_k=40)
    # OpenAI's default of 16 tokens for completions; 1.0 temperature.
    assert engine.streams[1].params == SamplingParams(max_tokens=16, top_k=40)


async def test_completion_prompt_forms(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    ids = engine.tokenizer.encode("The harbour", add_special_tokens=False)
    for prompt in (ids, [ids], ["The harbour"]):
        r = await complete(client, prompt=prompt, max_tokens=2)
        assert r.status_code == 200, r.text
    assert engine.streams[0].prompt_ids == ids  # token ids are taken as they are: no bos added
    assert engine.streams[1].prompt_ids == ids
    assert engine.streams[2].prompt_ids == engine.tokenizer.encode("The harbour")


async def test_completion_echo(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say(" quiet")
    r = await complete(client, prompt="The harbour was", echo=True)
    assert r.json()["choices"][0]["text"] == "The harbour was quiet"
    r = await complete(client, prompt="The harbour was", echo=True, stream=True)
    text = "".join(e["choices"][0]["text"] for e in sse_events(r.text)[:-1])
    assert text == "The harbour was quiet"


async def test_null_max_tokens_fills_the_context(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("ok")
    await complete(client, prompt="Hello", max_tokens=None)
    assert engine.streams[0].params.max_tokens == MAX_MODEL_LEN - len(engine.tokenizer.encode("Hello"))


async def test_chat_shape_and_defaults(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("Paris.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    r = await chat(client, messages=messages)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    message = {"role": "assistant", "content": "Paris."}
    assert body["choices"] == [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]
    prompt_ids = engine.tokenizer.encode_chat(messages)
    assert engine.streams[0].prompt_ids == prompt_ids
    # Chat's default: everything the context leaves.
    assert engine.streams[0].params.max_tokens == MAX_MODEL_LEN - len(prompt_ids)
    n_out = len(engine.script or []) + 1  # the text, then eos
    assert body["usage"]["completion_tokens"] == n_out
    assert body["usage"]["total_tokens"] == len(prompt_ids) + n_out


async def test_chat_max_completion_tokens_and_content_parts(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    r = await chat(
        client, messages=[{"role": "user", "content": parts}], max_tokens=9, max_completion_tokens=4
    )
    assert r.status_code == 200, r.text
    assert engine.streams[0].params.max_tokens == 4
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert engine.streams[0].prompt_ids == engine.tokenizer.encode_chat(joined)
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_chat_template_kwargs_and_generation_prompt(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    await chat(client, messages=messages, add_generation_prompt=False, max_tokens=1)
    assert engine.streams[0].prompt_ids == engine.tokenizer.encode_chat(messages, add_generation_prompt=False)
    kwargs = {"add_generation_prompt": False, "messages": "ignored", "thinking": True}
    r = await chat(client, messages=messages, chat_template_kwargs=kwargs, max_tokens=1)
    assert r.status_code == 200, r.text
    assert engine.streams[1].prompt_ids == engine.streams[0].prompt_ids


# -- streaming ---------------------------------------------------------------------------------


async def test_completion_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("Hello! How are you today?")
    r = await complete(client, prompt="Hi", stream=True, max_tokens=100)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 2
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == MODEL
        assert "usage" not in c  # only with stream_options.include_usage
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello! How are you today?"


async def test_stream_include_usage(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("Hello world")
    r = await complete(client, prompt="Hi", stream=True, stream_options={"include_usage": True})
    *chunks, usage, done = sse_events(r.text)
    assert done == "[DONE]"
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == []
    n_prompt = len(engine.tokenizer.encode("Hi"))
    n_out = len(engine.script or []) + 1
    assert usage["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
        "prompt_tokens_details": {"cached_tokens": CACHED},
    }


async def test_chat_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("Paris is 🙂 nice.")
    r = await chat(client, stream=True, stream_options={"include_usage": True})
    *chunks, usage, done = sse_events(r.text)
    assert done == "[DONE]"
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-")
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    assert all(set(d) <= {"content"} for d in deltas)
    contents = [d.get("content", "") for d in deltas]
    assert "".join(contents) == "Paris is 🙂 nice."
    assert not any("\ufffd" in c for c in contents)  # the emoji's bytes never split across chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(engine.script or []) + 1


async def test_stream_and_non_stream_agree(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    plain = (await complete(client, prompt="The train left the station", max_tokens=12)).json()
    r = await complete(client, prompt="The train left the station", max_tokens=12, stream=True)
    chunks = sse_events(r.text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"] == "length"


# -- stop strings, stop tokens, eos ------------------------------------------------------------


def test_stop_filter_holds_back_possible_starts() -> None:
    f = StopStringFilter(["STOP"])
    assert f.feed("abc S") == "abc "
    assert f.feed("T") == ""
    assert f.feed("x") == "STx"  # not a stop after all: released
    assert f.feed("ST") == ""
    assert f.feed("OP and more") == ""
    assert f.stopped == "STOP"
    assert f.feed("later") == "" and f.flush() == ""


def test_stop_filter_earliest_stop_wins_and_flush() -> None:
    f = StopStringFilter(["world", "lo w"])
    assert f.feed("hello world") == "hel" and f.stopped == "lo w"
    f = StopStringFilter(["\n\n", "END"])
    assert f.feed("line\n") == "line"
    assert f.feed("E") == "\n"
    assert f.flush() == "E"  # generation ended without a stop: the tail is text after all
    assert StopStringFilter(["", "x"]).feed("abc") == "abc"


async def test_stop_string_across_tokens(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    ids = engine.say("The harbour was quiet before dawn.")
    # The tokens up to the one that completes the stop string; "was qui" spans several.
    upto = next(k for k in range(len(ids)) if "was qui" in engine.tokenizer.decode(ids[: k + 1])) + 1
    assert "was" not in engine.tokenizer.decode(ids[upto - 1 : upto])
    engine.delay = 0.005  # the engine is still going when the stop string turns up
    r = await complete(client, prompt="Hi", stop=["was qui"], max_tokens=50)
    body = r.json()
    assert body["choices"][0]["text"] == "The harbour "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == upto
    stream = engine.streams[0]
    assert stream.aborted  # the engine is told to stop generating
    assert len(stream.generated) < len(ids)


async def test_stop_string_stream_never_leaks(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("Question: What is the capital of France? Answer: Paris.")
    r = await complete(client, prompt="Hi", stop="Answer:", stream=True, max_tokens=50)
    chunks = sse_events(r.text)[:-1]
    texts = [c["choices"][0]["text"] for c in chunks]
    # Every delta is final: no text a later chunk takes back.
    assert "".join(texts) == "Question: What is the capital of France? "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    for i in range(len(texts)):
        assert not "".join(texts[: i + 1]).endswith(("A", "An", "Ans", "Answ", "Answe", "Answer"))


async def test_possible_stop_prefix_released_at_the_end(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.say("Hello wor")
    for stream in (False, True):
        r = await complete(client, prompt="Hi", stop=["world", "xyz"], stream=stream, max_tokens=50)
        if stream:
            text = "".join(c["choices"][0]["text"] for c in sse_events(r.text)[:-1])
        else:
            text = r.json()["choices"][0]["text"]
        assert text == "Hello wor"


async def test_chat_stop_string(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.say("one, two, three")
    r = await chat(client, stop=[", th"])
    assert r.json()["choices"][0]["message"]["content"] == "one, two"
    r = await chat(client, stop=[", th"], stream=True)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in sse_events(r.text)[:-1]]
    assert "".join(deltas) == "one, two"


async def test_stop_token_ids_and_eos(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    ids = engine.say("Hello world today")
    r = await complete(client, prompt="Hi", stop_token_ids=[ids[1]], max_tokens=50)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == engine.tokenizer.decode(ids[:2])  # a stop token's text is kept
    r = await complete(client, prompt="Hi", max_tokens=50)
    assert r.json()["choices"][0]["text"] == "Hello world today"  # eos: stop, and its text is not shown
    r = await complete(client, prompt="Hi", max_tokens=len(ids) + 3, ignore_eos=True)
    assert r.json()["choices"][0]["finish_reason"] == "length"


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", -3, "max_tokens"),
        ("temperature", -0.1, "temperature"),
        ("top_p", 0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -2, "top_k"),
        ("n", 2, "n"),
        ("logprobs", 1, "logprobs"),
        ("best_of", 3, "best_of"),
        ("stop", ["a", "b", "c", "d", "e"], "stop"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("stop_token_ids", [-1], "stop_token_ids"),
    ],
)
async def test_completion_bad_values(client: httpx.AsyncClient, field: str, value: Any, param: str) -> None:
    error = assert_error(await complete(client, prompt="Hi", **{field: value}), 400, param)
    assert field in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"n": 3}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
    ],
)
async def test_chat_bad_values(client: httpx.AsyncClient, fields: dict[str, Any], param: str) -> None:
    assert_error(await chat(client, **fields), 400, param)


async def test_unsupported_logprobs_message(client: httpx.AsyncClient) -> None:
    error = assert_error(await chat(client, logprobs=True), 400, "logprobs")
    assert error["message"] == "logprobs is not supported by this server."
    assert error["code"] == "unsupported_parameter"


async def test_context_length_exceeded(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    n_prompt = len(engine.tokenizer.encode("Hello"))
    error = assert_error(await complete(client, prompt="Hello", max_tokens=MAX_MODEL_LEN), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
        f"{n_prompt + MAX_MODEL_LEN} tokens ({n_prompt} in the prompt, {MAX_MODEL_LEN} in the completion)."
    )
    messages = [{"role": "user", "content": "Hello"}]
    n_chat = len(engine.tokenizer.encode_chat(messages))
    error = assert_error(await chat(client, messages=messages, max_tokens=MAX_MODEL_LEN), 400, "messages")
    assert f"({n_chat} in the messages, {MAX_MODEL_LEN} in the completion)" in error["message"]
    # A prompt that fills the context on its own, whatever max_tokens says.
    long_prompt = list(range(10, 10 + MAX_MODEL_LEN))
    error = assert_error(await complete(client, prompt=long_prompt, max_tokens=None), 400, "prompt")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert not engine.streams


async def test_unknown_model(client: httpx.AsyncClient) -> None:
    for r in (
        await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}),
        await client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user"}]}),
        await client.get("/v1/models/gpt-4"),
    ):
        error = assert_error(r, 404, "model")
        assert error["message"] == "The model `gpt-4` does not exist."
        assert error["code"] == "model_not_found"
    # Leaving the model out is fine: there is only one.
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("content", "param", "needle"),
    [
        (b'{"prompt": "x", ', None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"model": "deepseek-tiny"}', "prompt", "`prompt` is required"),
        (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens", "max_tokens"),
        (b'{"prompt": {"a": 1}}', "prompt", "`prompt` must be a string, a list of token ids"),
        (b'{"prompt": "x", "stop": 5}', "stop", "`stop` must be"),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature", "temperature"),
        (b'{"messages": [{"content": "hi"}]}', "messages", "`messages.0.role` is required"),
        (b'{"messages": "hi"}', "messages", "`messages` must be a non-empty list"),
    ],
)
async def test_malformed_requests(
    client: httpx.AsyncClient, content: bytes, param: str | None, needle: str
) -> None:
    path = "/v1/chat/completions" if b"messages" in content else "/v1/completions"
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    error = assert_error(r, 400, param)
    assert needle in error["message"]


async def test_bad_prompts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    error = assert_error(await complete(client, prompt=["a", "b"]), 400, "prompt")
    assert "Batched prompts are not supported" in error["message"]
    assert_error(await complete(client, prompt=[[1, 2], [3]]), 400, "prompt")
    assert_error(await complete(client, prompt=""), 400, "prompt")
    assert_error(await complete(client, prompt=[]), 400, "prompt")
    error = assert_error(await complete(client, prompt=[1, engine.tokenizer.vocab_size + 5]), 400, "prompt")
    assert "vocabulary" in error["message"]
    assert not engine.streams


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404)
    assert_error(await client.get("/v1/completions"), 405)


async def test_engine_value_error_is_400(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.submit_error = ValueError("prompt has 300 tokens, the engine takes at most 256")
    error = assert_error(await complete(client, prompt="Hi"), 400)
    assert error["message"] == "prompt has 300 tokens, the engine takes at most 256"


async def test_unexpected_error_is_500_and_serving_goes_on(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.submit_error = RuntimeError("boom")
    error = assert_error(await complete(client, prompt="Hi"), 500)
    assert "boom" not in error["message"]  # internals stay in the log
    engine.submit_error = None
    engine.fail_after = 2
    assert_error(await complete(client, prompt="Hi", max_tokens=5), 500)
    assert engine.streams[-1].aborted
    # Mid-stream the status line is out already: the error comes as an event, then [DONE].
    r = await complete(client, prompt="Hi", max_tokens=5, stream=True)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
    engine.fail_after = None
    assert (await complete(client, prompt="Hi", max_tokens=2)).status_code == 200


async def test_queue_full_is_503_while_others_complete(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.capacity = 1
    engine.gate.clear()
    first = asyncio.create_task(complete(client, prompt="Hello", max_tokens=3))
    while not engine.streams:
        await asyncio.sleep(0.01)
    for request in (complete(client, prompt="Hi"), chat(client, stream=True)):
        error = assert_error(await request, 503, type_="service_unavailable_error")
        assert "overloaded" in error["message"]
    engine.gate.set()
    r = await first
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# -- models, health, metrics -------------------------------------------------------------------


async def test_models(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "fireflyer"
    assert card["max_model_len"] == MAX_MODEL_LEN and isinstance(card["created"], int)
    assert (await client.get(f"/v1/models/{MODEL}")).json() == card


async def test_health(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert (await client.get("/health")).status_code == 200
    engine.healthy = False
    assert_error(await client.get("/health"), 503, type_="service_unavailable_error")


async def test_metrics_endpoint(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    m = engine.metrics
    m.record_prompt_tokens(12)
    m.record_prefix_cache(queried_tokens=12, hit_tokens=3)
    m.record_generated_tokens(5)
    m.record_first_token(0.05)
    m.record_inter_token(0.01)
    m.record_request_finished(FinishReason.LENGTH, 0.5)
    m.set_kv_blocks(used=3, total=100)
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in (
        "fireflyer_serve_prompt_tokens_total 12.0",
        "fireflyer_serve_prefix_cache_hit_ratio 0.25",
        'fireflyer_serve_requests_total{finish_reason="length"} 1.0',
        'fireflyer_serve_requests_total{finish_reason="abort"} 0.0',
        "fireflyer_serve_kv_blocks_used 3.0",
        "fireflyer_serve_time_to_first_token_seconds_count 1.0",
    ):
        assert line in text.splitlines()


def test_metrics_instances_are_independent_and_rate_decays() -> None:
    now = [100.0]
    a = EngineMetrics(rate_window_s=10, clock=lambda: now[0])
    b = EngineMetrics()
    now[0] = 120.0
    a.record_generated_tokens(50)
    a.record_generated_tokens(50)
    assert a.generation_rate() == pytest.approx(10.0)
    now[0] = 125.0
    assert a.generation_rate() == pytest.approx(10.0)
    now[0] = 131.0
    assert a.generation_rate() == 0.0
    a.record_preemptions(2)
    a.record_kv_tier_hit(64)
    a.set_scheduler_state(running=4, waiting=7)
    text = a.render().decode()
    assert "fireflyer_serve_preemptions_total 2.0" in text
    assert "fireflyer_serve_kv_tier_hit_tokens_total 64.0" in text
    assert "fireflyer_serve_requests_waiting 7.0" in text
    assert "fireflyer_serve_preemptions_total 0.0" in b.render().decode()


# -- disconnects -------------------------------------------------------------------------------


async def test_non_streaming_disconnect_aborts(engine: FakeEngine) -> None:
    """Drive the ASGI app directly so the client can go away while the answer is pending."""
    app = create_app(engine)
    engine.gate.clear()  # the request sits in the engine and produces nothing
    gone = asyncio.Event()
    body = json.dumps({"prompt": "Hello", "max_tokens": 50}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    call = asyncio.create_task(app(scope, receive, send))
    while not engine.streams:
        await asyncio.sleep(0.01)
    gone.set()
    await asyncio.wait_for(call, 5)
    assert engine.streams[0].aborted
    assert sent[0]["status"] == 499  # a disconnect, not an error


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def live_server(tokenizer: ServeTokenizer) -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(tokenizer)
    engine.max_model_len = 100_000  # room for generations longer than the test ever waits for
    app: FastAPI = create_app(engine)
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    host, port = sock.getsockname()
    try:
        yield f"http://{host}:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.timeout(60)
def test_real_socket_stream_then_disconnect(live_server: tuple[str, FakeEngine]) -> None:
    url, engine = live_server
    engine.delay = 0.01
    body = {"model": MODEL, "prompt": "The harbour was quiet", "max_tokens": 10_000, "stream": True}
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                if len(chunks) == 5:
                    break
        assert all(c["object"] == "text_completion" for c in chunks)
        # The response is closed mid-stream: the connection goes, and the engine must stop.
        stream = engine.streams[0]
        assert _wait_for(lambda: stream.finished), "the engine request goes on"
        assert stream.aborted
        produced = len(stream.generated)
        assert produced < 200
        time.sleep(0.1)
        assert len(stream.generated) == produced  # no orphan generation

        # The server goes on serving, and a non-streaming request whose client gives up is aborted too.
        engine.delay = 0.05
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert _wait_for(lambda: len(engine.streams) == 2 and engine.streams[1].aborted)
        engine.delay = 0
        r2 = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r2.status_code == 200 and r2.json()["usage"]["completion_tokens"] == 3
