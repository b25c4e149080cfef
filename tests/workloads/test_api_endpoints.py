"""The OpenAI API's /v1/models, /health and /metrics against a scripted engine
(tests/workloads/api_engine.py), and the metrics themselves."""

from __future__ import annotations

import httpx
import pytest

from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.types import FinishReason
from tests.workloads.api_engine import MAX_MODEL_LEN, MODEL, FakeEngine, assert_error
from tests.workloads.api_engine import anyio_backend as anyio_backend
from tests.workloads.api_engine import client as client
from tests.workloads.api_engine import engine as engine
from tests.workloads.api_engine import tokenizer as tokenizer

pytestmark = pytest.mark.anyio


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
