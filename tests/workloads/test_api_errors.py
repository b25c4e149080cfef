"""The OpenAI API's errors against a scripted engine (tests/workloads/api_engine.py): bad values and
malformed requests, engine errors, overload, and clients that go away."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from fireflyer.workloads.serve.api import create_app
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from tests.workloads.api_engine import (
    MAX_MODEL_LEN,
    MODEL,
    FakeEngine,
    assert_error,
    chat,
    complete,
    sse_events,
)
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import client as client
from tests.workloads.api_engine import engine as engine
from tests.workloads.api_engine import tokenizer as tokenizer

pytestmark = pytest.mark.anyio


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
