"""`fireflyer eplb report NAME`: the placement a role of an InferenceDeployment runs, read from the
cluster as its units read it, drawn over the load its units measure.

The placement is the role's ConfigMap `<deployment>-<role>-placement` (what the pods mount); the
controller keeps no load, so the load is asked from the units' leaders (`GET /v1/eplb/load`, as
the EPLB controller does, summed over the units) or read from `--load FILE`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.eplb.report import (
    PlacementTable,
    ReportError,
    StatusFigures,
    Style,
    even_split,
    gpu_load_table,
    parse_layers,
    placement_from_document,
    render_report,
)

SERVE_PORT = 30000  # the engine's port (fireflyer/operator/inference/engines.py)
LOAD_URL_ANNOTATION = "eplb.fireflyer.dev/load-url"
PLACEMENT_KEY = "placement.json"


def choose_style(requested: str, stdout_is_tty: bool, env: dict[str, str]) -> Style:
    """auto: 256-colour blocks on a terminal (unless NO_COLOR or TERM=dumb), plain characters when
    piped or redirected."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if not stdout_is_tty or "NO_COLOR" in env or env.get("TERM") == "dumb":
        return "plain"
    return "color"


def pick_role(spec: dict[str, Any], requested: str | None) -> str:
    """--role, else decode when it has units, else prefill."""
    if requested:
        return requested
    return "decode" if (spec.get("decode") or {}).get("units", 0) else "prefill"


def status_figures(
    cr: dict[str, Any], role: str, generation: int, placements: list[dict[str, Any]]
) -> StatusFigures:
    """The figures the controller recorded for the role and for the ExpertPlacement it runs."""
    role_status = (cr.get("status") or {}).get(role) or {}
    name = cr["metadata"]["name"]
    current = [
        p
        for p in placements
        if (p.get("spec") or {}).get("deployment") == name
        and p["spec"].get("role") == role
        and p["spec"].get("generation") == generation
    ]
    placement = current[0] if generation and current else None
    status = (placement or {}).get("status") or {}
    return StatusFigures(
        placement_name=None if placement is None else placement["metadata"]["name"],
        predicted=status.get("balancedness"),
        previous=status.get("previousBalancedness"),
        role_figure=role_status.get("balancedness"),
        applied_generation=role_status.get("appliedPlacementGeneration"),
        applied_units=status.get("appliedUnits"),
    )


def load_sources(cr: dict[str, Any], role: str, leader_ips: list[str | None]) -> list[str]:
    """Where the role's load is served: the load-url annotation, else each unit's leader (its pod
    address when it has one, its stable DNS name otherwise)."""
    override = (cr["metadata"].get("annotations") or {}).get(LOAD_URL_ANNOTATION)
    if override:
        return [override]
    name, namespace = cr["metadata"]["name"], cr["metadata"]["namespace"]
    urls = []
    for index, ip in enumerate(leader_ips):
        unit = f"{name}-{role}-{index}"
        host = ip or f"{unit}-0.{unit}.{namespace}.svc.cluster.local"
        urls.append(f"http://{host}:{SERVE_PORT}/v1/eplb/load")
    return urls


def tokens_of(payload: Any, source: str) -> np.ndarray:
    """The [MoE layers, experts] table of a load answer (or a bare table)."""
    table = payload.get("tokens") if isinstance(payload, dict) else payload
    try:
        tokens = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ReportError(f"{source}: 'tokens' is not a numeric table: {exc}") from exc
    if tokens.ndim != 2 or not np.all(np.isfinite(tokens)) or np.any(tokens < 0):
        raise ReportError(f"{source}: expected a [MoE layers, experts] table of non-negative token counts")
    return tokens


def read_load_file(path: str) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise ReportError(f"{path}: no such file")
    if file.suffix == ".npy":
        return tokens_of(np.load(file), path)
    return tokens_of(json.loads(file.read_text()), path)


def fetch_load(urls: list[str], timeout: float = 3.0) -> np.ndarray:
    """Every source's window, summed (the role's load, as the controller collects it)."""
    total: np.ndarray | None = None
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                tokens = tokens_of(json.loads(resp.read()), url)
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise ReportError(
                f"{url}: {exc}; give the load with --load FILE (the JSON of GET /v1/eplb/load,"
                " e.g. through kubectl port-forward to the unit's pod 0)"
            ) from exc
        if total is not None and total.shape != tokens.shape:
            raise ReportError(f"{url}: a window of shape {tokens.shape}, the others {total.shape}")
        total = tokens if total is None else total + tokens
    if total is None:
        raise ReportError("the role has no units to ask for their load: give --load FILE")
    return total


def _placement(cr: dict[str, Any], role: str, config_map: dict[str, Any] | None) -> PlacementTable:
    spec = cr["spec"]
    if config_map is None:
        mode = (spec.get("eplb") or {}).get("mode", "dynamic")
        raise ReportError(
            f"no ConfigMap {cr['metadata']['name']}-{role}-placement"
            + (" (eplb.mode is off: the role has no placement)" if mode == "off" else " yet")
        )
    doc = json.loads((config_map.get("data") or {}).get(PLACEMENT_KEY) or "{}")
    if doc:
        return placement_from_document(doc)
    from fireflyer.api.inference import InferenceDeployment

    typed = InferenceDeployment.model_validate(cr).spec
    arch = typed.model.architecture
    return even_split(arch.moe_layers, arch.routed_experts, getattr(typed, role).parallelism.expert)


def cmd_report(args: argparse.Namespace) -> int:
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    from fireflyer.operator import kube

    namespace, name = args.namespace, args.name
    cr = kube.get("InferenceDeployment", name, namespace)
    if cr is None:
        raise ReportError(f"no InferenceDeployment {namespace}/{name}")
    role = pick_role(cr["spec"], args.role)
    placement = _placement(cr, role, kube.get("ConfigMap", f"{name}-{role}-placement", namespace))
    figures = status_figures(cr, role, placement.generation, kube.list_("ExpertPlacement", namespace))
    if args.load:
        load, where = read_load_file(args.load), args.load
    else:
        units = int((cr["spec"].get(role) or {}).get("units", 0))
        pods = [kube.get("Pod", f"{name}-{role}-{i}-0", namespace) for i in range(units)]
        ips = [((pod or {}).get("status") or {}).get("podIP") for pod in pods]
        urls = load_sources(cr, role, ips)
        load = fetch_load(urls)
        where = f"the load of {len(urls)} source(s)"
    table = gpu_load_table(load, placement)
    layers = parse_layers(args.layers, placement.layers)
    style = choose_style(args.style, sys.stdout.isatty(), dict(os.environ))
    title = f"{namespace}/{name} {role}"
    print(render_report(title, placement, table, figures, layers=layers, style=style, load_source=where))
    if args.png:
        from fireflyer.eplb.report_plot import write_png

        write_png(table, layers, f"{title}, generation {placement.generation}", Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def add_report_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`report` under the `eplb` command that `sub` (the top-level commands) already has."""
    eplb = sub.choices["eplb"]
    eplb_sub = next(a for a in eplb._actions if isinstance(a, argparse._SubParsersAction))
    p = eplb_sub.add_parser(
        "report", help="a role's current placement in the cluster: per-GPU load heatmap and balancedness"
    )
    p.add_argument("name", help="the InferenceDeployment")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--kubeconfig", help="the cluster (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument(
        "--role", choices=["prefill", "decode"], help="default: decode if it has units, else prefill"
    )
    p.add_argument("--layers", metavar="A-B", help="show only MoE layers A to B (0-based, inclusive)")
    p.add_argument(
        "--load",
        metavar="FILE",
        help="the load instead of asking the units' leaders: the JSON of GET /v1/eplb/load, or .npy",
    )
    p.add_argument("--png", metavar="FILE", help="also write the heatmap as a PNG (the extra `plot`)")
    p.add_argument(
        "--style",
        choices=["auto", "plain", "blocks", "color"],
        default="auto",
        help="auto: 256-colour blocks on a terminal, plain characters otherwise",
    )
    p.set_defaults(handler=cmd_report)


__all__ = ["add_report_parser", "cmd_report"]
