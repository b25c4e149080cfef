"""The engine core on the tiny checkpoint: sampling rules, seeded reproducibility across batches,
warm-up leaving no trace, and what clients see when the model fails mid-serving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.serve.async_engine import AsyncEngine
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.sampling import sample
from fireflyer.workloads.serve.tokenizer import ServeTokenizer
from fireflyer.workloads.serve.types import EngineStoppedError, FinishReason, SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> DeepseekV3:
    return load_model(checkpoint)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(5, 1000, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_top_k_and_top_p_only_draw_from_the_kept_tokens() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    top_k = {sample(logits, [SamplingParams(temperature=1.0, top_k=2)], [g])[0] for _ in range(200)}
    assert top_k == {0, 1}
    # softmax: 0.66, 0.24, 0.09, …: a top_p of 0.8 keeps the first two
    top_p = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)], [g])[0] for _ in range(200)}
    assert top_p == {0, 1}
    assert sample(logits, [SamplingParams(temperature=0)], [None]) == [0]
    # a temperature too small to divide by is greedy, not an overflow
    assert sample(logits, [SamplingParams(temperature=1e-39)], [g]) == [0]


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(model: DeepseekV3) -> None:
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0]
    alone = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64)).generate([prompt], seeded)[0]
    others = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64)).generate(
        [*_prompts(5, seed=6), prompt], [others] * 5 + [seeded]
    )
    assert batch[-1].output_ids == alone.output_ids
    other_seed = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64)).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
    )[0]
    assert other_seed.output_ids != alone.output_ids


def test_warmup_changes_no_output_and_keys_no_block(model: DeepseekV3) -> None:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = _prompts(4, seed=8)
    cold = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64, max_num_batched_tokens=128))
    expected = [s.output_ids for s in cold.generate(prompts, params)]
    warm = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64, max_num_batched_tokens=128))
    warm.warmup()
    assert warm.block_manager.num_cached_blocks == 0
    assert [s.output_ids for s in warm.generate(prompts, params)] == expected


def test_a_failing_model_ends_every_stream_and_reports_unhealthy(model: DeepseekV3, checkpoint: Path) -> None:
    engine = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64))
    calls = 0
    real_step = engine.runner.step

    def failing_step(output):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("device lost")
        return real_step(output)

    engine.runner.step = failing_step  # type: ignore[method-assign]
    stopped: list[bool] = []
    served = AsyncEngine(
        engine,
        ServeTokenizer.from_pretrained(checkpoint),
        "tiny",
        EngineMetrics(),
        on_failure=lambda: stopped.append(True),
    )

    async def scenario() -> tuple[list[FinishReason | None], int]:
        served.start()
        stream = served.submit(_prompts(1)[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        reasons = [event.finish_reason async for event in stream]
        tokens = sum(1 for r in reasons if r is None)
        return reasons, tokens

    try:
        reasons, tokens = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert reasons[-1] == FinishReason.ABORT
        assert tokens < 50
        assert not served.is_healthy()
        assert stopped == [True]  # the server is told to exit, so that the pod restarts

        async def submit_again() -> None:
            served.submit([5, 6, 7], SamplingParams(max_tokens=2))

        with pytest.raises(EngineStoppedError):
            asyncio.run(submit_again())
    finally:
        served.shutdown()


def test_a_request_stopped_by_a_stop_string_counts_as_stop(model: DeepseekV3, checkpoint: Path) -> None:
    metrics = EngineMetrics()
    engine = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64))
    served = AsyncEngine(engine, ServeTokenizer.from_pretrained(checkpoint), "tiny", metrics)

    async def scenario() -> list[FinishReason | None]:
        served.start()
        stream = served.submit(_prompts(1)[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        reasons = []
        async for event in stream:
            reasons.append(event.finish_reason)
            if len(reasons) == 2:
                stream.abort(FinishReason.STOP)  # what the API does when the text hits a stop string
        return reasons

    try:
        reasons = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        served.shutdown()
    assert reasons[-1] == FinishReason.ABORT and len(reasons) < 200  # the engine stopped generating
    text = metrics.render().decode()
    assert 'fireflyer_serve_requests_total{finish_reason="stop"} 1.0' in text
    assert 'fireflyer_serve_requests_total{finish_reason="abort"} 0.0' in text
