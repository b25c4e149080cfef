"""The autoscaler's memory lives in status.<role>.autoscaler: an operator restart in the middle of
a stabilisation window decides as if it had not happened, and the kept history stays small."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from fireflyer.api.inference import Autoscaling
from fireflyer.operator import events, kube
from fireflyer.operator.inference import autoscale, scaler, scaling
from fireflyer.operator.inference.autoscale import MetricSample, Recommendation, compact, decide
from tests.unit.test_inference_plan import NOW, _cr

SPEC = Autoscaling.model_validate(
    {
        "metric": "kvBlockUsage",
        "target": 1.0,
        "minUnits": 1,
        "maxUnits": 10,
        "scaleDownStabilizationSeconds": 300,
        "scaleUpStabilizationSeconds": 60,
        "intervalSeconds": 30,
    }
)
# Load per pass: high, then low for a while (the scale-down window holds the units up).
READINGS = [1.5, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]


def _run(monkeypatch: pytest.MonkeyPatch, restart_at: int | None, keep_status: bool = True) -> list[int]:
    """The autoscaler's passes over READINGS, every 30 s; → the units decided at each. At
    `restart_at` the process's memory is lost (and, without keep_status, the status too)."""
    cr = _cr()
    live = scaler.scaler_object(cr, "decode", 2)
    monkeypatch.setattr(kube, "get", lambda kind, name, namespace=None: live)
    monkeypatch.setattr(kube, "patch", lambda kind, name, namespace, body: live["spec"].update(body["spec"]))
    monkeypatch.setattr(events, "post", lambda *args: None)
    monkeypatch.setattr(scaling, "_history", {})
    monkeypatch.setattr(scaling, "_last_sample", {})
    readings = iter(READINGS)
    monkeypatch.setattr(scaling, "read_metric", lambda cr, role, metric, units: next(readings))
    decided = []
    for step in range(len(READINGS)):
        if step == restart_at:
            scaling._history.clear()
            scaling._last_sample.clear()
            if not keep_status:
                cr["status"] = {}
        fields = scaling.autoscale_role(cr, "decode", SPEC, NOW + timedelta(seconds=30 * step))
        assert fields is not None
        cr.setdefault("status", {}).setdefault("decode", {})["autoscaler"] = fields
        decided.append(fields["desiredUnits"])
    return decided


def test_a_restart_mid_window_decides_as_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    without = _run(monkeypatch, restart_at=None)
    assert without[0] == 3 and without[-1] == 2 and without[-3] == 3  # up, held a window, then down
    for step in (3, 6, 9):
        assert _run(monkeypatch, restart_at=step) == without
    # Had the memory been the process's alone, the restart would have forgotten the window.
    assert _run(monkeypatch, restart_at=6, keep_status=False) != without


def test_status_holds_history_sample_and_last_run(monkeypatch: pytest.MonkeyPatch) -> None:
    cr = _cr()
    live = scaler.scaler_object(cr, "decode", 2)
    monkeypatch.setattr(kube, "get", lambda kind, name, namespace=None: live)
    monkeypatch.setattr(kube, "patch", lambda *args: None)
    monkeypatch.setattr(events, "post", lambda *args: None)
    monkeypatch.setattr(scaling, "_history", {})
    monkeypatch.setattr(scaling, "_last_sample", {})
    monkeypatch.setattr(scaling, "read_metric", lambda cr, role, metric, units: 1.5)
    fields = scaling.autoscale_role(cr, "decode", SPEC, NOW)
    assert fields is not None
    assert fields["history"] == [{"time": "2026-12-01T12:00:00Z", "units": 3}]
    assert fields["lastSample"] == {"time": "2026-12-01T12:00:00Z", "value": 1.5}
    assert fields["lastRunTime"] == "2026-12-01T12:00:00Z"
    # A restarted operator waits out the interval from the recorded run, not from its start.
    assert not scaling._due(("ns", "x", "decode"), 30, fields, NOW + timedelta(seconds=10))
    assert scaling._due(("ns", "x", "decode"), 30, fields, NOW + timedelta(seconds=30))


def test_compact_history_decides_the_same_and_stays_bounded() -> None:
    rng = random.Random(7)
    for _ in range(200):
        history = [
            Recommendation(NOW - timedelta(seconds=s), rng.randint(0, 10))
            for s in sorted(rng.sample(range(0, 900, 5), rng.randint(1, 60)), reverse=True)
        ]
        kept = compact(history, NOW, SPEC)
        assert len(kept) <= autoscale.HISTORY_LIMIT
        for current in range(0, 11):
            for value in (0.0, 0.3, 1.0, 2.5):
                sample = [MetricSample(NOW, value)]
                later = NOW + timedelta(seconds=rng.randint(0, 120))
                assert decide(later, current, sample, SPEC, kept) == decide(
                    later, current, sample, SPEC, history
                )


def test_compact_keeps_only_what_a_window_can_need() -> None:
    at = [NOW - timedelta(seconds=s) for s in (400, 200, 150, 100, 50, 0)]
    history = [Recommendation(t, u) for t, u in zip(at, [5, 4, 6, 2, 3, 3], strict=True)]
    assert [r.units for r in compact(history, NOW, SPEC)] == [5, 6, 2, 3]
