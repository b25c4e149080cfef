"""`fireflyer demo`: the local cluster, the CRDs, the operator and the small samples, with a live
table of the resources until they settle."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fireflyer.dev import build, cluster, operator_process, processes

SAMPLES = build.REPO_ROOT / "manifests" / "samples" / "small"
CRDS = build.REPO_ROOT / "crds"


def _kubectl(kubeconfig: Path, *args: str) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise cluster.ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def install_crds(kubeconfig: Path) -> None:
    """Apply crds/ (through its kustomization) and wait until every CRD is Established."""
    _kubectl(kubeconfig, "apply", "--server-side", "-k", str(CRDS))
    _kubectl(
        kubeconfig,
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=fireflyer",
    )


def start_operator(state: cluster.State) -> int:
    """Run the operator from this checkout against the dev cluster; `dev down` stops it."""
    existing = state.pids.get("fireflyer")
    if existing and processes.is_ours(existing, Path(sys.executable).resolve().name):
        return existing
    proc = operator_process.start(
        state.kubeconfig, Path(state.state_dir) / "logs" / "operator.log", detach=True
    )
    state.pids["fireflyer"] = proc.pid
    state.save()
    return proc.pid


def start_admin_runner(state: cluster.State) -> int:
    """The dev cluster's stand-in for 3FS admin Job containers (fireflyer.dev.admin_runner)."""
    existing = state.pids.get("admin-runner")
    if existing and processes.is_ours(existing, Path(sys.executable).resolve().name):
        return existing
    log = Path(state.state_dir) / "logs" / "admin-runner.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fireflyer.dev.admin_runner",
                "--kubeconfig",
                str(state.kubeconfig),
                "--state-dir",
                str(Path(state.state_dir) / "threefs-sim"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state.pids["admin-runner"] = proc.pid
    state.save()
    return proc.pid


def _rows(kubeconfig: Path) -> list[tuple[str, str, str, str]]:
    listing = json.loads(_kubectl(kubeconfig, "get", "fireflyer", "-A", "-o", "json"))
    rows = []
    for item in listing.get("items", []):
        status: dict[str, Any] = item.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        ready = conditions.get("Ready", {})
        others = " ".join(f"{t}={c['status']}" for t, c in sorted(conditions.items()) if t != "Ready")
        detail = ready.get("message") or others or "accepted (no status yet)"
        rows.append(
            (
                f"{item['kind']}/{item['metadata']['name']}",
                ready.get("status", "-"),
                ready.get("reason", ""),
                detail[:90],
            )
        )
    return sorted(rows)


def _print_table(rows: list[tuple[str, str, str, str]], elapsed: float) -> None:
    if sys.stdout.isatty():
        print("\033[2J\033[H", end="")
    print(f"fireflyer demo — {elapsed:5.1f}s")
    print(f"{'RESOURCE':48} {'READY':6} {'REASON':22} DETAIL")
    for name, ready, reason, detail in rows:
        print(f"{name:48} {ready:6} {reason:22} {detail}")
    print(flush=True)


def run(state_dir: Path, topology: str, timeout: float, settle_seconds: float = 8.0) -> int:
    state = cluster.up(state_dir, topology)
    kubeconfig = state.kubeconfig
    install_crds(kubeconfig)
    start_operator(state)
    start_admin_runner(state)
    _kubectl(kubeconfig, "apply", "--server-side", "-n", "default", "-f", str(SAMPLES))
    started = time.monotonic()
    last: list[tuple[str, str, str, str]] = []
    stable_since = time.monotonic()
    while time.monotonic() - started < timeout:
        rows = _rows(kubeconfig)
        if rows != last:
            _print_table(rows, time.monotonic() - started)
            last, stable_since = rows, time.monotonic()
        all_ready = rows and all(r[1] == "True" or r[0].startswith("ExpertPlacement/") for r in rows)
        # A file system still bootstrapping keeps moving through admin steps: keep watching it.
        bootstrapping = any(r[2] == "Bootstrapping" for r in rows)
        if all_ready or (time.monotonic() - stable_since > settle_seconds and not bootstrapping):
            break
        time.sleep(1.0)
    print(f"settled after {time.monotonic() - started:.1f}s; the cluster keeps running:")
    print(f"  export KUBECONFIG={kubeconfig}")
    print("  kubectl get fireflyer -A        # the resources")
    print(f"  fireflyer dev down --state-dir {state_dir}   # stop everything")
    return 0
