"""Writes of the InferenceRoleScalers, and the built-in autoscaler's periodic pass.

The reconcile decides what each role runs (fireflyer.operator.inference.scaler) and sends
scaler_writes. The autoscaler runs beside it: every TICK_SECONDS it looks at the roles with
`autoscaling` whose interval has passed, reads their metric, decides (autoscale.decide) and sets
the scaler's spec.replicas; the scaler's watch then kicks the reconcile that adds or removes
units. Its decision and reason go to status.<role>.autoscaler, and each change to an Event.

What the next decision depends on (the recommendations of the stabilisation windows, the last
metric sample, when the role was last decided) is kept in status.<role>.autoscaler too: a
restarted operator, or another replica taking over, goes on where the last one stopped. This
process's memory is only a cache of it (a status read may lag our own last write)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from fireflyer.api.inference import InferenceDeployment
from fireflyer.operator import events, kube, status_writes
from fireflyer.operator.inference import autoscale, scaler
from fireflyer.operator.inference import reasons as R
from fireflyer.operator.inference.autoscale_metrics import Collector
from fireflyer.operator.planning import format_time, parse_time
from fireflyer.operator.resync import Resync

log = logging.getLogger(__name__)

TICK_SECONDS = 5.0
KIND = "InferenceDeployment"

MetricReader = Callable[[dict[str, Any], str, str, int], float | None]
"""(deployment, role, metric, units) → the metric's value now, or None."""

read_metric: MetricReader = Collector()
"""Replaceable (tests): where the autoscaler's metric values come from."""

_history: dict[tuple[str, str, str], list[autoscale.Recommendation]] = {}
_last_sample: dict[tuple[str, str, str], autoscale.MetricSample] = {}
_last_run: dict[tuple[str, str, str], float] = {}


def scaler_writes(cr: dict[str, Any], scales: dict[str, scaler.RoleScale]) -> list[Callable[[], None]]:
    """One write sequence per role whose scaler needs one: create a missing scaler, reset one the
    deployment's units win over, update its status. The roles' are independent, so the pass
    sends them at once."""
    namespace = cr["metadata"]["namespace"]
    return [
        partial(_write_scaler, namespace, scaler.scaler_name(cr["metadata"]["name"], role), scale)
        for role, scale in sorted(scales.items())
        if scale.create is not None or scale.reset_to is not None or scale.status is not None
    ]


def _write_scaler(namespace: str, name: str, scale: scaler.RoleScale) -> None:
    if scale.create is not None and kube.create(scale.create) is None:
        return  # one exists already (a stale read): the next pass sees it
    if scale.reset_to is not None:
        kube.patch(scaler.KIND, name, namespace, {"spec": {"replicas": scale.reset_to}})
    if scale.status is not None:
        kube.patch_status(scaler.KIND, name, namespace, scale.status)


def _due(key: tuple[str, str, str], interval: float, remembered: dict[str, Any], now: datetime) -> bool:
    last = _last_run.get(key)
    if last is not None:
        return time.monotonic() - last >= interval - TICK_SECONDS / 2
    ran = parse_time(remembered.get("lastRunTime"))  # before a restart
    return ran is None or (now - ran).total_seconds() >= interval - TICK_SECONDS / 2


def restored_history(remembered: dict[str, Any]) -> list[autoscale.Recommendation]:
    """The recommendations status.<role>.autoscaler.history holds (unreadable entries skipped)."""
    history = []
    for entry in remembered.get("history") or []:
        when = parse_time(entry.get("time"))
        if when is not None and isinstance(entry.get("units"), int):
            history.append(autoscale.Recommendation(when, entry["units"]))
    return history


def restored_sample(remembered: dict[str, Any]) -> autoscale.MetricSample | None:
    sample = remembered.get("lastSample") or {}
    when = parse_time(sample.get("time"))
    value = sample.get("value")
    return autoscale.MetricSample(when, float(value)) if when and isinstance(value, int | float) else None


def _forget(namespace: str, name: str, role: str | None = None) -> None:
    for store in (_history, _last_sample, _last_run):
        for key in [k for k in store if k[:2] == (namespace, name) and role in (None, k[2])]:
            store.pop(key, None)


def autoscale_role(
    cr: dict[str, Any], role: str, spec: autoscale.Autoscaling, now: datetime
) -> dict[str, Any] | None:
    """One decision for one role; → its status.autoscaler, or None without a scaler yet."""
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    live = kube.get(scaler.KIND, scaler.scaler_name(name, role), namespace)
    if live is None:
        return None  # the reconcile creates it
    current = int(live["spec"]["replicas"])
    key = (namespace, name, role)
    before = ((cr.get("status") or {}).get(role) or {}).get("autoscaler") or {}
    value = read_metric(cr, role, spec.metric, current)
    if value is not None:
        _last_sample[key] = autoscale.MetricSample(now, value)
    sample = _last_sample.get(key) or restored_sample(before)
    history = _history[key] if key in _history else restored_history(before)
    decision = autoscale.decide(now, current, [sample] if sample else [], spec, history)
    history = autoscale.compact([*history, autoscale.Recommendation(now, decision.recommendation)], now, spec)
    _history[key] = history
    last_scale = before.get("lastScaleTime")
    if decision.units != current:
        target = scaler.scaler_name(name, role)
        kube.patch(scaler.KIND, target, namespace, {"spec": {"replicas": decision.units}})
        last_scale = format_time(now)
        events.post(cr, "Normal", R.AUTOSCALED, f"{role}: {decision.reason}")
    fields: dict[str, Any] = {"desiredUnits": decision.units, "reason": decision.reason}
    if decision.metric_value is not None:
        fields["metricValue"] = round(decision.metric_value, 6)
    if last_scale:
        fields["lastScaleTime"] = last_scale
    fields["history"] = [{"time": format_time(r.time), "units": r.units} for r in history]
    if sample is not None:
        fields["lastSample"] = {"time": format_time(sample.time), "value": round(sample.value, 6)}
    fields["lastRunTime"] = format_time(now)
    return fields


def autoscale_pass(namespace: str, name: str) -> bool:
    """The due roles of one deployment; False once it is gone or no role autoscales (a change
    of its spec arms the pass again)."""
    cr = kube.get(KIND, name, namespace)
    if cr is None or cr["metadata"].get("deletionTimestamp"):
        _forget(namespace, name)
        if isinstance(read_metric, Collector):
            read_metric.forget(namespace, name)
        return False
    spec = InferenceDeployment.model_validate(cr).spec
    now = datetime.now(UTC)
    patch: dict[str, Any] = {}
    keep = False
    for role in scaler.ROLES:
        settings = getattr(spec, role).autoscaling
        key = (namespace, name, role)
        if settings is None:
            _forget(namespace, name, role)
            if ((cr.get("status") or {}).get(role) or {}).get("autoscaler") is not None:
                patch[role] = {"autoscaler": None}
            continue
        keep = True
        remembered = ((cr.get("status") or {}).get(role) or {}).get("autoscaler") or {}
        if not _due(key, settings.interval_seconds, remembered, now):
            continue
        _last_run[key] = time.monotonic()
        fields = autoscale_role(cr, role, settings, now)
        if fields is not None and fields != ((cr.get("status") or {}).get(role) or {}).get("autoscaler"):
            patch[role] = {"autoscaler": fields}
    if patch:
        generation = int(cr["metadata"].get("generation") or 0)
        status_writes.patch_status(KIND, name, namespace, patch, [], generation, cr["metadata"].get("uid"))
    return keep


_resync = Resync("autoscaler", TICK_SECONDS)


def arm_autoscaler(namespace: str, name: str, body: dict[str, Any]) -> None:
    """Every TICK_SECONDS while a role of the deployment has autoscaling, or until a stale
    status.<role>.autoscaler is cleared (the deployment's handlers call this on every change)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    wanted = any((spec.get(r) or {}).get("autoscaling") for r in scaler.ROLES)
    if wanted or any((status.get(r) or {}).get("autoscaler") for r in scaler.ROLES):
        key = (namespace, name)
        _resync.arm(key, lambda: autoscale_pass(*key))


__all__ = ["arm_autoscaler", "autoscale_pass", "read_metric", "scaler_writes"]
