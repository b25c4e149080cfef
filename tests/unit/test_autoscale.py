"""The built-in autoscaler's decision function, rule by rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from fireflyer.api.inference import Autoscaling
from fireflyer.operator.inference.autoscale import (
    MetricSample,
    Recommendation,
    bounds,
    decide,
    prune,
    window_open,
)
from fireflyer.operator.inference.autoscale_metrics import mean_over_units, queue_time, samples

# A Wednesday, 12:00 UTC.
NOON = datetime(2026, 1, 7, 12, 0, tzinfo=UTC)


def auto(**overrides: Any) -> Autoscaling:
    fields: dict[str, Any] = {
        "metric": "queueTime",
        "target": 1.0,
        "minUnits": 1,
        "maxUnits": 10,
        "scaleDownStabilizationSeconds": 0,
    }
    fields.update(overrides)
    return Autoscaling.model_validate(fields)


def at(value: float, when: datetime = NOON) -> list[MetricSample]:
    return [MetricSample(when, value)]


def test_target_ratio_rounds_up_to_whole_units() -> None:
    # 3 units × 1.5 / 1.0 = 4.5 → 5 units; 4 × 2.5 = 10 exactly stays 10.
    assert decide(NOON, 3, at(1.5), auto(), []).units == 5
    assert decide(NOON, 4, at(2.5), auto(maxUnits=20), []).units == 10
    # Float noise does not add a unit: 3 × (1.2 / 1.2) within tolerance, 3 × 0.3/0.1 = 9.
    assert decide(NOON, 3, at(0.3), auto(target=0.1), []).units == 9


def test_scale_down_follows_ratio() -> None:
    decision = decide(NOON, 8, at(0.25), auto(), [])
    assert decision.units == 2
    assert "8 → 2 units" in decision.reason
    assert decision.metric_value == 0.25


def test_within_tolerance_holds() -> None:
    decision = decide(NOON, 4, at(1.08), auto(tolerance=0.1), [])
    assert decision.units == 4
    assert "within tolerance" in decision.reason


def test_clamped_to_max_and_min() -> None:
    high = decide(NOON, 4, at(10.0), auto(maxUnits=6), [])
    assert high.units == 6
    assert "maxUnits 6" in high.reason
    low = decide(NOON, 4, at(0.01), auto(minUnits=2), [])
    assert low.units == 2
    assert "minUnits 2" in low.reason


def test_missing_metric_holds() -> None:
    decision = decide(NOON, 3, [], auto(), [])
    assert decision.units == 3
    assert "no fresh queueTime value" in decision.reason


def test_stale_metric_holds() -> None:
    old = at(5.0, NOON - timedelta(seconds=3 * 30 + 1))
    assert decide(NOON, 3, old, auto(intervalSeconds=30), []).units == 3
    # Still fresh within three intervals.
    recent = at(2.0, NOON - timedelta(seconds=60))
    assert decide(NOON, 3, recent, auto(intervalSeconds=30), []).units == 6


def test_missing_metric_still_respects_bounds() -> None:
    assert decide(NOON, 12, [], auto(maxUnits=10), []).units == 10


def test_scale_down_stabilisation_holds_at_highest_recent_recommendation() -> None:
    spec = auto(scaleDownStabilizationSeconds=300)
    history = [
        Recommendation(NOON - timedelta(seconds=400), 8),  # before the window: shows it is covered
        Recommendation(NOON - timedelta(seconds=200), 6),
        Recommendation(NOON - timedelta(seconds=100), 5),
    ]
    decision = decide(NOON, 8, at(0.25), spec, history)
    assert decision.units == 6
    assert "stabilisation" in decision.reason
    assert decision.recommendation == 2


def test_scale_down_after_window_of_low_recommendations() -> None:
    spec = auto(scaleDownStabilizationSeconds=300)
    history = [Recommendation(NOON - timedelta(seconds=s), 2) for s in (400, 200, 100)]
    assert decide(NOON, 8, at(0.25), spec, history).units == 2


def test_scale_down_waits_for_a_whole_window_of_history() -> None:
    # A restarted operator knows only the last minute: it does not scale down yet.
    spec = auto(scaleDownStabilizationSeconds=300)
    history = [Recommendation(NOON - timedelta(seconds=60), 2)]
    assert decide(NOON, 8, at(0.25), spec, history).units == 8


def test_scale_up_stabilisation_goes_to_lowest_recent_recommendation() -> None:
    spec = auto(scaleUpStabilizationSeconds=120)
    history = [Recommendation(NOON - timedelta(seconds=60), 5)]
    decision = decide(NOON, 4, at(2.0), spec, history)
    assert decision.units == 5
    assert "scale-up held" in decision.reason
    # Without a window, straight to the recommendation.
    assert decide(NOON, 4, at(2.0), auto(), history).units == 8


def test_no_flapping_on_an_oscillating_metric() -> None:
    spec = auto(scaleDownStabilizationSeconds=300, intervalSeconds=30)
    units, history = 4, [Recommendation(NOON - timedelta(seconds=600), 4)]
    seen = []
    for step in range(20):
        now = NOON + timedelta(seconds=30 * step)
        value = 1.6 if step % 2 == 0 else 0.5  # up, down, up, …
        decision = decide(now, units, at(value, now), spec, history)
        history = prune([*history, Recommendation(now, decision.recommendation)], now, spec)
        units = decision.units
        seen.append(units)
    # Up with the peaks, never down with the troughs: the scale-down window always holds a
    # high recommendation; then it settles.
    assert seen[0] == 7
    assert seen == sorted(seen)
    assert len(set(seen[5:])) == 1


def test_schedule_window_sets_bounds_in_its_time_zone() -> None:
    day = {"start": "08:00", "end": "22:00", "days": ["Mon", "Tue", "Wed", "Thu", "Fri"], "minUnits": 6}
    spec = auto(timeZone="Asia/Shanghai", schedule=[day])
    # 12:00 UTC is 20:00 in Shanghai: inside the day window.
    assert bounds(NOON, spec).min_units == 6
    decision = decide(NOON, 2, at(1.0), spec, [])
    assert decision.units == 6
    assert "schedule 08:00-22:00" in decision.reason
    # 15:00 UTC is 23:00 in Shanghai: outside, back to autoscaling.minUnits.
    assert bounds(NOON + timedelta(hours=3), spec).min_units == 1
    # Saturday is not in the window's days.
    assert bounds(NOON + timedelta(days=3), spec).min_units == 1


def test_window_closing_scales_down_at_once_despite_stabilisation() -> None:
    night = {"start": "22:00", "end": "06:00", "maxUnits": 2}
    spec = auto(schedule=[night], scaleDownStabilizationSeconds=3600)
    late = NOON.replace(hour=23)
    decision = decide(late, 8, at(1.0), spec, [Recommendation(late - timedelta(minutes=5), 8)])
    assert decision.units == 2
    assert "maxUnits 2 of schedule 22:00-06:00" in decision.reason


@pytest.mark.parametrize(
    ("weekday", "clock", "open_"),
    [
        ("Mon", "23:30", True),  # the evening it opens
        ("Tue", "05:59", True),  # past midnight: still Monday's window
        ("Tue", "06:00", False),  # end is exclusive
        ("Tue", "23:00", False),  # Tuesday's evening: not in days
        ("Sun", "02:00", False),  # the morning after Saturday
        ("Mon", "02:00", False),  # Monday morning belongs to Sunday night
    ],
)
def test_overnight_window_crosses_midnight(weekday: str, clock: str, open_: bool) -> None:
    window = auto(schedule=[{"start": "22:00", "end": "06:00", "days": ["Mon"], "maxUnits": 2}]).schedule[0]
    monday = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
    offset = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"].index(weekday)
    hours, minutes = (int(p) for p in clock.split(":"))
    moment = monday + timedelta(days=offset, hours=hours, minutes=minutes)
    assert window_open(window, moment) is open_


def test_first_open_window_wins() -> None:
    windows = [
        {"start": "10:00", "end": "14:00", "minUnits": 5},
        {"start": "00:00", "end": "23:59", "minUnits": 3},
    ]
    assert bounds(NOON, auto(schedule=windows)).min_units == 5
    assert bounds(NOON.replace(hour=15), auto(schedule=windows)).min_units == 3


def test_unknown_time_zone_reads_as_utc() -> None:
    spec = auto(timeZone="Mars/Olympus", schedule=[{"start": "11:00", "end": "13:00", "minUnits": 4}])
    decision = decide(NOON, 2, at(1.0), spec, [])
    assert decision.units == 4
    assert "unknown timeZone" in decision.reason


def test_zero_units_scale_from_zero_on_load() -> None:
    assert decide(NOON, 0, at(2.0), auto(minUnits=0), []).units == 2
    assert decide(NOON, 0, at(0.0), auto(minUnits=0), []).units == 0


def test_prune_keeps_what_the_windows_need() -> None:
    spec = auto(scaleDownStabilizationSeconds=300)
    history = [Recommendation(NOON - timedelta(seconds=s), 1) for s in (900, 600, 301, 200, 0)]
    kept = prune(history, NOON, spec)
    assert [int((NOON - r.time).total_seconds()) for r in kept] == [301, 200, 0]


def test_invalid_bounds_are_rejected() -> None:
    with pytest.raises(ValidationError):
        auto(schedule=[{"start": "8:00", "end": "22:00"}])  # HH:MM


def test_queue_time_from_router_histograms() -> None:
    before = {"a": (10.0, 10.0), "b": (4.0, 4.0)}
    after = {"a": (16.0, 13.0), "b": (7.0, 4.0), "c": (100.0, 1.0)}
    # (6 + 3) seconds over 3 new requests; c is new (no baseline); b saw no request.
    assert queue_time(before, after) == pytest.approx(3.0)
    assert queue_time({}, after) is None
    assert queue_time({"a": (10.0, 10.0)}, {"a": (10.0, 10.0)}) == 0.0
    assert queue_time({"a": (10.0, 10.0)}, {"a": (1.0, 1.0)}) is None  # restarted


def test_unit_metrics_from_serve_exposition() -> None:
    text = (
        "# TYPE fireflyer_serve_kv_blocks_used gauge\nfireflyer_serve_kv_blocks_used 30\n"
        "# TYPE fireflyer_serve_kv_blocks_total gauge\nfireflyer_serve_kv_blocks_total 100\n"
        "# TYPE fireflyer_serve_generation_tokens_per_second gauge\n"
        "fireflyer_serve_generation_tokens_per_second 250\n"
    )
    other = text.replace(" 30\n", " 70\n").replace(" 250\n", " 750\n")
    units = [samples(text), samples(other)]
    assert mean_over_units("kvBlockUsage", units) == pytest.approx(0.5)
    assert mean_over_units("tokensPerSecondPerUnit", units) == pytest.approx(500)
    assert mean_over_units("kvBlockUsage", []) is None
