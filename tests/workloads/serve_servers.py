"""`fireflyer serve` as a real process on 127.0.0.1 for the end-to-end tests, the offline engine
(`LLMEngine.generate`, run in the test process on the same tiny checkpoint) they are checked
against, and the HTTP helpers that drive the servers.

The servers (`SERVER_FLAGS`), each started once by the module that uses it:
- main: the OpenAI API at large: concurrent mixed requests, streaming, the prefix cache, bad input;
- small: 12 KV blocks for 8 sequences, so sequences are preempted and recomputed;
- tier: BF16 with an on-disk KV tier, 8 KV blocks, one sequence at a time and a one-request queue
  (blocks get evicted to the tier, and a burst of requests finds the queue full).

Main and small run the BF16 checkpoint with `--dtype float32`, and so does the offline reference:
with BF16 activations greedy decoding depends on how requests happen to be batched (a step's
matmuls round differently for different batch shapes, and BF16 logits tie exactly in about 2% of
steps), so the same prompts generated one by one and as one batch of 32 differ in 9 of 32 within
24 tokens. Float32 outputs do not depend on the batch. The tier server has to run BF16 (the store
keeps BF16 or FP8 blocks); its tests compare the same prompt served alone each time.

Expected text is what the server's own incremental detokenizer makes of the reference token ids:
for random byte-level tokens that can differ from one `decode()` of all ids at once (undecodable
bytes are let through piecewise), which is not what these tests are about.

Test modules import the fixtures as `from tests.workloads.serve_servers import reference as
reference`: pytest finds them in the module, and the `as` form (an explicit re-export) keeps ruff
from taking the test parameters of the same names for redefinitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.serve.block_manager import blocks_for
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import SamplingParams
from fireflyer.workloads.threads import single_intra_op_thread
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-e2e"  # the main server's --served-model-name
MAX_MODEL_LEN = 4096  # the tiny preset's max_position_embeddings
STARTUP_TIMEOUT_S = 120.0  # on a busy host the imports alone take seconds
REQUEST_TIMEOUT_S = 120.0
FIRST_TOKEN_ID = 2  # prompts avoid BOS (0) and EOS (1)
GEN = "fireflyer_serve_generation_tokens_total"
HIT = "fireflyer_serve_prefix_cache_hit_tokens_total"
TIER_HIT = "fireflyer_serve_kv_tier_hit_tokens_total"
PREEMPTIONS = "fireflyer_serve_preemptions_total"
FINISHED_LENGTH = 'fireflyer_serve_requests_total{finish_reason="length"}'


# -- servers -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies, even killed, so no server outlives it."""
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """One `fireflyer serve` process; its output goes to `log_path`."""

    def __init__(self, name: str, model_dir: Path, log_dir: Path, flags: list[str]) -> None:
        self.name = name
        self.model_dir = model_dir
        self.flags = flags
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "fireflyer.cli", "serve", "--model", str(self.model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *self.flags]
        # One intra-op thread, as in single_intra_op_thread().
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, preexec_fn=_die_with_parent
            )
        self.ready = False

    def wait_ready(self) -> Server:
        if self.ready:
            return self
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.ready = True
                    return self
            time.sleep(0.2)
        pytest.fail(f"server {self.name} not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def log_tail(self, chars: int = 12_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


@contextlib.contextmanager
def logs_on_failure(*servers: Server) -> Iterator[None]:
    """Print the servers' logs when the body fails: pytest shows them with the failure."""
    try:
        yield
    except BaseException:
        for server in servers:
            print(f"----- log of server {server.name} ({server.log_path}) -----\n{server.log_tail()}")
        raise


SERVER_FLAGS = {
    "main": f"--served-model-name {MODEL} --dtype float32 --num-kv-blocks 256",
    "small": "--dtype float32 --num-kv-blocks 12 --max-num-seqs 8 --max-waiting 64",
    "tier": "--dtype bfloat16 --num-kv-blocks 8 --max-num-seqs 1 --max-waiting 1",  # and --kv-cache-dir
}


@contextlib.contextmanager
def started_servers(
    names: Sequence[str], checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """The named servers, started at once so they load in parallel; each test waits for its own
    (`Server.wait_ready`). They are stopped when the block ends."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started = {}
    for name in names:
        flags = SERVER_FLAGS[name]
        if name == "tier":
            flags += f" --kv-cache-dir {tmp_path_factory.mktemp('kv-tier')}"
        started[name] = Server(name, checkpoint, logs, flags.split())
    try:
        for server in started.values():
            server.start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("serve-e2e") / "tiny", preset="tiny", dtype="bf16", seed=0)


# -- the offline reference ---------------------------------------------------------------------


class Reference:
    """Greedy generation by LLMEngine in this process, float32, every prompt computed from
    scratch: one batch, all prompts admitted in the first step (so no prefix-cache hits), with
    KV blocks to spare (so no preemption)."""

    def __init__(self, model_dir: Path) -> None:
        with single_intra_op_thread():
            self.model = load_model(model_dir, device="cpu", dtype=torch.float32)
        self.tokenizer = ServeTokenizer.from_pretrained(model_dir)

    @single_intra_op_thread()
    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
        blocks = sum(blocks_for(len(p) + m) for p, m in zip(prompts, max_tokens, strict=True))
        config = EngineConfig(
            max_num_seqs=len(prompts),
            max_num_batched_tokens=sum(len(p) for p in prompts),
            num_kv_blocks=blocks + 1,
        )
        engine = LLMEngine(self.model, self.tokenizer.eos_token_ids, config)
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
        seqs = engine.generate(prompts, params)
        assert engine.block_manager.hit_tokens == 0, "the reference must compute every prompt"
        assert engine.scheduler.num_preemptions == 0, "the reference must not be preempted"
        outputs = [s.output_ids for s in seqs]
        assert [len(o) for o in outputs] == max_tokens
        return outputs

    def text(self, prompt: list[int], output_ids: list[int]) -> str:
        """The text the server streams for these tokens: one token at a time, then a flush."""
        detokenizer = self.tokenizer.detokenizer(prompt)
        return "".join(detokenizer.add(t) for t in output_ids) + detokenizer.flush()

    def texts(self, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        outputs = self.generate(prompts, max_tokens)
        return [self.text(p, o) for p, o in zip(prompts, outputs, strict=True)]


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Reference:
    return Reference(checkpoint)


# -- HTTP helpers ------------------------------------------------------------------------------


@dataclass
class Completion:
    status: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = -1
    completion_tokens: int = -1
    cached_tokens: int = -1
    error: dict[str, Any] | None = None
    chunks: int = 0  # SSE data events, [DONE] excluded


def random_prompt(rng: random.Random, n: int, vocab: int = 1000) -> list[int]:
    return [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)]


def client(server: Server) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S, limits=limits)


def read_usage(into: Completion, usage: dict[str, Any]) -> None:
    into.prompt_tokens = usage["prompt_tokens"]
    into.completion_tokens = usage["completion_tokens"]
    assert usage["total_tokens"] == into.prompt_tokens + into.completion_tokens
    into.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def complete(
    c: httpx.AsyncClient, prompt: list[int], max_tokens: int, *, stream: bool, model: str | None = None
) -> Completion:
    """A greedy /v1/completions request; the streamed text is reassembled from its SSE events."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if model is not None:
        body["model"] = model
    if not stream:
        r = await c.post("/v1/completions", json=body)
        data = r.json()
        if r.status_code != 200:
            return Completion(r.status_code, error=data.get("error"))
        (choice,) = data["choices"]
        result = Completion(200, text=choice["text"], finish_reason=choice["finish_reason"])
        read_usage(result, data["usage"])
        return result
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return Completion(r.status_code, error=json.loads(await r.aread()).get("error"))
        assert r.headers["content-type"].startswith("text/event-stream")
        result = Completion(200)
        parts: list[str] = []
        done = False
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            assert not done, f"an event after [DONE]: {line}"
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                continue
            event = json.loads(payload)
            assert "error" not in event, event
            result.chunks += 1
            for choice in event["choices"]:
                assert result.finish_reason is None, f"text after the finish reason: {event}"
                parts.append(choice["text"])
                result.finish_reason = choice["finish_reason"]
            if event.get("usage"):
                assert not event["choices"], "usage comes in its own last event"
                read_usage(result, event["usage"])
        assert done, "the stream ended without [DONE]"
    result.text = "".join(parts)
    return result


async def complete_all(
    server: Server, prompts: list[list[int]], max_tokens: list[int], streamed: list[bool]
) -> list[Completion]:
    async with client(server) as c:
        jobs = (complete(c, p, m, stream=s) for p, m, s in zip(prompts, max_tokens, streamed, strict=True))
        return list(await asyncio.gather(*jobs))


def run_all(
    server: Server, prompts: list[list[int]], max_tokens: list[int], streamed: list[bool]
) -> list[Completion]:
    return asyncio.run(complete_all(server, prompts, max_tokens, streamed))


def run_one(server: Server, prompt: list[int], max_tokens: int, stream: bool = False) -> Completion:
    return run_all(server, [prompt], [max_tokens], [stream])[0]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$")


def metrics(server: Server) -> dict[str, float]:
    """The Prometheus exposition as {name{labels}: value}."""
    r = httpx.get(server.url + "/metrics", timeout=10.0)
    assert r.status_code == 200
    samples = {}
    for line in r.text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            samples[m.group(1)] = float(m.group(2))
    return samples


def assert_matches(
    results: list[Completion], expected: list[str], prompts: list[list[int]], max_tokens: list[int]
) -> None:
    for i, (r, text, prompt, m) in enumerate(zip(results, expected, prompts, max_tokens, strict=True)):
        where = f"request {i} ({len(prompt)} prompt tokens, max_tokens {m})"
        assert r.status == 200, f"{where}: {r.status} {r.error}"
        assert r.finish_reason == "length", where
        assert r.prompt_tokens == len(prompt), where
        assert r.completion_tokens == m, where
        assert r.text == text, f"{where}: served {r.text!r}, offline greedy {text!r}"


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, param: str | None = None) -> str:
    """An OpenAI-shaped error; returns its message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])
