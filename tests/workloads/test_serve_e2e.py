"""End to end: `fireflyer serve` as a real process, driven over HTTP (tests/workloads/serve_servers.py),
against the offline engine: the main server (concurrent mixed requests, streaming, the prefix cache,
bad input), and a unit of several ranks, which serve refuses."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fireflyer.workloads.serve.types import BLOCK_TOKENS
from tests.ports import free_port
from tests.workloads.serve_servers import (
    FINISHED_LENGTH,
    GEN,
    HIT,
    MAX_MODEL_LEN,
    MODEL,
    REPO,
    REQUEST_TIMEOUT_S,
    Reference,
    Server,
    assert_error,
    assert_matches,
    logs_on_failure,
    metrics,
    random_prompt,
    run_all,
    run_one,
    started_servers,
)
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.serve_servers import reference as reference


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with started_servers(["main"], checkpoint, tmp_path_factory) as servers:
        yield servers["main"].wait_ready()


# -- tests -------------------------------------------------------------------------------------


def test_concurrent_mixed_requests_match_offline_greedy(server: Server, reference: Reference) -> None:
    rng = random.Random(1)
    lengths = [3, 5, 9, 17, 31, 63, 64, 65, 100, 127, 128, 129, 190, 250, 300, 333] * 2
    rng.shuffle(lengths)
    prompts = [random_prompt(rng, n) for n in lengths]
    max_tokens = [rng.randint(8, 24) for _ in prompts]
    streamed = [i % 2 == 0 for i in range(len(prompts))]
    expected = reference.texts(prompts, max_tokens)
    with logs_on_failure(server):
        before = metrics(server)
        results = run_all(server, prompts, max_tokens, streamed)
        assert_matches(results, expected, prompts, max_tokens)
        assert all(r.chunks > 0 for r, s in zip(results, streamed, strict=True) if s)

        models = httpx.get(server.url + "/v1/models", timeout=10.0).json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
        card = httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=10.0)
        assert card.status_code == 200 and card.json()["id"] == MODEL

        after = metrics(server)
        assert after[GEN] >= sum(max_tokens)
        assert after[GEN] - before[GEN] >= sum(max_tokens)
        assert after[FINISHED_LENGTH] - before[FINISHED_LENGTH] >= len(prompts)


def test_prefix_cache_hits_change_no_output(server: Server, reference: Reference) -> None:
    rng = random.Random(2)
    shared = 3 * BLOCK_TOKENS
    prefix = random_prompt(rng, shared)
    prompts = [prefix + random_prompt(rng, n) for n in (7, 20, 64, 101, 150)]
    max_tokens = [12, 16, 9, 20, 14]
    expected = reference.texts(prompts, max_tokens)  # computed without any cache hit
    with logs_on_failure(server):
        before = metrics(server)
        first = run_one(server, prompts[0], max_tokens[0])
        assert first.cached_tokens == 0, "nothing else served this prefix"
        rest = run_all(server, prompts[1:], max_tokens[1:], [False, True, False, True])
        results = [first, *rest]
        assert_matches(results, expected, prompts, max_tokens)
        # Exactly the shared full blocks: each prompt's own blocks after them are its own.
        assert [r.cached_tokens for r in rest] == [shared] * len(rest)
        after = metrics(server)
        assert after[HIT] - before[HIT] >= shared * len(rest)


def test_bad_requests_get_openai_errors(server: Server, reference: Reference) -> None:
    ok = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with logs_on_failure(server), httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as c:
        r = c.post("/v1/completions", json=ok | {"model": "no-such-model"})
        assert "no-such-model" in assert_error(r, 404, code="model_not_found", param="model")
        assert_error(c.get("/v1/models/no-such-model"), 404, code="model_not_found")
        chat = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(c.post("/v1/chat/completions", json=chat), 404, code="model_not_found")

        too_long = ok | {"prompt": [7] * (MAX_MODEL_LEN + 1)}
        message = assert_error(c.post("/v1/completions", json=too_long), 400, code="context_length_exceeded")
        assert str(MAX_MODEL_LEN) in message and str(MAX_MODEL_LEN + 1) in message, message
        no_room = ok | {"prompt": [7] * 4000, "max_tokens": 200}
        message = assert_error(c.post("/v1/completions", json=no_room), 400, code="context_length_exceeded")
        assert all(str(n) in message for n in (MAX_MODEL_LEN, 4200, 4000, 200)), message

        for bad in (-1, 0):
            r = c.post("/v1/completions", json=ok | {"max_tokens": bad})
            assert str(bad) in assert_error(r, 400, param="max_tokens")
        headers = {"content-type": "application/json"}
        assert_error(c.post("/v1/completions", content=b'{"prompt": [1, 2', headers=headers), 400)
        assert_error(c.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
        assert_error(c.post("/v1/completions", json={"max_tokens": 4}), 400, param="prompt")
        assert_error(c.post("/v1/completions", json=ok | {"prompt": [5, 100_000]}), 400, param="prompt")
        assert_error(c.post("/v1/completions", json=ok | {"prompt": []}), 400, param="prompt")

        # The server is none the worse: a completion and a chat completion, both still greedy-exact.
        prompt = [9, 8, 7, 6, 5]
        messages = [{"role": "user", "content": "Hello there"}]
        chat_prompt = reference.tokenizer.encode_chat(messages)
        expected = reference.texts([prompt, chat_prompt], [6, 6])
        r = c.post("/v1/completions", json=ok | {"prompt": prompt, "max_tokens": 6, "model": MODEL})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[0]
        body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["usage"]["prompt_tokens"] == len(chat_prompt)
        assert data["usage"]["completion_tokens"] == 6
        assert data["choices"][0]["message"]["content"] == expected[1]
        assert c.get("/health").status_code == 200

        # The expert load window (docs/eplb.md's contract): 2 MoE layers of 16 experts, top-4;
        # every computed token passed through both layers.
        r = c.get("/v1/eplb/load")
        assert r.status_code == 200, r.text
        load = r.json()
        assert (load["layers"], load["experts"], load["windowSeconds"]) == (2, 16, 600)
        assert [len(row) for row in load["tokens"]] == [16, 16]
        assert all(isinstance(t, int) and t >= 0 for row in load["tokens"] for t in row)
        first, second = (sum(row) for row in load["tokens"])
        assert first == second and first > 0 and first % 4 == 0, load
        assert_error(c.get("/v1/eplb/load?windowSeconds=601"), 400, param="windowSeconds")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "needs --dist-init-addr HOST:PORT of rank 0"),
        (["--tensor-parallel", "2"], "use parallelism.tensor 1"),
        (
            ["--gpus-per-node", "4", "--expert-parallel", "2", "--dist-init-addr", "h:1"],
            "--expert-parallel 2",
        ),
    ],
)
def test_a_unit_this_engine_cannot_run_is_refused(checkpoint: Path, flags: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "fireflyer.cli", "serve", "--model", str(checkpoint), *flags]
    cmd += ["--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Uvicorn running" not in done.stdout + done.stderr
