"""Test helpers around kubectl against the local control plane."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Kube:
    kubeconfig: Path
    namespace: str = "default"

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, namespaced: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["kubectl", "--kubeconfig", str(self.kubeconfig)]
        if namespaced:
            cmd += ["-n", self.namespace]
        result = subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def apply(
        self, manifest: str | dict[str, Any] | list[dict[str, Any]], *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if isinstance(manifest, dict):
            text = yaml.safe_dump(manifest)
        elif isinstance(manifest, list):
            text = yaml.safe_dump_all(manifest)
        else:
            text = manifest
        return self.run(
            "apply", "--server-side", "--force-conflicts", "-f", "-", *extra, stdin=text, check=check
        )

    def get(
        self, kind: str, name: str | None = None, *, selector: str | None = None, namespaced: bool = True
    ) -> Any:
        args = ["get", kind, "-o", "json"]
        if name:
            args.insert(2, name)
        if selector:
            args += ["-l", selector]
        return json.loads(self.run(*args, namespaced=namespaced).stdout)

    def exists(self, kind: str, name: str) -> bool:
        return self.run("get", kind, name, check=False).returncode == 0

    def with_namespace(self, namespace: str) -> Kube:
        return Kube(self.kubeconfig, namespace)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll until check() returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def condition(obj: dict[str, Any], cond_type: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == cond_type:
            return dict(cond)
    return None


def fresh_namespace(cluster: Kube, base: str, *delete_flags: str) -> Iterator[Kube]:
    """A namespace of its own (for a test or a module), deleted afterwards with everything in it;
    delete_flags default to waiting up to 90 s, so that the next test finds the GPUs free."""
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    cluster.run("create", "namespace", name, namespaced=False)
    ns = cluster.with_namespace(name)
    wait_for(f"the default ServiceAccount in {name}", lambda: ns.exists("serviceaccount", "default"))
    try:
        yield ns
    finally:
        flags = delete_flags or ("--timeout=90s",)
        cluster.run("delete", "namespace", name, *flags, namespaced=False, check=False)
