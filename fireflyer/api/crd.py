"""CustomResourceDefinitions generated from the pydantic models (the single source of truth)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from fireflyer.api.base import GROUP, VERSION
from fireflyer.api.kinds import BY_KIND, CATEGORY, KINDS, Kind
from fireflyer.dev.build import REPO_ROOT

DEFAULT_OUT_DIRS = (REPO_ROOT / "crds", REPO_ROOT / "charts" / "fireflyer" / "crds")

# Keys pydantic emits that a structural schema does not take.
_DROP = {"title", "examples", "$defs", "discriminator"}
_RULES = "x-kubernetes-validations"


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        rules = target.get(_RULES, []) + extra.pop(_RULES, [])
        target.update(extra)
        if rules:
            target[_RULES] = rules
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    """Turn pydantic's JSON schema into a Kubernetes structural schema."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: v for k, v in node.items() if k not in _DROP}
    if isinstance(node.get("description"), str):
        node["description"] = " ".join(node["description"].split())  # docstrings wrap lines
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        # Optional[X] is anyOf [X, null]: a field that may be absent, never a null value.
        variants = [v for v in any_of if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"unions other than Optional are not structural: {any_of}")
        merged = dict(variants[0])
        merged.update(node)
        if merged.get("default", "absent") is None:
            merged.pop("default")
        return _structural(merged)
    if node.get("type") == "object" and "properties" not in node:
        additional = node.get("additionalProperties")
        if additional in (True, None, {}) and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") == "object":
        node.pop("additionalProperties", None)
    result = {k: _structural(v) for k, v in node.items() if k not in ("properties",)}
    if "properties" in node:
        result["properties"] = {name: _structural(prop) for name, prop in node["properties"].items()}
    return result


def _model_schema(kind: Kind, part: str) -> dict[str, Any]:
    field = kind.model.model_fields[part]
    annotation = field.annotation
    args = getattr(annotation, "__args__", None)
    model = next(a for a in args if a is not type(None)) if args else annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{kind.kind}.{part} is not a model")
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


def openapi_schema(kind: Kind) -> dict[str, Any]:
    spec = _model_schema(kind, "spec")
    status = _model_schema(kind, "status")
    return {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(kind: Kind) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "fireflyer"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, **({"scale": kind.scale} if kind.scale else {})},
                    "additionalPrinterColumns": kind.printer_columns,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    header = "# Generated by `fireflyer crds` from fireflyer/api; do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=100, allow_unicode=True)


def file_name(kind: Kind) -> str:
    return f"{GROUP}_{kind.plural}.yaml"


def kopf_peering_crds() -> list[dict[str, Any]]:
    """kopf's peering kinds, through which operator replicas agree on the active one."""
    docs = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = kind.lower() + "s"
        docs.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {
                    "name": f"{plural}.kopf.dev",
                    "labels": {"app.kubernetes.io/part-of": "fireflyer"},
                },
                "spec": {
                    "group": "kopf.dev",
                    "scope": scope,
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                    "properties": {
                                        "status": {
                                            "type": "object",
                                            "x-kubernetes-preserve-unknown-fields": True,
                                        }
                                    },
                                }
                            },
                        }
                    ],
                },
            }
        )
    return docs


PEERING_FILE = "kopf.dev_peerings.yaml"


def rendered(kustomization: bool = False) -> dict[str, str]:
    """File name → content. The repository's crds/ also gets a kustomization.yaml so that
    kustomize bases can include it; a Helm chart's crds/ must hold only CRDs."""
    files = {file_name(kind): render(kind) for kind in KINDS}
    files[PEERING_FILE] = (
        "# Generated by `fireflyer crds`: kopf's peering kinds; do not edit.\n"
        + yaml.safe_dump_all(kopf_peering_crds(), sort_keys=False)
    )
    if kustomization:
        names = "".join(f"  - {name}\n" for name in files)
        files["kustomization.yaml"] = (
            "# Generated by `fireflyer crds`; do not edit.\n"
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n{names}"
        )
    return files


def _is_chart(out: Path) -> bool:
    return (out.parent / "Chart.yaml").is_file()


def write(out_dirs: list[Path]) -> list[Path]:
    written = []
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in rendered(kustomization=not _is_chart(out)).items():
            path = out / name
            path.write_text(text)
            written.append(path)
    return written


def stale(out_dirs: list[Path]) -> list[str]:
    """Files that differ from what the models generate (or are missing / extra)."""
    problems = []
    for out in out_dirs:
        expected = rendered(kustomization=not _is_chart(out))
        for name, text in expected.items():
            path = out / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.read_text() != text:
                problems.append(f"{path}: differs from the models")
        if out.is_dir():
            for path in out.glob("*.yaml"):
                if path.name not in expected:
                    problems.append(f"{path}: not generated by any model")
    return problems


@functools.cache
def part_schema(kind_name: str, part: str) -> dict[str, Any]:
    """The structural schema of one kind's `spec` or `status`, as its CRD carries it."""
    return _model_schema(BY_KIND[kind_name], part)
