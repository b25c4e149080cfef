"""The OpenAI API against a scripted engine (tests/workloads/api_engine.py): the shapes of
completions and chat completions, streaming, usage, stop strings, stop tokens and eos."""

from __future__ import annotations

import httpx
import pytest

from fireflyer.workloads.serve.text_output import StopStringFilter
from fireflyer.workloads.serve.types import SamplingParams
from tests.workloads.api_engine import CACHED, MAX_MODEL_LEN, MODEL, FakeEngine, chat, complete, sse_events
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import client as client
from tests.workloads.api_engine import engine as engine
from tests.workloads.api_engine import tokenizer as tokenizer

pytestmark = pytest.mark.anyio


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
