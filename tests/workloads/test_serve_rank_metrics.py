"""Per-rank step time and collective errors of a unit of several ranks: the histogram binning, which
transport a failed step is blamed on, the leader's wiring, and a real two-rank unit's /metrics."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fireflyer.workloads.serve.metrics import EngineMetrics
from fireflyer.workloads.serve.unit import leader as leader_module
from fireflyer.workloads.serve.unit.failures import Phase, collective_backend
from fireflyer.workloads.serve.unit.leader import UnitEngine
from fireflyer.workloads.serve.unit.protocol import RankReport
from tests.workloads.serve_servers import Server, logs_on_failure, random_prompt, run_all
from tests.workloads.serve_servers import checkpoint as checkpoint
from tests.workloads.test_serve_unit import unit_flags

RANK_STEP = "fireflyer_serve_rank_step_seconds"
ERRORS = "fireflyer_serve_collective_errors_total"


def _scrape(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_each_ranks_step_lands_in_its_own_buckets() -> None:
    metrics = EngineMetrics()
    metrics.set_unit_ranks(3)
    metrics.record_rank_steps([0.004, 0.03, None])  # rank 2 did not step
    metrics.record_rank_steps([0.2, None, 2.0])
    scraped = _scrape(metrics.render().decode())
    assert scraped[f'{RANK_STEP}_bucket{{le="0.005",rank="0"}}'] == 1
    assert scraped[f'{RANK_STEP}_bucket{{le="0.1",rank="0"}}'] == 1
    assert scraped[f'{RANK_STEP}_bucket{{le="0.25",rank="0"}}'] == 2
    assert scraped[f'{RANK_STEP}_bucket{{le="0.02",rank="1"}}'] == 0
    assert scraped[f'{RANK_STEP}_bucket{{le="0.03",rank="1"}}'] == 1  # a bound is in its bucket
    assert scraped[f'{RANK_STEP}_bucket{{le="1",rank="2"}}'] == 0
    assert scraped[f'{RANK_STEP}_bucket{{le="+Inf",rank="2"}}'] == 1
    assert [scraped[f'{RANK_STEP}_count{{rank="{r}"}}'] for r in range(3)] == [2, 1, 1]
    assert scraped[f'{RANK_STEP}_sum{{rank="0"}}'] == pytest.approx(0.204)


def test_a_single_rank_engine_has_no_per_rank_series() -> None:
    metrics = EngineMetrics()
    metrics.record_rank_steps([0.01])
    metrics.record_collective_error("nccl")
    text = metrics.render().decode()
    assert RANK_STEP not in text and ERRORS not in text


def test_every_backend_is_exported_from_zero() -> None:
    metrics = EngineMetrics()
    metrics.set_unit_ranks(2)
    metrics.record_collective_error("nvshmem")
    scraped = _scrape(metrics.render().decode())
    assert {b: scraped[f'{ERRORS}{{backend="{b}"}}'] for b in ("nccl", "gloo", "nvshmem", "other")} == {
        "nccl": 0,
        "gloo": 0,
        "nvshmem": 1,
        "other": 0,
    }


def test_a_failed_step_is_blamed_on_the_transport_it_broke_in() -> None:
    step = Phase.STEP
    assert collective_backend(RuntimeError("Connection closed by peer"), Phase.CONTROL) == "gloo"
    assert collective_backend(RuntimeError("NCCL error in: unhandled system error"), step) == "nccl"
    assert collective_backend(RuntimeError("DeepEP: nvshmem barrier timed out"), step) == "nvshmem"
    assert collective_backend(RuntimeError("[../gloo/transport] Timed out"), step) == "gloo"
    assert collective_backend(RuntimeError("store timeout"), step, distributed_error=True) == "other"
    assert collective_backend(RuntimeError("CUDA out of memory"), step) is None  # the model, not a transport
    assert collective_backend(RuntimeError("rank 1 of the unit failed"), Phase.REPORTS) is None
    assert collective_backend(KeyboardInterrupt(), Phase.CONTROL) is None


def _unit(step: Any) -> UnitEngine:
    """A leader of two ranks over a stand-in rank 0 (no model, no process group)."""
    engine = SimpleNamespace(
        config=None, max_model_len=64, eplb_load=None, block_manager=SimpleNamespace(num_blocks=8)
    )
    rank0 = SimpleNamespace(
        engine=engine,
        gpu_entries=lambda: None,
        step=step,
        report=lambda events, preempted, with_load=True: RankReport(rank=0, step_seconds=0.01),
    )
    return UnitEngine(rank0, control_group=None, world=2)  # type: ignore[arg-type]


def test_the_leader_reports_the_backend_of_a_failed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    blamed: list[str] = []

    def lost_peer(*_: Any, **__: Any) -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(leader_module.dist, "broadcast_object_list", lost_peer)
    unit = _unit(step=lambda command: ([], 0))
    unit.on_collective_error = blamed.append
    with pytest.raises(RuntimeError):
        unit.step()
    assert blamed == ["gloo"] and unit.broken

    def nccl_failure(command: Any) -> Any:
        raise RuntimeError("NCCL error: remote process exited")

    monkeypatch.setattr(leader_module.dist, "broadcast_object_list", lambda *a, **k: None)
    unit = _unit(step=nccl_failure)
    unit.on_collective_error = blamed.append
    with pytest.raises(RuntimeError):
        unit.step()
    assert blamed == ["gloo", "nccl"]


def test_the_leader_keeps_every_ranks_step_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def gather(mine: RankReport, into: list[Any], **_: Any) -> None:
        into[:] = [mine, RankReport(rank=1, step_seconds=0.05)]

    monkeypatch.setattr(leader_module.dist, "broadcast_object_list", lambda *a, **k: None)
    monkeypatch.setattr(leader_module.dist, "gather_object", gather)
    unit = _unit(step=lambda command: ([], 0))
    unit.step()
    assert unit.step_seconds() == [0.01, 0.05]


@pytest.fixture(scope="module")
def unit(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server("unit-steps", checkpoint, tmp_path_factory.mktemp("unit-steps-logs"), unit_flags())
    server.start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_a_two_rank_unit_exports_each_ranks_step_time(unit: Server) -> None:
    import httpx

    rng = random.Random(8)
    prompts = [random_prompt(rng, rng.randrange(10, 80)) for _ in range(6)]
    with logs_on_failure(unit):
        run_all(unit, prompts, [8] * len(prompts), [False] * len(prompts))
        scraped = _scrape(httpx.get(unit.url + "/metrics", timeout=10).text)
    steps = scraped["fireflyer_serve_step_seconds_count"]
    # Every unit step observes both ranks: each one's model step, within the unit's step.
    assert steps > 0
    for rank in (0, 1):
        assert scraped[f'{RANK_STEP}_count{{rank="{rank}"}}'] == steps
        assert 0 < scraped[f'{RANK_STEP}_sum{{rank="{rank}"}}'] <= scraped["fireflyer_serve_step_seconds_sum"]
    assert scraped[f'{ERRORS}{{backend="gloo"}}'] == 0
