"""One operator on a large simulated fabric: the DeepSeek-V3 sample plus D small
InferenceDeployments (prefill 1 node, decode 2 nodes) applied at once.

Reports the time until every deployment is Ready, the operator's resident memory over time, the
reconcile latency p50/p99 (from its Prometheus histogram), API requests per reconcile (its own
counter, and the API server's apiserver_request_total of every client), the units it recreated
("recreated unit" log lines; must be 0), handler exceptions (must be 0), how long it takes to
exit after SIGTERM, where the reconciles' time went (per phase: lock waits, reads, plan, writes),
the latency of the controllers' API requests by verb, how long new deployments' first passes
waited on their queue, and the operator's "slow reconcile" lines.

Usage: python -m bench.operator.bench_scale --nodes 2048 --deployments 100 [--port-base 30580]
       [--hold 30] [--timeout 600] [--profile DIR]
Starts its own cluster (`fireflyer dev up --topology FILE`, state in a temporary directory) and
brings it down at the end. --profile records the operator with py-spy (when on PATH) into DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.operator import bench_operator
from bench.operator.bench_operator import cpu_seconds, kubectl, rss_mb
from fireflyer.dev import cluster, demo
from fireflyer.dev.topology import fabric_topology

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "manifests/samples/inference-deepseek-v3.yaml"
KIND = "InferenceDeployment"
SLOW = "slow InferenceDeployment reconcile"
HANDLER_FAILURE = re.compile(r"failed with an exception|Traceback \(most recent call last\)")


def small_deployment(i: int) -> dict[str, Any]:
    """bench_operator's small deployment (prefill 1 node, decode 2 nodes), named for 100s of them."""
    doc: dict[str, Any] = bench_operator.small_deployment(i)
    doc["metadata"] = {"name": f"svc-{i:03d}", "namespace": "default"}
    return doc


def deepseek_sample() -> dict[str, Any]:
    """The DeepSeek-V3 sample without its KV cache on 3FS (no ThreeFSCluster runs here)."""
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"]["namespace"] = "default"
    doc["spec"].pop("kvCache", None)
    return doc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the operator's metrics endpoint, by sample name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """A quantile from cumulative histogram buckets (upper bound, count), interpolated linearly
    within the bucket it falls in (as Prometheus' histogram_quantile)."""
    buckets = sorted(buckets)
    count = buckets[-1][1] if buckets else 0.0
    if count == 0:
        return float("nan")
    rank = q * count
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return lower
            inside = cumulative - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, cumulative
    return lower


def reconcile_buckets(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[float, float]]:
    name = "fireflyer_reconcile_duration_seconds_bucket"

    def by_le(samples: dict[str, Any]) -> dict[float, float]:
        return {float(lab["le"]): v for lab, v in samples.get(name, []) if lab.get("kind") == KIND}

    first, last = by_le(before), by_le(after)
    return [(le, last[le] - first.get(le, 0.0)) for le in last]


def _buckets(samples: dict[str, Any], name: str, labels: dict[str, str]) -> dict[float, float]:
    bucket = samples.get(f"{name}_bucket", [])
    return {float(lab["le"]): v for lab, v in bucket if all(lab.get(k) == x for k, x in labels.items())}


def histogram_summary(
    before: dict[str, Any], after: dict[str, Any], name: str, label: str, **fixed: str
) -> dict[str, dict[str, float]]:
    """Per value of `label` of histogram `name` over the run: count, mean, p50 and p99 (s)."""
    summary: dict[str, dict[str, float]] = {}
    values = {
        lab[label]
        for lab, _ in after.get(f"{name}_count", [])
        if all(lab.get(k) == v for k, v in fixed.items())
    }
    for value in sorted(values):
        labels = {**fixed, label: value}
        count = total(after, f"{name}_count", **labels) - total(before, f"{name}_count", **labels)
        seconds = total(after, f"{name}_sum", **labels) - total(before, f"{name}_sum", **labels)
        if count <= 0:
            continue

        first, last = _buckets(before, name, labels), _buckets(after, name, labels)
        buckets = [(le, last[le] - first.get(le, 0.0)) for le in last]
        summary[value] = {
            "count": int(count),
            "mean_s": round(seconds / count, 3),
            "p50_s": round(quantile(buckets, 0.5), 3),
            "p99_s": round(quantile(buckets, 0.99), 3),
        }
    return summary


def apiserver_requests(kubeconfig: Path) -> float:
    text = kubectl(kubeconfig, "get", "--raw", "/metrics")
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "apiserver_request_total"
    )


def ready_names(kubeconfig: Path) -> set[str]:
    items = json.loads(kubectl(kubeconfig, "get", "infd", "-A", "-o", "json"))["items"]
    ready = set()
    for item in items:
        conditions = {c["type"]: c["status"] for c in (item.get("status") or {}).get("conditions", [])}
        if conditions.get("Ready") == "True":
            ready.add(item["metadata"]["name"])
    return ready


@dataclass
class MemorySampler:
    pid: int
    interval: float = 2.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        started = time.monotonic()

        def loop() -> None:
            while not self._stop.is_set():
                self.samples.append((round(time.monotonic() - started, 1), round(rss_mb(self.pid), 1)))
                self._stop.wait(self.interval)

        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def start_operator(
    kubeconfig: Path, log: Path, metrics_port: int, source: Path | None
) -> subprocess.Popen[bytes]:
    """`fireflyer operator --all-namespaces --standalone`, from this checkout or from `source`."""
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    if source is not None:
        env["PYTHONPATH"] = str(source)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fireflyer.cli", "operator", "--all-namespaces", "--standalone"]
    command += ["--metrics-port", str(metrics_port), "--health-port", "0"]
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=source
        )


def wait_metrics(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            scrape(port)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the operator's metrics endpoint :{port} did not come up")


def run_scale(
    nodes: int,
    deployments: int,
    port_base: int,
    *,
    hold: float = 30.0,
    timeout: float = 600.0,
    state_dir: Path | None = None,
    operator_source: Path | None = None,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Bring a cluster up, run the scenario, bring it down; the measured numbers."""
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="fireflyer-scale-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    topology_file = state_dir / "topology.yaml"
    topology_file.write_text(yaml.safe_dump(fabric_topology(nodes), sort_keys=False))
    t_up = time.monotonic()
    state = cluster.up(state_dir, str(topology_file), port_base)
    result: dict[str, Any] = {"nodes": nodes, "deployments": deployments + 1, "cluster_up_s": 0.0}
    result["cluster_up_s"] = round(time.monotonic() - t_up, 1)
    kc = state.kubeconfig
    log = state_dir / "logs" / "operator.log"
    operator: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    try:
        demo.install_crds(kc)
        port = free_port()
        operator = start_operator(kc, log, port, operator_source)
        wait_metrics(port)
        memory = MemorySampler(operator.pid)
        memory.start()
        spy = shutil.which("py-spy")
        if profile_dir is not None and spy:
            profile_dir.mkdir(parents=True, exist_ok=True)
            output = profile_dir / "operator.speedscope.json"
            command = [spy, "record", "--pid", str(operator.pid), "--rate", "50", "--threads"]
            command += ["--format", "speedscope", "--output", str(output), "--nonblocking"]
            profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        docs = [deepseek_sample()] + [small_deployment(i) for i in range(deployments)]
        names = {d["metadata"]["name"] for d in docs}
        metrics_before, api_before = scrape(port), apiserver_requests(kc)
        cpu_before = cpu_seconds(operator.pid)
        started = time.monotonic()
        kubectl(kc, "apply", "--server-side", "-f", "-", stdin=yaml.safe_dump_all(docs))
        ready: set[str] = set()
        while time.monotonic() - started < timeout:
            ready = ready_names(kc) & names
            if ready == names:
                break
            time.sleep(2)
        all_ready_s = time.monotonic() - started
        result["ready"] = len(ready)
        result["all_ready_s"] = round(all_ready_s, 1) if ready == names else None
        metrics_ready = scrape(port)
        time.sleep(hold)  # resync rounds with everything in place
        metrics_after, api_after = scrape(port), apiserver_requests(kc)
        cpu_used = cpu_seconds(operator.pid) - cpu_before
        steady = reconcile_buckets(metrics_ready, metrics_after)
        reconciles = total(metrics_after, "fireflyer_reconcile_total", kind=KIND) - total(
            metrics_before, "fireflyer_reconcile_total", kind=KIND
        )
        ours = total(metrics_after, "fireflyer_api_requests_total") - total(
            metrics_before, "fireflyer_api_requests_total"
        )
        buckets = reconcile_buckets(metrics_before, metrics_after)
        plan_sum = total(metrics_after, "fireflyer_plan_duration_seconds_sum", kind=KIND)
        plan_count = total(metrics_after, "fireflyer_plan_duration_seconds_count", kind=KIND)
        memory.stop()
        rss = [mb for _, mb in memory.samples if not math.isnan(mb)]
        result |= {
            "reconciles": int(reconciles),
            "reconcile_p50_s": round(quantile(buckets, 0.5), 3),
            "reconcile_p99_s": round(quantile(buckets, 0.99), 3),
            "steady_reconciles": int(max((c for _, c in steady), default=0)),
            "steady_reconcile_p50_s": round(quantile(steady, 0.5), 3),
            "steady_reconcile_p99_s": round(quantile(steady, 0.99), 3),
            "plan_mean_ms": round(1e3 * plan_sum / plan_count, 2) if plan_count else None,
            "operator_api_requests_per_reconcile": round(ours / reconciles, 1) if reconciles else None,
            "apiserver_requests_all_clients": int(api_after - api_before),
            # The operator's user + system CPU from the apply to the end of the hold.
            "operator_cpu_s": round(cpu_used, 1),
            "phases": histogram_summary(
                metrics_before, metrics_after, "fireflyer_reconcile_phase_seconds", "phase", kind=KIND
            ),
            # New deployments' first passes wait on their own queue before they start.
            "creation_queue_seconds": histogram_summary(
                metrics_before, metrics_after, "fireflyer_reconcile_queue_seconds", "kind"
            ),
            "api_request_seconds": histogram_summary(
                metrics_before, metrics_after, "fireflyer_api_request_duration_seconds", "verb"
            ),
            "rss_start_mb": rss[0] if rss else None,
            "rss_peak_mb": max(rss) if rss else None,
            "rss_end_mb": rss[-1] if rss else None,
            "rss_over_time_mb": memory.samples[:: max(1, len(memory.samples) // 20)],
        }
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        signalled = time.monotonic()
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=30)
            result["sigterm_to_exit_s"] = round(time.monotonic() - signalled, 2)
        except subprocess.TimeoutExpired:
            result["sigterm_to_exit_s"] = None
        text = log.read_text(errors="replace")
        result["units_recreated"] = sum("recreated unit" in line for line in text.splitlines())
        result["handler_exceptions"] = sum(bool(HANDLER_FAILURE.search(line)) for line in text.splitlines())
        result["slow_reconciles"] = [line.split("slow ", 1)[1] for line in text.splitlines() if SLOW in line]
        return result
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
        if operator is not None and operator.poll() is None:
            operator.kill()
            operator.wait()
        cluster.down(state_dir, quiet=True, keep_logs=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=512)
    parser.add_argument("--deployments", type=int, default=20)
    parser.add_argument("--port-base", type=int, default=30580)
    parser.add_argument("--hold", type=float, default=30.0, help="seconds to keep running once all are Ready")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--operator-source", type=Path, default=None, help="run the operator from this tree")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy profile into this directory")
    args = parser.parse_args()
    result = run_scale(
        args.nodes,
        args.deployments,
        args.port_base,
        hold=args.hold,
        timeout=args.timeout,
        state_dir=args.state_dir,
        operator_source=args.operator_source,
        profile_dir=args.profile,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
