"""`fireflyer eplb report`, the pure part: a placement and a load window → per-GPU load per MoE
layer as a terminal heatmap, balancedness per layer and overall. numpy only, no I/O.

Each cell is one GPU in one MoE layer, shaded by its load over the layer's mean load (what the
balancedness measures: mean / max), from 0 to 2× the mean and above; a balanced layer is a row of
half-height cells."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fireflyer.eplb.metrics import FloatArray, IntArray, gpu_loads, table_balancedness
from fireflyer.errors import FireflyerError

Style = Literal["plain", "blocks", "color"]

PLAIN_RAMP = " .:-=+*#@"
BLOCK_RAMP = " ▁▂▃▄▅▆▇█"
# 256-colour foregrounds for the levels above: cold blues, green around the mean, hot reds.
COLOR_RAMP = (21, 27, 33, 39, 46, 226, 214, 208, 196)
LEVELS = len(PLAIN_RAMP)
GROUND = 236
RESET = "\x1b[0m"


class ReportError(FireflyerError):
    """A placement or a load that cannot be drawn (the message says why)."""


@dataclass(frozen=True)
class PlacementTable:
    """The placement a role runs: the logical expert of each physical slot, per MoE layer."""

    generation: int  # 0: the default even split
    gpus: int
    phy2log: IntArray  # [MoE layers, gpus × slots per GPU]

    @property
    def layers(self) -> int:
        return int(self.phy2log.shape[0])


def even_split(layers: int, experts: int, gpus: int) -> PlacementTable:
    """What units run before any placement: experts split in contiguous runs over the GPUs."""
    if experts % gpus:
        raise ReportError(f"{experts} experts do not split evenly over {gpus} GPUs")
    return PlacementTable(0, gpus, np.tile(np.arange(experts, dtype=np.int64), (layers, 1)))


def placement_from_document(doc: dict[str, Any]) -> PlacementTable:
    """placement.json (the role's ConfigMap) → its table; the document must not be empty."""
    try:
        phy2log = np.asarray(doc["phy2log"], dtype=np.int64)
        gpus, generation = int(doc["gpus"]), int(doc["generation"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"placement.json: missing or malformed field: {exc}") from exc
    if phy2log.ndim != 2 or gpus < 1 or phy2log.shape[1] % gpus:
        raise ReportError(f"placement.json: phy2log of shape {phy2log.shape} does not split over {gpus} GPUs")
    return PlacementTable(generation, gpus, phy2log)


def gpu_load_table(load: npt.ArrayLike, placement: PlacementTable) -> FloatArray:
    """[MoE layers, GPUs] load: each expert's tokens spread evenly over its replicas."""
    tokens = np.asarray(load, dtype=np.float64)
    if tokens.ndim != 2 or tokens.shape[0] != placement.layers:
        raise ReportError(
            f"the load has shape {tokens.shape}; the placement has {placement.layers} MoE layers"
        )
    if int(placement.phy2log.max()) >= tokens.shape[1]:
        raise ReportError(
            f"the placement names expert {int(placement.phy2log.max())}; the load has {tokens.shape[1]}"
        )
    return gpu_loads(tokens, placement.phy2log, placement.gpus)


def layer_balancedness(table: npt.ArrayLike) -> FloatArray:
    """Per row (MoE layer): mean / max over the columns (GPUs); an idle layer counts 1."""
    loads = np.asarray(table, dtype=np.float64)
    peak = loads.max(axis=1)
    return np.divide(loads.mean(axis=1), peak, out=np.ones_like(peak), where=peak > 0)


def parse_layers(text: str | None, layers: int) -> range:
    """`--layers`: "a-b" (inclusive) or "a", 0-based MoE layers; None: all of them."""
    if not text:
        return range(layers)
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError as exc:
        raise ReportError(f"--layers {text!r}: expected A-B or A (MoE layer numbers)") from exc
    if not 0 <= lo <= hi < layers:
        raise ReportError(f"--layers {text!r}: the placement has MoE layers 0-{layers - 1}")
    return range(lo, hi + 1)


def levels(table: npt.ArrayLike) -> IntArray:
    """Each cell's shade: its load over its layer's mean, in LEVELS steps from 0 to 2× (a cell at
    the mean is the middle level); an idle layer is all level 0."""
    loads = np.asarray(table, dtype=np.float64)
    mean = loads.mean(axis=1, keepdims=True)
    ratio = np.divide(loads, mean, out=np.zeros_like(loads), where=mean > 0)
    steps = (LEVELS - 1) / 2
    return np.minimum(LEVELS - 1, np.floor(ratio * steps + 0.5)).astype(np.int64)


def _cell(level: int, style: Style) -> str:
    if style == "plain":
        return PLAIN_RAMP[level]
    if style == "blocks":
        return BLOCK_RAMP[level]
    # On a dark grey ground, so that an empty cell still shows where it is.
    return f"\x1b[38;5;{COLOR_RAMP[level]};48;5;{GROUND}m{BLOCK_RAMP[level]}{RESET}"


def _ruler(gpus: int, indent: int) -> str:
    """GPU numbers every 8 columns (GPU 0, 8, 16, …) above the cells."""
    marks = [" "] * gpus
    for gpu in range(0, gpus, 8):
        label = str(gpu)
        if gpu + len(label) <= gpus:
            marks[gpu : gpu + len(label)] = label
    return " " * indent + "".join(marks)


def render_heatmap(table: npt.ArrayLike, layers: range | None = None, style: Style = "plain") -> str:
    """One line per MoE layer: its number, one shaded cell per GPU, and the layer's balancedness."""
    loads = np.asarray(table, dtype=np.float64)
    shown = range(loads.shape[0]) if layers is None else layers
    shades = levels(loads)
    per_layer = layer_balancedness(loads)
    width = len(str(max(shown[-1], 0))) if shown else 1
    indent = width + 3  # "L", the number, two spaces
    lines = [_ruler(loads.shape[1], indent) + "  balancedness (mean/max)"]
    for layer in shown:
        cells = "".join(_cell(int(v), style) for v in shades[layer])
        idle = "" if loads[layer].any() else " (idle)"
        lines.append(f"L{layer:<{width}}  {cells}  {per_layer[layer]:.3f}{idle}")
    return "\n".join(lines)


def legend(style: Style) -> str:
    ramp = "".join(_cell(level, style) for level in range(LEVELS))
    return f"cell: a GPU's load / its layer's mean, 0 [{ramp}] 2× and above (the middle is the mean)"


@dataclass(frozen=True)
class StatusFigures:
    """What the controller wrote: the role's status and its current ExpertPlacement's status."""

    placement_name: str | None = None
    predicted: float | None = None  # the ExpertPlacement's balancedness when it was published
    previous: float | None = None  # the placement before it, on the same window
    role_figure: float | None = None  # status.<role>.balancedness: predicted after a rebalance, else measured
    applied_generation: int | None = None  # the lowest generation any unit reports running
    applied_units: int | None = None


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_report(
    title: str,
    placement: PlacementTable,
    table: npt.ArrayLike | None,
    figures: StatusFigures,
    *,
    layers: range | None = None,
    style: Style = "plain",
    load_source: str = "",
) -> str:
    """The whole report: the placement and what the controller recorded, then (with a load) the
    heatmap and the balancedness measured on it."""
    which = "the default even split" if placement.generation == 0 else f"generation {placement.generation}"
    named = f" ({figures.placement_name})" if figures.placement_name else ""
    slots = placement.phy2log.shape[1] // placement.gpus
    lines = [
        f"{title}: {which}{named}, {placement.layers} MoE layers on {placement.gpus} GPUs × {slots} slots",
        f"units run generation: {'—' if figures.applied_generation is None else figures.applied_generation}"
        + ("" if figures.applied_units is None else f" ({figures.applied_units} unit(s) on this one)"),
        f"balancedness predicted at publish: {_figure(figures.predicted)}"
        f" (the placement before it: {_figure(figures.previous)});"
        f" controller's latest: {_figure(figures.role_figure)}",
    ]
    if table is None:
        return "\n".join(lines)
    loads = np.asarray(table, dtype=np.float64)
    shown = range(placement.layers) if layers is None else layers
    overall = table_balancedness(loads)
    measured = f"balancedness measured on {load_source or 'the load'}: {overall:.3f} (all MoE layers)"
    if len(shown) != placement.layers:
        part = table_balancedness(loads[shown.start : shown.stop])
        measured += f", {part:.3f} (MoE layers {shown.start}-{shown.stop - 1})"
    if not loads.any():
        measured += "; no tokens in the window"
    lines += [measured, "", render_heatmap(loads, shown, style), "", legend(style)]
    return "\n".join(lines)


__all__ = [
    "PlacementTable",
    "ReportError",
    "StatusFigures",
    "even_split",
    "gpu_load_table",
    "layer_balancedness",
    "legend",
    "levels",
    "parse_layers",
    "placement_from_document",
    "render_heatmap",
    "render_report",
]
