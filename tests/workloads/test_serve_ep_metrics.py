"""The engine's per-rank expert-parallel metrics: tokens per (MoE layer, rank) and the live
per-GPU balancedness, from the pure functions up to a real two-rank unit's /metrics."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fireflyer.workloads.serve.metrics import EngineMetrics, gpu_balancedness, tokens_since
from tests.workloads.serve_servers import Server, logs_on_failure, random_prompt, run_all
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.test_serve_unit import MOE_LAYERS, unit_flags

EP_TOKENS = "fireflyer_serve_ep_tokens_total"
EP_RANK_TOKENS = "fireflyer_serve_ep_rank_tokens_total"
GPU_BALANCEDNESS = "fireflyer_serve_eplb_gpu_balancedness"


def _scrape(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_gpu_balancedness_is_mean_over_layers_of_mean_over_max_per_rank() -> None:
    assert gpu_balancedness([[10, 10], [30, 10]]) == pytest.approx((1.0 + 20 / 30) / 2)
    assert gpu_balancedness([[0, 0], [5, 0]]) == pytest.approx((1.0 + 0.5) / 2)  # an idle layer counts 1
    assert gpu_balancedness([[0, 0], [0, 0]]) is None  # nothing measured


def test_tokens_since_takes_differences_and_restarts_with_a_counter_that_went_back() -> None:
    assert tokens_since(None, [[3, 4]]) == [[3, 4]]
    assert tokens_since([[3, 4]], [[5, 4]]) == [[2, 0]]
    assert tokens_since([[9, 4]], [[2, 6]]) == [[2, 2]]  # rank 0 restarted counting


def test_a_unit_exports_tokens_per_layer_and_rank_and_the_balancedness_of_each_bucket() -> None:
    metrics = EngineMetrics(ep_layers=True)
    tokens = [[0, 0], [0, 0]]
    metrics.set_gpu_tokens_source(lambda: tokens)
    metrics.record_gpu_tokens(tokens)
    tokens = [[30, 10], [20, 20]]
    metrics.record_gpu_tokens(tokens)
    scraped = _scrape(metrics.render().decode())
    assert scraped[f'{EP_TOKENS}{{moe_layer="0",rank="0"}}'] == 30
    assert scraped[f'{EP_TOKENS}{{moe_layer="1",rank="1"}}'] == 20
    assert scraped[f'{EP_RANK_TOKENS}{{rank="0"}}'] == 50 and scraped[f'{EP_RANK_TOKENS}{{rank="1"}}'] == 30
    assert scraped[GPU_BALANCEDNESS] == pytest.approx((20 / 30 + 1.0) / 2)
    metrics.record_gpu_tokens(tokens)  # a bucket without tokens keeps the last figure
    assert _scrape(metrics.render().decode())[GPU_BALANCEDNESS] == pytest.approx((20 / 30 + 1.0) / 2)
    tokens = [[40, 20], [30, 30]]  # since the last bucket: [[10, 10], [10, 10]]
    metrics.record_gpu_tokens(tokens)
    assert _scrape(metrics.render().decode())[GPU_BALANCEDNESS] == 1.0


def test_without_ep_metrics_a_unit_exports_tokens_per_rank_only() -> None:
    metrics = EngineMetrics()
    metrics.set_gpu_tokens_source(lambda: [[30, 10], [20, 20]])
    scraped = _scrape(metrics.render().decode())
    assert scraped[f'{EP_RANK_TOKENS}{{rank="0"}}'] == 50
    assert not [name for name in scraped if name.startswith(EP_TOKENS)]


def test_an_engine_without_split_experts_has_no_per_rank_series() -> None:
    metrics = EngineMetrics()
    metrics.record_gpu_tokens([[1, 2]])  # never given a source: nothing to export
    text = metrics.render().decode()
    assert "fireflyer_serve_ep_" not in text and GPU_BALANCEDNESS not in text
    metrics.record_step(0.02)
    assert _scrape(text := metrics.render().decode())["fireflyer_serve_step_seconds_count"] == 1, text


@pytest.fixture(scope="module")
def unit(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A 1-s load window makes its buckets 1 s long: the per-GPU gauge is set within the test.
    flags = [*unit_flags(), "--eplb-window-seconds", "1", "--ep-metrics"]
    server = Server("unit-ep", checkpoint, tmp_path_factory.mktemp("unit-ep-logs"), flags)
    server.start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_two_rank_unit_scrapes_what_its_ranks_computed(unit: Server) -> None:
    rng = random.Random(3)
    prompts = [random_prompt(rng, rng.randrange(20, 120)) for _ in range(8)]
    with logs_on_failure(unit):
        run_all(unit, prompts, [16] * len(prompts), [False] * len(prompts))
        time.sleep(1.5)  # a bucket closes at the next step or idle tick after 1 s
        run_all(unit, prompts[:2], [4, 4], [False, False])
        load = httpx.get(unit.url + "/v1/eplb/load", timeout=10).json()
        scraped = _scrape(httpx.get(unit.url + "/metrics", timeout=10).text)
    for layer in range(MOE_LAYERS):
        for rank in range(2):
            series = f'{EP_TOKENS}{{moe_layer="{layer}",rank="{rank}"}}'
            assert scraped[series] == load["gpuTokens"][layer][rank] > 0, (series, load["gpuTokens"])
    for rank in range(2):
        total = sum(load["gpuTokens"][layer][rank] for layer in range(MOE_LAYERS))
        assert scraped[f'{EP_RANK_TOKENS}{{rank="{rank}"}}'] == total
    assert 0 < scraped[GPU_BALANCEDNESS] <= 1
    assert scraped["fireflyer_serve_step_seconds_count"] > 0
