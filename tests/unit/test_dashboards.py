"""The chart's Grafana dashboards and PodMonitors against the code: every PromQL query names only
metrics that the operator, the engine or the router export (a renamed metric fails here), every
exported metric is documented, the dashboards render into sidecar ConfigMaps, and the PodMonitors
select the pods and ports the operator actually creates."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import fireflyer.operator.controllers  # noqa: F401  (registers every operator metric)
from fireflyer.operator import labels as L
from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.serve.metrics import EngineMetrics

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/fireflyer"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
DOC = REPO / "docs/observability.md"

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# PromQL words that look like metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan", "Inf", "NaN"}


def _families(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Family name → the series names it exposes, empty labelled families included."""
    return {m.name: {m.name + s for s in SUFFIXES.get(m.type, ("",))} for m in registry.collect()}


def _engine() -> EngineMetrics:
    engine = EngineMetrics(ep_layers=True)  # `fireflyer serve --ep-metrics`
    engine.set_eplb_balancedness(1.0)  # MoE models
    engine.set_gpu_tokens_source(lambda: [[1, 2]])  # units with the experts split
    engine.set_unit_ranks(2)  # units of several ranks
    return engine


def families() -> dict[str, set[str]]:
    every = {**_families(REGISTRY), **_families(_engine().registry), **_families(RouterMetrics().registry)}
    return {name: series for name, series in every.items() if name.startswith("fireflyer_")}


def exported() -> set[str]:
    return {name for series in families().values() for name in series}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) reads."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\$\{?\w+\}?", "1", s)  # $namespace, ${datasource}, $__rate_interval
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b\d+(\.\d+)?(ms|s|m|h|d|w|y)?\b", "1", s)  # numbers and durations (offset 5m)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[match.end() :].lstrip().startswith("(") or match.group(0) in KEYWORDS:
            continue  # a function or an aggregation
        found.add(match.group(0))
    return found


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and template variable."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels") or [])

    for panel in panels(dashboard.get("panels") or []):
        for target in panel.get("targets") or []:
            yield f"panel {panel['title']!r}", target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        yield f"variable {variable['name']!r}", inner.group(1) if inner else query


def unknown_metrics(dashboard: dict[str, Any], known: set[str]) -> list[str]:
    problems = []
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        problems += [f"{where}: {name} is not exported" for name in sorted(names - known)]
    return problems


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, role) (rate(a_bucket{role="x", b=~"$v"}[$__rate_interval])))'
        " / on (role) group_left max without (pod) (b_total offset 5m) > bool 0 unless c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert metric_names("fireflyer_x{a='1'} == 1") == {"fireflyer_x"}


def test_a_renamed_metric_fails_the_check() -> None:
    board = {
        "panels": [{"title": "p", "targets": [{"expr": "rate(fireflyer_serve_generation_tokens_totl[5m])"}]}],
        "annotations": {"list": []},
        "templating": {"list": []},
    }
    assert unknown_metrics(board, exported()) == [
        "panel 'p': fireflyer_serve_generation_tokens_totl is not exported"
    ]


def test_there_is_a_dashboard_for_each_view() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"overview", "ep", "eplb", "threefs", "training", "operator"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_names_only_exported_metrics(path: Path) -> None:
    assert unknown_metrics(json.loads(path.read_text()), exported()) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_a_dashboard_is_a_grafana_model_on_a_chosen_prometheus(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == f"fireflyer-{path.stem}" and board["title"].startswith("fireflyer / ")
    variables = board["templating"]["list"]
    assert variables[0] == {**variables[0], "name": "datasource", "type": "datasource", "query": "prometheus"}
    ids = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    assert len(ids) == len(set(ids))
    for variable in variables[1:]:
        assert variable["datasource"]["uid"] == "${datasource}"
        for later in variables[variables.index(variable) + 1 :]:
            # A variable may use only those before it (Grafana resolves them in order).
            assert f"${later['name']}" not in json.dumps(variable["query"]), (variable["name"], later["name"])


def test_every_exported_metric_is_documented_and_every_documented_one_exported() -> None:
    documented = set(re.findall(r"`(fireflyer_[a-z0-9_]*[a-z0-9])\b", DOC.read_text()))
    every = families()
    assert sorted(f for f, series in every.items() if not (series | {f}) & documented) == []
    assert sorted(documented - exported() - set(every)) == []


def _helm(*args: str) -> str:
    from fireflyer.dev import build

    result = subprocess.run(
        [
            str(build.ensure_binaries() / "helm"),
            "template",
            "obs",
            str(CHART),
            "--namespace",
            "monitoring",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _rendered(*values: str) -> list[dict[str, Any]]:
    sets = [a for v in values for a in ("--set", v)]
    return [doc for doc in yaml.safe_load_all(_helm(*sets)) if doc]


def test_the_switches_are_off_by_default() -> None:
    kinds = {doc["kind"] for doc in _rendered()}
    assert "PodMonitor" not in kinds
    assert not [d for d in _rendered() if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]]


def test_dashboards_render_into_sidecar_config_maps_with_the_same_json() -> None:
    docs = _rendered("dashboards.enabled=true", "dashboards.annotations.grafana_folder=fireflyer")
    maps = [d for d in docs if d["kind"] == "ConfigMap" and "-dashboard-" in d["metadata"]["name"]]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "fireflyer"}
        assert config_map["metadata"]["namespace"] == "monitoring"
        ((key, text),) = config_map["data"].items()
        source = CHART / "dashboards" / key.removeprefix("fireflyer-")
        assert json.loads(text) == json.loads(source.read_text())


def _pod_template(kind: str) -> dict[str, Any]:
    from tests.unit.test_inference_plan import _placed

    _, sets = _placed()
    if kind == "StatefulSet":
        return next(iter(sets.values()))["spec"]["template"]
    from fireflyer.api.inference import InferenceDeployment
    from fireflyer.operator.inference import children
    from tests.unit.test_inference_plan import _cr

    cr = _cr()
    spec = InferenceDeployment.model_validate(cr).spec
    router = next(
        c for c in children.router(cr, spec, {"prefill": [], "decode": []}) if c["kind"] == "Deployment"
    )
    return router["spec"]["template"]


def test_pod_monitors_select_unit_leaders_and_routers_by_the_operator_labels_and_ports() -> None:
    docs = _rendered("metrics.podMonitors.enabled=true")
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodMonitor"}
    assert set(monitors) == {"obs-fireflyer-engines", "obs-fireflyer-routers"}
    for name, kind in (("obs-fireflyer-engines", "StatefulSet"), ("obs-fireflyer-routers", "Deployment")):
        spec = monitors[name]["spec"]
        template = _pod_template(kind)
        labels = dict(template["metadata"]["labels"])
        if kind == "StatefulSet":
            labels[L.POD_INDEX] = "0"  # the StatefulSet controller labels each pod with its index
        assert spec["selector"]["matchLabels"].items() <= labels.items(), (name, labels)
        ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports") or []}
        (endpoint,) = spec["podMetricsEndpoints"]
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
        for relabel in endpoint["relabelings"]:
            (source,) = relabel["sourceLabels"]
            label = source.removeprefix("__meta_kubernetes_pod_label_")
            assert label in {re.sub(r"[^A-Za-z0-9_]", "_", k) for k in labels}, source
    assert monitors["obs-fireflyer-engines"]["spec"]["selector"]["matchLabels"][L.COMPONENT] == "unit"


def test_the_operator_service_monitor_keeps_the_resources_namespace_label() -> None:
    docs = _rendered("metrics.serviceMonitor.enabled=true")
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert all(e["honorLabels"] is True for e in monitor["spec"]["endpoints"])
