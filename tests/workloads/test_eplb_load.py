"""The engine's expert load window and GET /v1/eplb/load (docs/eplb.md, "The load contract"):
the counts are the routing the model did (checked against the gates' own choices, seen through
forward hooks, and against tokens × top-k), buckets leave the window on time, padding rows of a
CUDA graph batch do not count, and the endpoint keeps the contract."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.model.moe import MoE
from fireflyer.workloads.serve.api import create_app
from fireflyer.workloads.serve.async_engine import AsyncEngine
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.eplb_load import LoadWindow, balancedness
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import SamplingParams
from tests.workloads.moe_config import CONFIG


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("eplb") / "tiny", preset="tiny", seed=5)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> DeepseekV3:
    return load_model(checkpoint, dtype=torch.float32)


def _moes(model: DeepseekV3) -> list[MoE]:
    return [block.mlp for block in model.blocks if isinstance(block.mlp, MoE)]


class GateCounts:
    """An independent count: every routing decision of every MoE gate, seen by a forward hook."""

    def __init__(self, model: DeepseekV3) -> None:
        moes = _moes(model)
        self.table = np.zeros((len(moes), model.config.n_routed_experts), dtype=np.int64)
        self.ids: list[list[torch.Tensor]] = [[] for _ in moes]
        self._handles = [moe.gate.register_forward_hook(self._hook(layer)) for layer, moe in enumerate(moes)]

    def _hook(self, layer: int) -> Any:
        def hook(_: torch.nn.Module, __: Any, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            ids = out[1].detach().cpu()
            self.ids[layer].append(ids)
            np.add.at(self.table[layer], ids.reshape(-1).numpy(), 1)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def gate_counts(model: DeepseekV3) -> Iterator[GateCounts]:
    counts = GateCounts(model)
    try:
        yield counts
    finally:
        counts.close()


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]


def _tokens_computed(prompts: list[list[int]], max_tokens: list[int]) -> int:
    """Every prompt token once, then one decode token per generated token but the last."""
    return sum(len(p) + m - 1 for p, m in zip(prompts, max_tokens, strict=True))


# -- the engine --------------------------------------------------------------------------------


def test_the_window_counts_the_routing_the_model_did(model: DeepseekV3, gate_counts: GateCounts) -> None:
    # Chunked prefill (a 64-token step budget) mixed with decode steps, several sequences at once.
    engine = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64, max_num_batched_tokens=64))
    window = engine.eplb_load
    assert window is not None and (window.layers, window.experts) == (2, 16)
    engine.warmup()  # not load: the window forgets it
    assert window.window().sum() == 0
    gate_counts.table[:] = 0
    prompts = _prompts([5, 70, 130, 9], seed=1)
    max_tokens = [7, 3, 5, 11]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
    seqs = engine.generate(prompts, params)
    assert [len(s.output_ids) for s in seqs] == max_tokens
    assert engine.block_manager.hit_tokens == 0 and engine.scheduler.num_preemptions == 0

    table = window.window()  # the engine went idle after its last step: published at once
    assert table.dtype == np.int64 and table.shape == (2, 16) and (table >= 0).all()
    top_k = model.config.num_experts_per_tok
    assert table.sum(axis=1).tolist() == [_tokens_computed(prompts, max_tokens) * top_k] * 2
    np.testing.assert_array_equal(table, gate_counts.table)
    assert window.report()["tokens"] == gate_counts.table.tolist()
    assert 0 < window.balancedness() <= 1
    engine.close()
    assert all(moe.load is None for moe in _moes(model))  # a closed engine counts no more


def test_padding_rows_do_not_count(model: DeepseekV3, gate_counts: GateCounts) -> None:
    """What a CUDA graph replay does (runner.DecodeGraphs): a batch padded from 3 rows to 4,
    `load_mask` 1 for the batch's rows and 0 for padding, counting into the same counters."""
    window = LoadWindow.for_model(model)
    assert window is not None
    counters = window.counters.data_ptr()
    moe = _moes(model)[0]
    count_rows = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])  # DecodeGraphs.count_rows, max batch 8
    x = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    moe.load_mask = count_rows
    try:
        with torch.inference_mode():
            moe(x)
    finally:
        moe.load_mask = None
    window.tick(flush=True)
    (ids,) = gate_counts.ids[0]
    assert ids.shape == (4, model.config.num_experts_per_tok)
    expected = np.bincount(ids[:3].reshape(-1).numpy(), minlength=16)
    np.testing.assert_array_equal(window.window()[0], expected)
    window.reset()
    assert window.counters.data_ptr() == counters  # never reallocated: captured graphs keep counting
    window.detach()


# -- the window over time ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_buckets_leave_the_window() -> None:
    clock = Clock()
    layers = [SimpleNamespace(load=None), SimpleNamespace(load=None)]
    window = LoadWindow(layers, 4, "cpu", window_seconds=30, bucket_seconds=10, clock=clock)  # type: ignore[arg-type]
    closed: list[float] = []
    window.on_bucket = lambda w: closed.append(clock.now)

    def route(layer: int, expert: int, tokens: int, at: float) -> None:
        clock.now = 1000.0 + at
        layers[layer].load[expert] += tokens  # what MoE.forward's scatter_add_ does
        assert not window.tick()

    route(0, 0, 1, at=0.5)
    assert window.window().sum() == 0  # not published yet: less than publish_seconds passed
    assert not window.tick(flush=True)
    assert window.window()[0].tolist() == [1, 0, 0, 0]  # the live counts since the last bucket
    route(1, 2, 5, at=1.7)
    assert window.window()[1].tolist() == [0, 0, 5, 0]  # a second passed: published

    clock.now = 1010.0
    layers[0].load[0] += 2
    assert window.tick()  # bucket [1000, 1010): 3 + 5
    clock.now = 1020.0
    layers[0].load[1] += 4
    assert window.tick()  # bucket [1010, 1020): 4
    assert window.window()[0].tolist() == [3, 4, 0, 0]
    assert window.window(5)[0].tolist() == [0, 4, 0, 0]  # only the bucket that ended at 1020
    assert window.window(10.5)[0].tolist() == [3, 4, 0, 0]  # any overlap takes the whole bucket

    clock.now = 1035.0
    layers[0].load[3] += 8
    assert window.tick()  # bucket [1020, 1035): 8
    assert window.window()[0].tolist() == [3, 4, 0, 8]  # the bucket that ended at 1010 overlaps
    clock.now = 1041.0
    assert not window.tick(stepped=False)
    assert window.window()[0].tolist() == [0, 4, 0, 8]  # ended at 1010: 31 s ago, out
    assert window.window().sum(axis=0).tolist() == [0, 4, 0, 8]
    clock.now = 1046.0
    assert window.tick(stepped=False)  # an idle engine still closes its buckets on time
    assert len(window._buckets) == 3  # 1020, 1035, 1046: the ring holds the window only
    assert closed == [1010.0, 1020.0, 1035.0, 1046.0]
    clock.now = 1080.0
    assert window.window().sum() == 0

    report = window.report(20)
    assert report == {"layers": 2, "experts": 4, "windowSeconds": 20, "tokens": [[0] * 4] * 2}
    assert window.report()["windowSeconds"] == 30
    for bad in (0, -1, 31, float("nan")):
        with pytest.raises(ValueError, match="windowSeconds"):
            window.window(bad)
    with pytest.raises(ValueError, match="window_seconds"):
        LoadWindow(layers, 4, "cpu", window_seconds=0)  # type: ignore[arg-type]


def test_balancedness_is_mean_over_layers_of_mean_over_max() -> None:
    assert balancedness([[1, 1, 1, 1], [4, 0, 0, 0]]) == pytest.approx((1.0 + 0.25) / 2)
    assert balancedness([[0, 0], [2, 2]]) == 1.0  # an idle layer counts 1


# -- the API -----------------------------------------------------------------------------------


def test_get_eplb_load_serves_the_contract(
    model: DeepseekV3, checkpoint: Path, gate_counts: GateCounts
) -> None:
    metrics = EngineMetrics()
    engine = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64, eplb_window_seconds=120))
    served = AsyncEngine(engine, ServeTokenizer.from_pretrained(checkpoint), "tiny", metrics)
    prompts = _prompts([12, 40, 3], seed=2)
    max_tokens = [6, 4, 9]

    async def scenario() -> dict[str, httpx.Response]:
        served.start()
        transport = httpx.ASGITransport(app=create_app(served))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            bodies = [
                {"prompt": p, "max_tokens": m, "temperature": 0, "ignore_eos": True}
                for p, m in zip(prompts, max_tokens, strict=True)
            ]
            done = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in done), [r.text for r in done]
            urls = ["", "?windowSeconds=60", "?windowSeconds=0", "?windowSeconds=121", "?windowSeconds=x"]
            answers = {url: await c.get("/v1/eplb/load" + url) for url in urls}
            answers["metrics"] = await c.get("/metrics")
            return answers

    try:
        answers = asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        served.shutdown()
    r = answers[""]
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"layers", "experts", "windowSeconds", "tokens", "generation"}
    assert body["generation"] is None, "a one-rank unit runs no placement"
    assert (body["layers"], body["experts"], body["windowSeconds"]) == (2, 16, 120)
    tokens = body["tokens"]
    assert len(tokens) == 2 and all(len(row) == 16 for row in tokens)
    assert all(isinstance(t, int) and t >= 0 for row in tokens for t in row)
    top_k = model.config.num_experts_per_tok
    assert [sum(row) for row in tokens] == [_tokens_computed(prompts, max_tokens) * top_k] * 2
    assert tokens == gate_counts.table.tolist()
    shorter = answers["?windowSeconds=60"].json()
    assert shorter["windowSeconds"] == 60 and shorter["tokens"] == tokens
    for url in ("?windowSeconds=0", "?windowSeconds=121", "?windowSeconds=x"):
        error = answers[url]
        assert error.status_code == 400, error.text
        assert error.json()["error"]["param"] == "windowSeconds"
    (gauge,) = [x for x in answers["metrics"].text.splitlines() if x.startswith("fireflyer_serve_eplb_bal")]
    assert 0 < float(gauge.split()[1]) <= 1  # 1.0 (an empty window) until the first bucket closes


def test_a_dense_model_has_no_load_window() -> None:
    dense = DeepseekV3(
        dataclasses.replace(CONFIG, first_k_dense_replace=CONFIG.num_hidden_layers), device="meta"
    )
    assert LoadWindow.for_model(dense) is None

    class DenseEngine:  # what the API reads of the engine of a model without MoE layers
        eplb_window = None

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(DenseEngine()))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/v1/eplb/load")

    r = asyncio.run(get())
    assert r.status_code == 404
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "no_moe_layers" and error["type"] == "invalid_request_error"
