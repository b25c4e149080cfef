"""The operator on the 256-node `deepseek` dev cluster: kubectl apply → Ready for the DeepSeek-V3
sample, and the operator's resident memory with 50 deployments.

Usage: python bench/operator/bench_operator.py [--deployments 50]
Starts its own cluster (state in a temporary directory) and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from fireflyer.dev import cluster, demo, operator_process

REPO = Path(__file__).resolve().parents[2]


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far; NaN once the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB; NaN once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def small_deployment(i: int) -> dict:
    role = {
        "units": 1,
        "nodesPerUnit": 1,
        "gpusPerNode": 8,
        "parallelism": {"tensor": 1, "data": 8, "expert": 8},
    }
    return {
        "apiVersion": "fireflyer.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": f"svc-{i:02d}"},
        "spec": {
            "model": {"name": f"m{i}", "source": "/3fs/stage/models/m"},
            "prefill": role,
            "decode": {**role, "nodesPerUnit": 2, "parallelism": {"tensor": 1, "data": 16, "expert": 16}},
            "router": {"replicas": 1},
        },
    }


def wait_ready(kubeconfig: Path, names: list[str], timeout: float) -> float:
    started = time.monotonic()
    pending = set(names)
    while pending and time.monotonic() - started < timeout:
        items = json.loads(kubectl(kubeconfig, "get", "infd", "-o", "json"))["items"]
        for item in items:
            conds = {c["type"]: c["status"] for c in (item.get("status") or {}).get("conditions", [])}
            if conds.get("Ready") == "True":
                pending.discard(item["metadata"]["name"])
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"not Ready after {timeout}s: {sorted(pending)[:5]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=50)
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="fireflyer-bench-"))
    state = cluster.up(state_dir, "deepseek", 29380)
    kc = state.kubeconfig
    operator = None
    try:
        demo.install_crds(kc)
        operator = operator_process.start(kc, state_dir / "logs" / "operator.log")
        time.sleep(3)
        t0 = time.monotonic()
        kubectl(
            kc, "apply", "--server-side", "-f", str(REPO / "manifests/samples/inference-deepseek-v3.yaml")
        )
        wait_ready(kc, ["deepseek-v3"], 120)
        ready_s = time.monotonic() - t0
        kubectl(kc, "delete", "infd", "deepseek-v3", "--wait=true")
        time.sleep(3)
        docs = [small_deployment(i) for i in range(args.deployments)]
        t1 = time.monotonic()
        kubectl(kc, "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs))
        wait_ready(kc, [d["metadata"]["name"] for d in docs], 600)
        many_s = time.monotonic() - t1
        time.sleep(15)  # a few resync rounds with everything in place
        rss = rss_mb(operator.pid)
        result = {
            "deepseek_sample_apply_to_ready_s": round(ready_s, 2),
            "deployments": args.deployments,
            "deployments_apply_to_all_ready_s": round(many_s, 1),
            "operator_rss_mb": round(rss, 1),
        }
        print(f"DeepSeek-V3 sample (4×4 + 2×18 nodes) apply → Ready: {ready_s:.2f} s")
        print(f"{args.deployments} deployments apply → all Ready: {many_s:.1f} s")
        print(f"operator resident memory with {args.deployments} deployments: {rss:.1f} MB")
        print(json.dumps(result))
    finally:
        try:
            if operator:
                operator.terminate()
                operator.wait(timeout=30)
        finally:
            if operator and operator.poll() is None:
                operator.kill()
            cluster.down(state_dir, quiet=True)


if __name__ == "__main__":
    main()
