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

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "charts" / "fireflyer"


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


def chart_rbac(release: str, namespace: str, *values: str) -> list[dict[str, Any]]:
    """The chart's ServiceAccount and RBAC objects, rendered by `helm template` with `values`
    (`key=value`, as --set takes them)."""
    from fireflyer.dev import build

    sets = [arg for value in values for arg in ("--set", value)]
    rendered = subprocess.run(
        [str(build.ensure_binaries() / "helm"), "template", release, str(CHART), "--namespace", namespace,
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml", *sets],
        capture_output=True, text=True,
    )  # fmt: skip
    if rendered.returncode != 0:
        raise AssertionError(f"helm template failed: {rendered.stderr}")
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def service_account_kubeconfig(cluster: Kube, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig for the API server of `cluster` that authenticates as ServiceAccount
    namespace/name, with a token from the TokenRequest API (what a pod of it would get)."""
    token = cluster.with_namespace(namespace).run("create", "token", name, "--duration=48h")
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [server],
        "users": [{"name": user, "user": {"token": token.stdout.strip()}}],
        "contexts": [{"name": user, "context": {"cluster": server["name"], "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def operator_identity(
    cluster: Kube, workdir: Path, release: str, namespace: str, *values: str
) -> tuple[Path, str]:
    """Install the chart's ServiceAccount and RBAC as release `release` in `namespace` (created
    if missing) and return (a kubeconfig that acts as that ServiceAccount, its name): the
    operator under test then has exactly the chart's permissions, no more."""
    if not cluster.with_namespace(namespace).exists("namespace", namespace):
        cluster.run("create", "namespace", namespace, namespaced=False, check=False)
    objects = chart_rbac(release, namespace, *values)
    # Not `-n`: a Role may live in the watched namespace rather than the release's.
    manifest = yaml.safe_dump_all(objects)
    cluster.run("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=manifest, namespaced=False)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    kubeconfig = service_account_kubeconfig(cluster, namespace, account, workdir / f"{release}.kubeconfig")
    return kubeconfig, account
