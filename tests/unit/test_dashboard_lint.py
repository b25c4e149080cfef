"""The chart's Grafana dashboards pass Grafana's own dashboard schema (panel plugins and
Prometheus queries included), checked by hack/dashboard-validate on the Grafana Foundation SDK."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fireflyer.dev.dashboard_schema import dashboard_files, validate

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="the Go toolchain is not installed")


def test_every_shipped_dashboard_passes_grafanas_schema() -> None:
    files = dashboard_files()
    assert len(files) >= 6
    assert validate(files) == []


def _broken_copy(tmp_path: Path, edit: str) -> Path:
    board = json.loads((dashboard_files()[0]).read_text())
    panel = next(p for p in board["panels"] if p.get("type") == "timeseries")
    if edit == "unknown option":
        panel["options"]["legend"] = {
            "displayMode": "list",
            "placement": "bottom",
            "showLegend": True,
            "colour": 1,
        }
    elif edit == "wrong type":
        panel["options"]["legend"] = {"displayMode": "list", "placement": "bottom", "showLegend": "yes"}
    elif edit == "unknown query key":
        panel["targets"][0]["exprr"] = panel["targets"][0]["expr"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(board))
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("unknown option", "options.legend"),
        ("wrong type", "options.legend"),
        ("unknown query key", "exprr"),
    ],
)
def test_a_dashboard_grafana_would_misread_is_reported(tmp_path: Path, edit: str, expected: str) -> None:
    path = _broken_copy(tmp_path, edit)
    problems = validate([path])
    assert problems, f"{edit} passed the schema"
    assert all(line.startswith(f"{path}: ") for line in problems)
    assert any(expected in line for line in problems), problems
