"""Every command the operator renders for the fireflyer engine is one the `fireflyer` CLI accepts:
no pod is started with a program or a flag we do not ship."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.cli import build_parser
from fireflyer.operator.inference import children
from fireflyer.operator.inference.engines import UnitContext, shell_line

REPO = Path(__file__).resolve().parents[2]
SAMPLES = ["manifests/samples/inference-deepseek-v3.yaml", "manifests/samples/small/inference.yaml"]


def _engine_argv(line: str) -> list[str]:
    """The argv after `exec` in the container's shell line, with the pod's rank filled in."""
    command = line.split("; exec ", 1)[1]
    return [arg.replace("$RANK", "0") for arg in shlex.split(command)]


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("extra", [{}, {"kvCache": None}, {"eplb": {"mode": "off"}}])
def test_serve_command_parses(sample: str, role: str, extra: dict[str, object]) -> None:
    doc = yaml.safe_load((REPO / sample).read_text())
    doc = copy.deepcopy(doc)
    doc["spec"]["engine"] = {"kind": "fireflyer"}
    for key, value in extra.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    model = InferenceDeployment.model_validate(doc)
    spec, name = model.spec, model.metadata.name
    unit = UnitContext(name, role, 0, children.leader_host(name, role, 0, "default"), "mlx5_0")
    argv = _engine_argv(shell_line(spec, getattr(spec, role), unit))
    assert argv[:2] == ["fireflyer", "serve"]
    args = build_parser().parse_args(argv[1:])  # argparse exits on an unknown flag or bad value
    assert args.command == "serve"
    assert args.model == spec.model.source
    assert args.served_model_name == spec.model.name
    assert args.role == role
    assert args.nnodes == getattr(spec, role).nodes_per_unit
