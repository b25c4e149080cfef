"""Prefill/decode disaggregation over real processes: a prefill unit of two ranks (EP2), a decode
unit of two ranks (EP2) and the router in front. The router pairs them (x-fireflyer-prefill), the
decode unit has the prefill unit push each prompt's KV blocks over TCP and computes only the
tail, and every answer is the greedy answer of the single-process engine on the same checkpoint.
A prefill unit that cannot be reached costs time, not the request."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.workloads.serve_servers import (
    REPO,
    Server,
    _die_with_parent,
    assert_matches,
    logs_on_failure,
    metrics,
    random_prompt,
    run_all,
)
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.serve_servers import reference as reference

BLOCKS = "fireflyer_serve_kv_handoff_blocks_total"
FALLBACKS = "fireflyer_serve_kv_handoff_fallbacks_total"


def unit_flags(role: str) -> list[str]:
    flags = f"--role {role} --dtype float32 --num-kv-blocks 128 --nnodes 1 --gpus-per-node 2"
    flags += f" --expert-parallel 2 --data-parallel 2 --dist-init-addr 127.0.0.1:{free_port()}"
    if role == "decode":  # decode units dispatch in low-latency mode, as the operator renders them
        flags += f" --dispatch-mode lowLatency --kv-transfer tcp --kv-transfer-port {free_port()}"
    return flags.split()


@pytest.fixture(scope="module")
def units(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    logs = tmp_path_factory.mktemp("pd-logs")
    servers = {role: Server(role, checkpoint, logs, unit_flags(role)) for role in ("prefill", "decode")}
    for server in servers.values():
        server.start()
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@contextlib.contextmanager
def router(prefill: str, decode: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "fireflyer.cli", "router", "--prefill", prefill, "--decode", decode]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--health-interval", "0.5"]
    log_path = log_dir / "router.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(url + "/health", timeout=2, trust_env=False)
                if health.status_code == 200 and all(u["healthy"] for u in health.json().get("units", [])):
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class _Front(Server):
    """The router, driven with the same HTTP helpers as a unit."""

    def __init__(self, url: str) -> None:
        super().__init__("router", Path("."), Path("."), [])
        self.port = int(url.rsplit(":", 1)[1])


def test_prefill_and_decode_units_behind_the_router_give_the_single_engine_tokens(
    units: dict[str, Server], reference: object, tmp_path: Path
) -> None:
    rng = random.Random(3)
    # Long and short prompts: those of 65+ tokens hand blocks over, the others are computed whole.
    prompts = [
        random_prompt(rng, rng.choice([rng.randrange(3, 60), rng.randrange(65, 300)])) for _ in range(32)
    ]
    max_tokens = [rng.randrange(1, 20) for _ in prompts]
    streamed = [i % 2 == 1 for i in range(len(prompts))]
    expected = reference.texts(prompts, max_tokens)  # type: ignore[attr-defined]
    decode, prefill = units["decode"], units["prefill"]
    before = metrics(decode)
    with logs_on_failure(prefill, decode), router(prefill.url, decode.url, tmp_path) as url:
        results = run_all(_Front(url), prompts, max_tokens, streamed)
        assert_matches(results, expected, prompts, max_tokens)
    after = metrics(decode)
    handed = sum((len(p) - 1) // 64 for p in prompts)
    assert after[BLOCKS] - before[BLOCKS] == handed, "every full block before the last token came over"
    assert after[FALLBACKS] == before[FALLBACKS]
    # The decode unit computed only the tails: the handed-over blocks count as cached prompt tokens.
    for prompt, result in zip(prompts, results, strict=True):
        assert result.cached_tokens >= (len(prompt) - 1) // 64 * 64


def test_an_unreachable_prefill_unit_costs_time_not_the_request(
    units: dict[str, Server], reference: object
) -> None:
    decode = units["decode"]
    prompt = random_prompt(random.Random(8), 200)
    (expected,) = reference.texts([prompt], [6])  # type: ignore[attr-defined]
    before = metrics(decode)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    dead = f"http://127.0.0.1:{free_port()}"
    response = httpx.post(
        decode.url + "/v1/completions", json=body, headers={"x-fireflyer-prefill": dead}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected
    after = metrics(decode)
    assert after[FALLBACKS] == before[FALLBACKS] + 1
    assert after[BLOCKS] == before[BLOCKS]


def test_the_prefill_endpoint_refuses_a_bad_transfer(units: dict[str, Server]) -> None:
    prefill = units["prefill"]
    body = {"prompt_token_ids": [5] * 10, "transfer": {"host": "127.0.0.1"}, "blocks": 0}
    response = httpx.post(prefill.url + "/v1/kv/prefill", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "transfer"
    body = {
        "prompt_token_ids": [5] * 10,
        "transfer": {"host": "h", "port": 1, "transfer_id": "x"},
        "blocks": 3,
    }
    response = httpx.post(prefill.url + "/v1/kv/prefill", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "blocks"
