"""The command line: plan offline, EPLB offline, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fireflyer.cli import main
from fireflyer.eplb.synthetic import zipf_load

REPO = Path(__file__).resolve().parents[2]


def test_plan_prints_each_unit_and_fails_when_something_does_not_fit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sample = str(REPO / "manifests/samples/inference-deepseek-v3.yaml")
    assert main(["plan", "-f", sample, "--topology", "deepseek"]) == 0
    out = capsys.readouterr().out
    assert "decode-0 → spine" in out and "prefill-3 → leaf" in out
    assert main(["plan", "-f", sample, "--topology", "small"]) == 1
    assert "decode-0: cannot place: needs 18 nodes" in capsys.readouterr().out


def test_eplb_rebalance_writes_a_placement(tmp_path: Path) -> None:
    load = tmp_path / "load.npy"
    np.save(load, zipf_load(58, 256, 0.9, np.random.default_rng(0)))
    out = tmp_path / "p.json"
    assert (
        main(
            [
                "eplb",
                "rebalance",
                "--load",
                str(load),
                "--slots",
                "288",
                "--groups",
                "8",
                "--nodes",
                "4",
                "--gpus",
                "32",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert len(result["phy2log"]) == 58 and len(result["phy2log"][0]) == 288
    assert result["balancednessAfter"] > result["balancednessBefore"]
    xp = tmp_path / "xp.json"
    assert (
        main(
            [
                "eplb",
                "rebalance",
                "--load",
                str(load),
                "--slots",
                "288",
                "--groups",
                "8",
                "--nodes",
                "4",
                "--gpus",
                "32",
                "--out",
                str(xp),
                "--expert-placement",
                "deepseek-v3/prefill",
            ]
        )
        == 0
    )
    doc = json.loads(xp.read_text())
    assert doc["kind"] == "ExpertPlacement" and doc["spec"]["slotsPerGpu"] == 9


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load = tmp_path / "load.npy"
    np.save(load, np.ones((2, 16)))
    code = main(
        [
            "eplb",
            "rebalance",
            "--load",
            str(load),
            "--slots",
            "18",
            "--groups",
            "4",
            "--nodes",
            "2",
            "--gpus",
            "4",
            "--out",
            str(tmp_path / "x.json"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fireflyer: error:") and "divisible by num_gpus" in err
    assert main(["dev", "up", "--topology", "nope", "--state-dir", str(tmp_path / "s")]) == 2
    assert "unknown topology 'nope'" in capsys.readouterr().err
