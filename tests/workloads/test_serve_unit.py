"""A unit of two ranks (`fireflyer serve --gpus-per-node 2 --expert-parallel 2`, gloo on CPU):
data-parallel attention with the routed experts split over the ranks. Served over HTTP it gives
exactly the greedy tokens of the single-process engine on the same checkpoint, its load window
counts every rank's routing, and a lost rank ends the requests in flight instead of hanging them."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.workloads.serve_servers import (
    Server,
    assert_matches,
    client,
    logs_on_failure,
    random_prompt,
    run_all,
)
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.serve_servers import reference as reference

TOP_K = 4  # the tiny preset's num_experts_per_tok
MOE_LAYERS = 2  # 3 layers, the first dense


def unit_flags(ranks: int = 2) -> list[str]:
    return (
        f"--dtype float32 --num-kv-blocks 128 --nnodes 1 --gpus-per-node {ranks}"
        f" --expert-parallel {ranks} --data-parallel {ranks} --dist-init-addr 127.0.0.1:{free_port()}"
    ).split()


@pytest.fixture(scope="module")
def unit(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("unit", checkpoint, tmp_path_factory.mktemp("unit-logs"), unit_flags())
    server.start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def rank_processes(server: Server) -> list[int]:
    """The pids of the node process's spawned ranks (local ranks 1..)."""
    assert server.proc is not None
    out = subprocess.run(
        ["pgrep", "-P", str(server.proc.pid), "-f", "spawn_main"], capture_output=True, text=True
    )
    return [int(pid) for pid in out.stdout.split()]


def test_two_rank_unit_gives_the_single_engine_greedy_tokens(unit: Server, reference: object) -> None:
    rng = random.Random(11)
    prompts = [random_prompt(rng, rng.randrange(3, 150)) for _ in range(32)]
    max_tokens = [rng.randrange(1, 24) for _ in prompts]
    streamed = [i % 2 == 0 for i in range(len(prompts))]
    expected = reference.texts(prompts, max_tokens)  # type: ignore[attr-defined]
    before = httpx.get(unit.url + "/v1/eplb/load", timeout=10).json()
    with logs_on_failure(unit):
        results = run_all(unit, prompts, max_tokens, streamed)
        assert_matches(results, expected, prompts, max_tokens)
        # Both ranks took requests: the leader spreads them by KV load.
        log = unit.log_path.read_text()
        assert "rank 1 of 2 ready (experts split)" in log
        after = httpx.get(unit.url + "/v1/eplb/load", timeout=10).json()
    # Every token the unit computed (prompts, then each generated token fed back but the last)
    # was routed to TOP_K experts in each MoE layer, on whichever rank it ran.
    computed = sum(
        len(p) + m - 1 - r.cached_tokens for p, m, r in zip(prompts, max_tokens, results, strict=True)
    )
    assert after["layers"] == MOE_LAYERS
    for layer in range(MOE_LAYERS):
        counted = sum(after["tokens"][layer]) - sum(before["tokens"][layer])
        assert counted == computed * TOP_K, (layer, counted, computed * TOP_K)
        # ... and each of those (token, expert) pairs was computed by exactly one rank's experts.
        per_rank = [a - b for a, b in zip(after["gpuTokens"][layer], before["gpuTokens"][layer], strict=True)]
        assert len(per_rank) == 2 and all(n > 0 for n in per_rank), per_rank
        assert sum(per_rank) == computed * TOP_K, (layer, per_rank)


def test_requests_spread_over_the_ranks(unit: Server) -> None:
    """Concurrent requests land on both ranks: each rank reports its own KV blocks in use."""
    rng = random.Random(5)

    async def burst() -> None:
        async with client(unit) as c:
            body = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
            jobs = [
                c.post("/v1/completions", json={**body, "prompt": random_prompt(rng, 200)}) for _ in range(6)
            ]
            for response in await asyncio.gather(*jobs):
                assert response.status_code == 200, response.text

    asyncio.run(burst())
    given = {
        line.split()[0]: float(line.split()[1])
        for line in httpx.get(unit.url + "/metrics", timeout=10).text.splitlines()
        if line.startswith("fireflyer_serve_rank_requests_total{")
    }
    assert given.get('fireflyer_serve_rank_requests_total{rank="0"}', 0) > 0, given
    assert given.get('fireflyer_serve_rank_requests_total{rank="1"}', 0) > 0, given


def test_a_lost_rank_ends_requests_in_flight_with_an_error(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = Server("unit-kill", checkpoint, tmp_path_factory.mktemp("unit-kill-logs"), unit_flags())
    server.start()
    try:
        server.wait_ready()
        (rank1,) = rank_processes(server)

        async def long_streams() -> list[tuple[int, str | None, float]]:
            async def one(c: httpx.AsyncClient, seed: int) -> tuple[int, str | None, float]:
                body = {
                    "prompt": random_prompt(random.Random(seed), 20),
                    "max_tokens": 3000,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                reason = None
                tokens = 0
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line.removeprefix("data: "))
                            for choice in event.get("choices", []):
                                tokens += 1
                                reason = choice["finish_reason"] or reason
                            if tokens == 5 and seed == 0:
                                subprocess.run(["kill", "-9", str(rank1)], check=True)
                return tokens, reason, time.monotonic()

            async with client(server) as c:
                return list(await asyncio.gather(*(one(c, seed) for seed in range(4))))

        started = time.monotonic()
        with logs_on_failure(server):
            results = asyncio.run(asyncio.wait_for(long_streams(), timeout=60))
            for tokens, reason, ended in results:
                assert reason == "abort", "a stream on a broken unit ends with an abort"
                assert tokens < 3000
                assert ended - started < 45, "ended promptly, not at a collective timeout"
            assert server.proc is not None
            assert server.proc.wait(timeout=30) == 1, "the unit exits non-zero, so that its pod restarts"
            assert "the engine failed" in server.log_tail()
    finally:
        server.stop()


def placement_table(seed: int, *, experts: int = 16, ranks: int = 2, redundant: int = 2) -> list[list[int]]:
    """One row per MoE layer: every expert once, in a shuffled order, plus `redundant` replicas."""
    rng = random.Random(seed)
    rows = []
    for _ in range(MOE_LAYERS):
        row = list(range(experts)) + rng.sample(range(experts), redundant)
        rng.shuffle(row)
        rows.append(row)
    assert all(len(row) % ranks == 0 for row in rows)
    return rows


def write_placement(directory: Path, generation: int, phy2log: list[list[int]], ranks: int = 2) -> None:
    body = {
        "generation": generation,
        "layers": MOE_LAYERS,
        "logicalExperts": 16,
        "gpus": ranks,
        "slotsPerGpu": len(phy2log[0]) // ranks,
        "phy2log": phy2log,
    }
    staged = directory / ".placement.json.tmp"
    staged.write_text(json.dumps(body))
    staged.rename(directory / "placement.json")  # whole, as kubelet swaps a ConfigMap volume


def test_a_placement_generation_applies_under_traffic(
    checkpoint: Path, reference: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    placement_dir = tmp_path_factory.mktemp("placement")
    flags = [*unit_flags(), "--placement-dir", str(placement_dir)]
    server = Server("unit-eplb", checkpoint, tmp_path_factory.mktemp("unit-eplb-logs"), flags)
    server.start()
    rng = random.Random(23)
    sent: list[tuple[list[int], int]] = []
    results = []

    def generation() -> tuple[int | None, str | None]:
        body = httpx.get(server.url + "/v1/eplb/load", timeout=10).json()
        return body["generation"], body.get("placementError")

    async def traffic_until_applied() -> None:
        async def wave() -> None:
            batch = [(random_prompt(rng, rng.randrange(3, 120)), rng.randrange(8, 30)) for _ in range(8)]
            sent.extend(batch)
            async with client(server) as c:
                from tests.workloads.serve_servers import complete

                results.extend(
                    await asyncio.gather(
                        *(complete(c, p, m, stream=i % 2 == 0) for i, (p, m) in enumerate(batch))
                    )
                )

        first = asyncio.create_task(wave())
        await asyncio.sleep(0.5)
        write_placement(placement_dir, 1, placement_table(1))
        await first
        deadline = time.monotonic() + 60
        while generation()[0] != 1:  # keep the unit busy until it has switched
            assert time.monotonic() < deadline, "the placement was never applied"
            await wave()
        await wave()  # and serve on the new placement

    try:
        server.wait_ready()
        with logs_on_failure(server):
            assert generation() == (None, None), "no placement mounted: the even split"
            asyncio.run(traffic_until_applied())
            prompts, max_tokens = [p for p, _ in sent], [m for _, m in sent]
            assert_matches(results, reference.texts(prompts, max_tokens), prompts, max_tokens)  # type: ignore[attr-defined]
            assert "expert placement generation 1 applied" in server.log_tail(200_000)

            # A placement that leaves an expert without a slot is refused; generation 1 stays.
            broken = placement_table(2)
            broken[1] = [e if e != 3 else 4 for e in broken[1]]
            write_placement(placement_dir, 2, broken)
            deadline = time.monotonic() + 30
            while generation()[1] is None:
                assert time.monotonic() < deadline, "the bad placement was never reported"
                time.sleep(0.5)
            current, error = generation()
            assert current == 1
            assert error is not None and "experts [3] have no slot" in error
    finally:
        server.stop()


def test_a_unit_whose_preflight_fails_never_serves(checkpoint: Path, tmp_path: Path) -> None:
    """Node 0 of a two-node unit whose other node never comes: the preflight names the missing
    rank, and the engine exits 3 instead of serving."""
    flags = "--dtype float32 --nnodes 2 --node-rank 0 --gpus-per-node 1 --expert-parallel 2 --data-parallel 2"
    flags += f" --dist-init-addr 127.0.0.1:{free_port()} --preflight --preflight-timeout 3"
    server = Server("unit-preflight", checkpoint, tmp_path, flags.split())
    server.start()
    try:
        assert server.proc is not None
        assert server.proc.wait(timeout=90) == 3
        log = server.log_tail()
        assert "preflight failed: rank 1 of 2 did not join within 3 s" in log, log
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_a_unit_with_preflight_serves_after_passing_it(
    checkpoint: Path, tmp_path: Path, reference: object
) -> None:
    server = Server("unit-preflight-ok", checkpoint, tmp_path, [*unit_flags(), "--preflight"])
    server.start()
    try:
        server.wait_ready()
        with logs_on_failure(server):
            assert "preflight passed" in server.log_tail(200_000)
            prompt = random_prompt(random.Random(1), 40)
            results = run_all(server, [prompt], [5], [False])
            assert_matches(results, reference.texts([prompt], [5]), [prompt], [5])  # type: ignore[attr-defined]
    finally:
        server.stop()
