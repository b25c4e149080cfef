"""The scale benchmark in a reduced form (bench/operator/bench_scale.py): one operator, a
512-node fabric, the DeepSeek-V3 sample plus 20 small deployments applied at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TEST_PORT_BASE

pytestmark = pytest.mark.integration

NODES = 512
DEPLOYMENTS = 20
RSS_LIMIT_MB = 500


def test_every_deployment_gets_ready_without_recreations_or_handler_failures(tmp_path: Path) -> None:
    from bench.operator.bench_scale import run_scale

    result = run_scale(NODES, DEPLOYMENTS, TEST_PORT_BASE + 1500, hold=5, timeout=180, state_dir=tmp_path)

    print(result)
    assert result["ready"] == DEPLOYMENTS + 1, result
    assert result["all_ready_s"] is not None and result["all_ready_s"] <= 120, result
    assert result["units_recreated"] == 0, result
    assert result["handler_exceptions"] == 0, result
    assert result["rss_peak_mb"] <= RSS_LIMIT_MB, result
    assert result["sigterm_to_exit_s"] is not None and result["sigterm_to_exit_s"] <= 10, result
