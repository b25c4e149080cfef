"""`fireflyer demo`: the local cluster, the CRDs, the operator and the small samples, with a live
table of the resources until they settle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
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


TINY_MODEL = Path("/var/tmp/fireflyer/models/tiny")
CPU_INFERENCE = "tiny-cpu"
CPU_TRAINING = "tiny-train-cpu"
LOCAL_NODES = 4


STAMP = ".fireflyer-stamp"


def _model_stamp() -> str:
    """What the tiny checkpoint is made from: a model written by another version is rewritten."""
    from fireflyer.workloads.model.presets import get_preset
    from fireflyer.workloads.model.tokenizer_files import build_tokenizer

    material = json.dumps(get_preset("tiny"), sort_keys=True) + build_tokenizer().to_str()
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def ensure_tiny_model(path: Path = TINY_MODEL) -> Path:
    """The CPU samples' model, written by `fireflyer model init` (random weights, deterministic)
    when it is missing or was written from another preset or tokenizer."""
    stamp = _model_stamp()
    if not (path / "config.json").exists() or _read(path / STAMP) != stamp:
        init = ["model", "init", "--preset", "tiny", "--force", "--out", str(path)]
        subprocess.run([sys.executable, "-m", "fireflyer.cli", *init], check=True, capture_output=True)
        (path / STAMP).write_text(stamp)
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


DEMO_DATA = Path("/var/tmp/fireflyer/data/docs")
DEMO_CHECKPOINTS = Path("/var/tmp/fireflyer/checkpoints")


def ensure_docs_dataset(model: Path = TINY_MODEL, out: Path = DEMO_DATA) -> Path:
    """The CPU training sample's data: this repository's documentation, tokenized with the tiny
    model's tokenizer into the trainer's shard format (written once)."""
    docs = sorted([build.REPO_ROOT / "README.md", *(build.REPO_ROOT / "docs").glob("*.md")])
    content = hashlib.sha256(b"".join(p.read_bytes() for p in docs)).hexdigest()[:16]
    stamp = f"{_read(model / STAMP)}:{content}"
    if (out / "index.json").exists() and _read(out / STAMP) == stamp:
        return out
    from tokenizers import Tokenizer

    from fireflyer.workloads.train.data import write_shards

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = [p.read_text() for p in docs]
    eos = json.loads((model / "config.json").read_text()).get("eos_token_id")
    shutil.rmtree(out, ignore_errors=True)
    write_shards((e.ids for e in tokenizer.encode_batch(texts)), out, eos_id=eos)
    (out / STAMP).write_text(stamp)
    return out


def _detail(item: dict[str, Any], ready: dict[str, Any], others: str) -> str:
    status: dict[str, Any] = item.get("status") or {}
    if item["kind"] == "InferenceDeployment" and status:
        balance = status.get("balancedness")
        extra = f" balancedness {balance:.2f}" if isinstance(balance, int | float) else ""
        return f"prefill {status.get('prefillReady', '-')} decode {status.get('decodeReady', '-')}{extra}"
    if item["kind"] == "TrainingJob" and status.get("step") is not None:
        loss = status.get("loss")
        shown = f"{loss:.3f}" if isinstance(loss, int | float) else "-"
        return f"step {status['step']} loss {shown} restarts {status.get('restarts', 0)}"
    return str(ready.get("message") or others or "accepted (no status yet)")


def _rows(kubeconfig: Path) -> list[tuple[str, str, str, str]]:
    listing = json.loads(_kubectl(kubeconfig, "get", "fireflyer", "-A", "-o", "json"))
    rows = []
    for item in listing.get("items", []):
        status: dict[str, Any] = item.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        ready = conditions.get("Ready", {})
        others = " ".join(f"{t}={c['status']}" for t, c in sorted(conditions.items()) if t != "Ready")
        rows.append(
            (
                f"{item['kind']}/{item['metadata']['name']}",
                ready.get("status", "-"),
                ready.get("reason", ""),
                _detail(item, ready, others)[:90],
            )
        )
    return sorted(rows)


def _print_table(rows: list[tuple[str, str, str, str]], elapsed: float, notes: list[str]) -> None:
    if sys.stdout.isatty():
        print("\033[2J\033[H", end="")
    print(f"fireflyer demo — {elapsed:5.1f}s")
    print(f"{'RESOURCE':48} {'READY':6} {'REASON':22} DETAIL")
    for name, ready, reason, detail in rows:
        print(f"{name:48} {ready:6} {reason:22} {detail}")
    for line in notes:
        print(line)
    print(flush=True)


def router_url(kubeconfig: Path, name: str = CPU_INFERENCE, namespace: str = "default") -> str | None:
    """The router's address once the deployment is Ready and its load balancer has one."""
    try:
        item = json.loads(_kubectl(kubeconfig, "get", "infd", name, "-n", namespace, "-o", "json"))
    except cluster.ClusterError:
        return None
    status = item.get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
    url = (status.get("endpoints") or {}).get("router", "")
    return url if ready and "://127." in url else None


def chat(url: str, prompt: str, model: str = "fireflyer-tiny", max_tokens: int = 24) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    return str(answer["choices"][0]["message"]["content"])


def _sample_files(local: bool) -> list[Path]:
    """Every small sample; the CPU ones only when local nodes can run them."""
    return sorted(p for p in SAMPLES.glob("*.yaml") if local or "cpu" not in p.name)


def run(state_dir: Path, topology: str, timeout: float, settle_seconds: float = 8.0) -> int:
    started = time.monotonic()
    local = os.geteuid() == 0
    notes: list[str] = []
    if not local:
        notes.append(
            "not root: no local nodes, so the CPU samples (real engine, router, trainer) are skipped"
        )
    else:
        ensure_docs_dataset(ensure_tiny_model())
        # A fresh run each time: the job would otherwise resume its finished last run.
        shutil.rmtree(DEMO_CHECKPOINTS / CPU_TRAINING, ignore_errors=True)
    state = cluster.up(state_dir, topology, local_nodes=LOCAL_NODES if local else 0, play_threefs=True)
    kubeconfig = state.kubeconfig
    install_crds(kubeconfig)
    start_operator(state)
    for sample in _sample_files(local):
        _kubectl(kubeconfig, "apply", "--server-side", "-n", "default", "-f", str(sample))
    answered = not local
    last: list[tuple[str, str, str, str]] = []
    stable_since = time.monotonic()
    while time.monotonic() - started < timeout:
        if not answered:
            url = router_url(kubeconfig)
            if url is not None:
                prompt = "Hello! Who are you?"
                reply = chat(url, prompt)
                notes += [
                    f"first completion after {time.monotonic() - started:.1f}s through {url} "
                    "(random weights: the words are noise, the path is real):",
                    f"  user: {prompt}",
                    f"  fireflyer-tiny: {reply!r}",
                    f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
                    '         -d \'{"model": "fireflyer-tiny", "messages": '
                    '[{"role": "user", "content": "Hi"}]}\'',
                ]
                answered, last = True, []
        rows = _rows(kubeconfig)
        if rows != last:
            _print_table(rows, time.monotonic() - started, notes)
            last, stable_since = rows, time.monotonic()
        all_ready = rows and all(r[1] == "True" or r[0].startswith("ExpertPlacement/") for r in rows)
        # A file system still bootstrapping keeps moving through admin steps: keep watching it.
        bootstrapping = any(r[2] == "Bootstrapping" for r in rows)
        settled = time.monotonic() - stable_since > settle_seconds and not bootstrapping
        # The CPU training job is watched to its end: its step and loss are the show.
        training = not local or any(
            r[0] == f"TrainingJob/{CPU_TRAINING}"
            and r[2] in ("JobSucceeded", "JobFailed", "MaxRestartsExceeded")
            for r in rows
        )
        if answered and training and (all_ready or settled):
            break
        time.sleep(1.0)
    if time.monotonic() - started >= timeout:
        print(
            f"still moving after {timeout:.0f}s (raise --timeout to watch longer); the cluster keeps running:"
        )
    else:
        print(f"settled after {time.monotonic() - started:.1f}s; the cluster keeps running:")
    print(f"  export KUBECONFIG={kubeconfig}")
    print("  kubectl get fireflyer -A        # the resources")
    if local:
        print(f"  kubectl get infd {CPU_INFERENCE} -o jsonpath='{{.status.endpoints.router}}'  # router URL")
        print("  kubectl logs -l fireflyer.dev/deployment=tiny-cpu --all-containers   # the engines' logs")
    print(f"  fireflyer dev down --state-dir {state_dir}   # stop everything")
    return 0
