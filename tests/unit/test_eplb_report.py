"""`fireflyer eplb report`: a placement and a load → the terminal heatmap, balancedness per layer
and overall, the controller's figures, and the PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fireflyer.cli import build_parser
from fireflyer.eplb.report import (
    BLOCK_RAMP,
    PLAIN_RAMP,
    ReportError,
    StatusFigures,
    even_split,
    gpu_load_table,
    layer_balancedness,
    levels,
    parse_layers,
    placement_from_document,
    render_heatmap,
    render_report,
)
from fireflyer.eplb.report_cli import choose_style, load_sources, pick_role, status_figures, tokens_of
from fireflyer.eplb.report_plot import write_png

# 3 MoE layers × 8 experts: even, one hot expert, idle.
LOAD = np.array([[10] * 8, [80, 0, 0, 0, 10, 10, 10, 10], [0] * 8], dtype=np.float64)


def test_the_even_split_puts_contiguous_experts_on_each_gpu() -> None:
    table = gpu_load_table(LOAD, even_split(3, 8, 4))
    assert table.tolist() == [[20, 20, 20, 20], [80, 0, 20, 20], [0, 0, 0, 0]]


def test_a_replicated_expert_shares_its_load_between_its_gpus() -> None:
    # Expert 0 has two replicas, on GPUs 0 and 1: each carries 40 of its 80 tokens.
    doc = {"generation": 2, "gpus": 2, "phy2log": [[0, 1, 2, 0, 3, 4]]}
    placement = placement_from_document(doc)
    table = gpu_load_table([[80, 10, 10, 0, 0]], placement)
    assert placement.generation == 2 and table.tolist() == [[60, 40]]
    assert layer_balancedness(table).tolist() == pytest.approx([50 / 60])


def test_balancedness_per_layer_is_mean_over_max_and_an_idle_layer_counts_one() -> None:
    table = gpu_load_table(LOAD, even_split(3, 8, 4))
    assert layer_balancedness(table).tolist() == pytest.approx([1.0, 30 / 80, 1.0])


def test_a_cell_is_shaded_by_its_load_over_the_layer_mean() -> None:
    # Layer mean 30: 0 → empty, 15 (0.5×) → level 2, 30 (the mean) → the middle, 45 (1.5×) → 6,
    # 60 (2×) and more → full.
    assert levels([[0, 15, 30, 60, 45]]).tolist() == [[0, 2, 4, 8, 6]]
    assert levels([[0, 0, 0, 0, 150]]).tolist() == [[0, 0, 0, 0, 8]]
    assert levels([[0, 0]]).tolist() == [[0, 0]]  # an idle layer


def test_the_plain_heatmap_has_one_row_per_layer_and_one_cell_per_gpu() -> None:
    table = gpu_load_table(LOAD, even_split(3, 8, 4))
    lines = render_heatmap(table).splitlines()
    assert lines[0].startswith("    0   ") and "balancedness (mean/max)" in lines[0]
    assert lines[1:] == ["L0  ====  1.000", "L1  @ --  0.375", "L2        1.000 (idle)"]
    assert PLAIN_RAMP[4] == "=" and PLAIN_RAMP[-1] == "@" and PLAIN_RAMP[3] == "-"


def test_blocks_and_colour_draw_the_same_levels() -> None:
    table = gpu_load_table(LOAD, even_split(3, 8, 4))
    assert render_heatmap(table, range(1, 2), "blocks").splitlines()[1] == f"L1  {BLOCK_RAMP[8]} ▃▃  0.375"
    coloured = render_heatmap(table, range(1, 2), "color").splitlines()[1]
    assert "\x1b[38;5;196;48;5;236m█\x1b[0m" in coloured  # the hot GPU in red
    assert "\x1b[" not in render_heatmap(table, None, "plain")


def test_the_ruler_numbers_every_eighth_gpu() -> None:
    table = np.ones((12, 20))
    header = render_heatmap(table).splitlines()[0]
    cells = header[len("L11  ") :]
    assert cells.index("0") == 0 and cells.index("8") == 8 and cells.index("16") == 16


def test_the_report_shows_the_controllers_figures_and_the_measured_balancedness() -> None:
    placement = placement_from_document({"generation": 3, "gpus": 4, "phy2log": [list(range(8))] * 3})
    table = gpu_load_table(LOAD, placement)
    figures = StatusFigures("d-decode-3", predicted=0.95, previous=0.7, role_figure=0.9, applied_generation=3)
    text = render_report("ns/d decode", placement, table, figures, layers=range(1, 2), load_source="2 units")
    assert text.splitlines()[0] == "ns/d decode: generation 3 (d-decode-3), 3 MoE layers on 4 GPUs × 2 slots"
    assert "predicted at publish: 0.950 (the placement before it: 0.700); controller's latest: 0.900" in text
    overall = (1.0 + 30 / 80 + 1.0) / 3
    assert f"measured on 2 units: {overall:.3f} (all MoE layers), 0.375 (MoE layers 1-1)" in text
    assert "L1  @ --  0.375" in text and "L0 " not in text
    assert "units run generation: 3" in text


def test_layers_are_a_range_or_one_and_must_exist() -> None:
    assert parse_layers(None, 5) == range(5)
    assert parse_layers("1-3", 5) == range(1, 4)
    assert parse_layers("4", 5) == range(4, 5)
    for bad in ("3-1", "0-5", "x", "-1"):
        with pytest.raises(ReportError):
            parse_layers(bad, 5)


def test_a_load_of_the_wrong_shape_or_a_bad_document_is_refused() -> None:
    with pytest.raises(ReportError, match="2 MoE layers"):
        gpu_load_table(np.ones((3, 8)), even_split(2, 8, 4))
    with pytest.raises(ReportError, match="names expert 7"):
        gpu_load_table(np.ones((3, 4)), even_split(3, 8, 4))
    with pytest.raises(ReportError, match="missing"):
        placement_from_document({"generation": 1})
    with pytest.raises(ReportError, match="non-negative"):
        tokens_of({"tokens": [[1, -1]]}, "load.json")


def test_colour_only_on_a_terminal() -> None:
    assert choose_style("auto", True, {"TERM": "xterm-256color"}) == "color"
    assert choose_style("auto", False, {}) == "plain"
    assert choose_style("auto", True, {"NO_COLOR": "1"}) == "plain"
    assert choose_style("blocks", False, {}) == "blocks"


def _deployment(annotations: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "metadata": {"name": "d", "namespace": "ns", "annotations": annotations or {}},
        "spec": {"prefill": {"units": 1}, "decode": {"units": 0}},
        "status": {"decode": {"balancedness": 0.9, "appliedPlacementGeneration": 2}},
    }


def test_the_load_comes_from_each_leader_or_the_annotation() -> None:
    assert load_sources(_deployment(), "decode", ["10.0.0.5", None]) == [
        "http://10.0.0.5:30000/v1/eplb/load",
        "http://d-decode-1-0.d-decode-1.ns.svc.cluster.local:30000/v1/eplb/load",
    ]
    override = _deployment({"eplb.fireflyer.dev/load-url": "http://agg/v1/eplb/load"})
    assert load_sources(override, "decode", [None, None]) == ["http://agg/v1/eplb/load"]
    assert pick_role(_deployment()["spec"], None) == "prefill"  # type: ignore[arg-type]


def test_the_figures_come_from_the_placement_of_the_generation_shown() -> None:
    placements = [
        {
            "metadata": {"name": f"d-decode-{g}"},
            "spec": {"deployment": "d", "role": "decode", "generation": g},
            "status": {"balancedness": [0.81, 0.82][g - 1], "previousBalancedness": 0.5, "appliedUnits": g},
        }
        for g in (1, 2)
    ]
    figures = status_figures(_deployment(), "decode", 2, placements)
    assert figures == StatusFigures("d-decode-2", 0.82, 0.5, 0.9, 2, 2)
    assert status_figures(_deployment(), "decode", 0, placements).placement_name is None


def test_the_command_line_parses(tmp_path: Path) -> None:
    args = build_parser().parse_args(["eplb", "report", "d", "-n", "ns", "--layers", "0-3", "--png", "x.png"])
    assert (args.name, args.namespace, args.layers, args.png, args.style) == (
        "d",
        "ns",
        "0-3",
        "x.png",
        "auto",
    )


def test_the_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "eplb.png"
    write_png(gpu_load_table(LOAD, even_split(3, 8, 4)), range(3), "ns/d decode", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ReportError, match=r"fireflyer\[plot\]"):
        write_png(np.ones((2, 2)), range(2), "t", tmp_path / "x.png")
