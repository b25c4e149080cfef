"""The built-in autoscaler's decision for one role: decide(now, units, samples, spec, history).
Pure: the caller collects the metric, keeps the history and writes the result.

Rules, in order:
1. bounds: autoscaling.minUnits/maxUnits, replaced by those of the first open schedule window;
2. recommendation: ceil(units × value / target), or the current units while value / target is
   within 1 ± tolerance, or while no fresh value exists (missing metrics hold);
3. stabilisation: a scale-up goes only to the lowest recommendation of the scale-up window, a
   scale-down only to the highest of the scale-down window (a history that does not yet reach
   back over the whole window counts the current units for the rest: a deployment that just
   turned autoscaling on does not scale down at once);
4. the bounds clamp the result last, so a schedule window opening or closing acts at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fireflyer.api.inference import Autoscaling, ScheduleWindow

WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
STALE_INTERVALS = 3
"""A sample older than this many intervals is no value at all."""
_ROUNDING_SLACK = 1e-9  # 3 × 1.0000000001 stays 3 units, not 4


@dataclass(frozen=True)
class MetricSample:
    time: datetime
    value: float


@dataclass(frozen=True)
class Recommendation:
    time: datetime
    units: int


@dataclass(frozen=True)
class Decision:
    units: int
    """The units the role should run."""
    reason: str
    recommendation: int
    """The bounded recommendation before stabilisation: what the caller adds to the history."""
    metric_value: float | None = None


@dataclass(frozen=True)
class Bounds:
    min_units: int
    max_units: int
    source: str
    """Where they come from: "autoscaling" or the open window, e.g. "schedule 08:00-22:00"."""


def _clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


def local_time(now: datetime, time_zone: str) -> datetime:
    """`now` in the schedule's zone; an unknown zone reads as UTC (the reason says so)."""
    try:
        return now.astimezone(ZoneInfo(time_zone))
    except (ZoneInfoNotFoundError, ValueError):
        return now.astimezone(ZoneInfo("UTC"))


def window_open(window: ScheduleWindow, local: datetime) -> bool:
    """Whether the window is open at `local`; an overnight window (end before start) belongs to
    the day it opens, so Mon 22:00-06:00 is open on Tuesday at 05:00."""
    start, end, now = _clock(window.start), _clock(window.end), local.time()
    days: set[str] = set(window.days) or set(WEEKDAYS)
    today = WEEKDAYS[local.weekday()]
    if start < end:
        return today in days and start <= now < end
    yesterday = WEEKDAYS[(local - timedelta(days=1)).weekday()]
    return (today in days and now >= start) or (yesterday in days and now < end)


def bounds(now: datetime, spec: Autoscaling) -> Bounds:
    local = local_time(now, spec.time_zone)
    for window in spec.schedule:
        if window_open(window, local):
            low = spec.min_units if window.min_units is None else window.min_units
            high = spec.max_units if window.max_units is None else window.max_units
            return Bounds(low, max(low, high), f"schedule {window.start}-{window.end}")
    return Bounds(spec.min_units, spec.max_units, "autoscaling")


def fresh_value(now: datetime, samples: list[MetricSample], spec: Autoscaling) -> float | None:
    """The newest sample, unless it is stale."""
    if not samples:
        return None
    newest = max(samples, key=lambda s: s.time)
    if (now - newest.time).total_seconds() > STALE_INTERVALS * spec.interval_seconds:
        return None
    return newest.value


def recommend(current: int, value: float, spec: Autoscaling) -> tuple[int, str]:
    """ceil(current × value / target), unless within tolerance of the target."""
    ratio = value / spec.target
    said = f"{spec.metric} {value:.3g} vs target {spec.target:.3g} (×{ratio:.2f})"
    if current > 0 and abs(ratio - 1) <= spec.tolerance:
        return current, f"{said}: within tolerance"
    base = current if current > 0 else 1  # no units: a value at all asks for one per target
    wanted = math.ceil(base * ratio - _ROUNDING_SLACK)
    if current == 0 and value <= 0:
        wanted = 0
    return max(0, wanted), said


def _stabilised(
    now: datetime, current: int, wanted: int, history: list[Recommendation], spec: Autoscaling
) -> tuple[int, str]:
    if wanted > current:
        window = spec.scale_up_stabilization_seconds
        since = now - timedelta(seconds=window)
        recent = [r.units for r in history if r.time >= since] + [wanted]
        units = max(current, min(recent))
        if units < wanted:
            return units, f"scale-up held to {units} by its {window}s stabilisation window"
        return units, ""
    if wanted < current:
        window = spec.scale_down_stabilization_seconds
        since = now - timedelta(seconds=window)
        recent = [r.units for r in history if r.time >= since] + [wanted]
        covered = window == 0 or any(r.time <= since for r in history)
        if not covered:
            recent.append(current)
        units = min(current, max(recent))
        if units > wanted:
            return units, f"scale-down held at {units} by its {window}s stabilisation window"
        return units, ""
    return current, ""


def decide(
    now: datetime,
    current_units: int,
    metric_samples: list[MetricSample],
    spec: Autoscaling,
    history: list[Recommendation],
) -> Decision:
    limits = bounds(now, spec)
    value = fresh_value(now, metric_samples, spec)
    notes: list[str] = []
    if value is None:
        wanted, said = current_units, f"no fresh {spec.metric} value: holding"
    else:
        wanted, said = recommend(current_units, value, spec)
    notes.append(said)
    bounded = min(max(wanted, limits.min_units), limits.max_units)
    units, held = _stabilised(now, current_units, bounded, history, spec)
    if held:
        notes.append(held)
    clamped = min(max(units, limits.min_units), limits.max_units)
    if bounded != wanted or clamped != units:
        above = max(wanted, units) > limits.max_units
        side, limit = ("maxUnits", limits.max_units) if above else ("minUnits", limits.min_units)
        notes.append(f"bounded by {side} {limit} of {limits.source}")
    zone = spec.time_zone
    if local_time(now, zone).tzname() == "UTC" and zone not in ("UTC", "Etc/UTC") and spec.schedule:
        notes.append(f"unknown timeZone {zone}: schedule read in UTC")
    reason = f"{'; '.join(notes)}: {current_units} → {clamped} units"
    return Decision(clamped, reason, bounded, value)


def prune(history: list[Recommendation], now: datetime, spec: Autoscaling) -> list[Recommendation]:
    """The recommendations any window still looks at, and the one just before the scale-down
    window (it shows the history covers the whole window)."""
    keep = max(spec.scale_up_stabilization_seconds, spec.scale_down_stabilization_seconds)
    since = now - timedelta(seconds=keep)
    inside = [r for r in history if r.time >= since]
    before = [r for r in history if r.time < since]
    return ([max(before, key=lambda r: r.time)] if before else []) + inside


HISTORY_LIMIT = 64
"""Most recommendations kept (status.<role>.autoscaler.history)."""


def compact(
    history: list[Recommendation], now: datetime, spec: Autoscaling, limit: int = HISTORY_LIMIT
) -> list[Recommendation]:
    """prune, less what no window can ever need: a recommendation with a later one at least as
    high never decides a scale-down's highest, one with a later one at least as low never decides
    a scale-up's lowest (the later one is in every window the earlier is). The oldest stays: it
    shows how far back the history reaches. Past `limit`, the oldest of the rest go first."""
    kept = sorted(prune(history, now, spec), key=lambda r: r.time)
    if len(kept) <= 2:
        return kept
    needed = [kept[-1]]
    highest = lowest = kept[-1].units
    for r in reversed(kept[1:-1]):
        if r.units > highest or r.units < lowest:
            needed.append(r)
        highest, lowest = max(highest, r.units), min(lowest, r.units)
    needed.reverse()
    return [kept[0], *needed[-(limit - 1) :]]
