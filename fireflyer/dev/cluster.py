"""`fireflyer dev up|down|status`: a loopback control plane with simulated GPU/RDMA nodes."""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fireflyer.dev import build, pki, processes, topology, volumes

DEFAULT_STATE_DIR = Path(".fireflyer") / "dev"
DEFAULT_PORT_BASE = 26380
STAGES_FILE = build.REPO_ROOT / "hack" / "kwok" / "stages.yaml"
LARGE_FABRIC_NODES = 256  # above this, node leases are renewed and judged less often
# Seconds before pods on a NotReady node are evicted. Real clusters default to 300; the dev
# cluster shortens it so that node-failure behaviour is observable in tests and demos.
NOT_READY_TOLERATION_SECONDS = 15
START_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Processes started beside the control plane (the demo's operator) are stopped first.
EXTRA_PROCESSES = ("fireflyer", "pod-runtime")


class ClusterError(RuntimeError):
    """The dev cluster could not be started or reached; the message says what to do."""


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(base, base + 1, base + 63, base + 4, base + 5, base + 6)

    def named(self) -> dict[str, int]:
        return {
            "etcd client": self.etcd_client,
            "etcd peer": self.etcd_peer,
            "kube-apiserver": self.apiserver,
            "kube-controller-manager": self.controller_manager,
            "kube-scheduler": self.scheduler,
            "kwok": self.kwok,
        }


@dataclass
class State:
    state_dir: str
    topology: str
    bin_dir: str
    ports: Ports
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    local_nodes: int = 0
    """Nodes whose pods run as processes on this machine (fireflyer.dev.runtime)."""
    play_threefs: bool = False
    """The runtime also plays the 3FS admin Jobs of the simulated nodes (a simulated 3FS)."""
    node_count: int = 0
    """Simulated nodes of the topology."""

    @property
    def network_index(self) -> int:
        """Tells this cluster's pod network apart from another dev cluster's."""
        return (self.ports.etcd_client // 1000) % 100

    @property
    def kubeconfig(self) -> Path:
        return Path(self.state_dir) / "kubeconfig"

    def save(self) -> None:
        path = Path(self.state_dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> State | None:
        path = state_dir / "state.json"
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["ports"] = Ports(**raw["ports"])
        return cls(**raw)

    def running(self) -> dict[str, bool]:
        return {
            name: processes.is_ours(pid, _binary_of(name))
            for name, pid in self.pids.items()
            if name in START_ORDER
        }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _tls_context(state_dir: Path) -> ssl.SSLContext:
    pki_dir = state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait(what: str, check: Any, timeout: float, state: State, component: str) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        pid = state.pids.get(component)
        if pid is not None and processes.exited_early(pid):
            log = Path(state.state_dir) / "logs" / f"{component}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ClusterError(f"{component} exited while waiting for {what}; log {log}:\n{tail}")
        try:
            if check():
                return
        except (OSError, ValueError) as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} ({last_error})")


def _api(state: State, path: str) -> Any:
    ctx = _tls_context(Path(state.state_dir))
    code, body = _get(f"https://127.0.0.1:{state.ports.apiserver}{path}", ctx)
    if code != 200:
        raise ValueError(f"GET {path}: HTTP {code}")
    return json.loads(body) if body.startswith(b"{") else body


def _component_args(state: State, name: str) -> list[str]:
    d = Path(state.state_dir)
    p = state.ports
    k = d / "pki"
    if name == "etcd":
        peer = f"http://127.0.0.1:{p.etcd_peer}"
        return [
            "--name=fireflyer-dev",
            f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p.etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{p.etcd_client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=fireflyer-dev={peer}",
            # A throwaway cluster: skipping fsync makes every write (and so every test) faster.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]
    if name == "kube-apiserver":
        return [
            f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={p.apiserver}",
            f"--tls-cert-file={k / 'apiserver.crt'}",
            f"--tls-private-key-file={k / 'apiserver.key'}",
            f"--client-ca-file={k / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={k / 'sa.pub'}",
            f"--service-account-signing-key-file={k / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            # The loopback address cannot be an endpoint of the `kubernetes` Service.
            "--endpoint-reconciler-type=none",
            f"--default-not-ready-toleration-seconds={NOT_READY_TOLERATION_SECONDS}",
            f"--default-unreachable-toleration-seconds={NOT_READY_TOLERATION_SECONDS}",
            "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000",
            "--v=1",
        ]
    if name == "kube-controller-manager":
        return [
            f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.controller_manager}",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={k / 'sa.key'}",
            f"--root-ca-file={k / 'ca.crt'}",
            f"--cluster-signing-cert-file={k / 'ca.crt'}",
            f"--cluster-signing-key-file={k / 'ca.key'}",
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
            # kwok renews about a dozen leases a second on two shared cores: a large fabric renews
            # less often and gets minutes before a late renewal reads as a lost node.
            f"--node-monitor-grace-period={20 if state.node_count <= LARGE_FABRIC_NODES else 600}s",
            "--node-monitor-period=2s",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--concurrent-statefulset-syncs=20",
            "--v=1",
        ]
    if name == "kube-scheduler":
        return [
            f"--kubeconfig={d / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.scheduler}",
            "--leader-elect=false",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--v=1",
        ]
    if name == "kwok":
        return [
            f"--kubeconfig={d / 'kwok.kubeconfig'}",
            f"--config={STAGES_FILE}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={topology.KWOK_ANNOTATION}=fake",
            f"--node-lease-duration-seconds={40 if state.node_count <= LARGE_FABRIC_NODES else 600}",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.240.0.1",
            f"--server-address=127.0.0.1:{p.kwok}",
        ]
    raise KeyError(name)


def _binary_of(component: str) -> str:
    """The executable name a component's pid should show (the operator runs under Python)."""
    return Path(sys.executable).resolve().name if component in EXTRA_PROCESSES else component


def _running_state(state_dir: Path) -> State | None:
    state = State.load(state_dir)
    if state is None:
        return None
    alive = state.running()
    if alive and all(alive.values()):
        return state
    return None


def up(
    state_dir: Path,
    topology_name: str,
    port_base: int = DEFAULT_PORT_BASE,
    local_nodes: int = 0,
    play_threefs: bool = False,
) -> State:
    """local_nodes: nodes whose pods really run here, beside the simulated topology (needs root).
    play_threefs: the pod runtime also plays 3FS admin Jobs against a simulated 3FS."""
    state_dir = state_dir.resolve()
    topo = topology.load(topology_name)  # validate before touching anything
    if local_nodes:
        from fireflyer.dev.runtime.network import require_privileges

        require_privileges()
    existing = _running_state(state_dir)
    if existing is not None and (existing.local_nodes or existing.play_threefs):
        pid = existing.pids.get("pod-runtime")
        if pid is None or not processes.is_ours(pid, _binary_of("pod-runtime")):
            _log("the pod runtime is not running: starting it again (its pods start again)")
            _start_runtime(existing)
    if existing is not None:
        _log(
            f"a dev cluster is already running from {state_dir} (topology {existing.topology}, "
            f"API on 127.0.0.1:{existing.ports.apiserver}); `fireflyer dev down --state-dir "
            f"{state_dir}` stops it"
        )
        return existing
    if (state_dir / "state.json").exists():
        _log(f"clearing stale state in {state_dir}")
        down(state_dir, quiet=True)
    ports = Ports.from_base(port_base)
    for component, port in ports.named().items():
        processes.ensure_free(port, component)
    bin_dir = build.ensure_binaries()
    started = time.monotonic()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = State(
        str(state_dir),
        topo.name,
        str(bin_dir),
        ports,
        started_at=time.time(),
        local_nodes=local_nodes,
        play_threefs=play_threefs,
        node_count=topo.node_count,
    )
    pki_dir = state_dir / "pki"
    pki.generate(pki_dir)
    server = f"https://127.0.0.1:{ports.apiserver}"
    (state_dir / "kubeconfig").write_text(pki.kubeconfig(server, pki_dir, "admin"))
    for client in ("controller-manager", "scheduler", "kwok"):
        (state_dir / f"{client}.kubeconfig").write_text(pki.kubeconfig(server, pki_dir, client))
    logs = state_dir / "logs"

    def launch(name: str) -> None:
        state.pids[name] = processes.start(bin_dir / name, _component_args(state, name), logs / f"{name}.log")
        state.save()

    try:
        launch("etcd")
        _wait(
            "etcd health",
            lambda: _get(f"http://127.0.0.1:{ports.etcd_client}/health")[0] == 200,
            30,
            state,
            "etcd",
        )
        launch("kube-apiserver")
        _wait(
            "the API server to be ready",
            lambda: _api(state, "/readyz") is not None,
            90,
            state,
            "kube-apiserver",
        )
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            launch(name)
        _log(f"control plane up in {time.monotonic() - started:.1f}s; creating {topo.node_count} nodes")
        _create_nodes(state, topology.nodes(topo))
        _create(state, "/apis/storage.k8s.io/v1/storageclasses", [volumes.storage_class()])
        _create(state, "/api/v1/persistentvolumes", volumes.persistent_volumes())
        _wait(
            f"{topo.node_count} simulated nodes to be Ready and untainted",
            lambda: _ready_nodes(state) >= topo.node_count,
            max(120.0, 0.25 * topo.node_count),  # kwok readies a few nodes per second on 2 cores
            state,
            "kwok",
        )
        if local_nodes or play_threefs:
            _start_runtime(state)
        if local_nodes:
            _wait(
                f"{local_nodes} local nodes to be Ready",
                lambda: _ready_nodes(state) >= topo.node_count + local_nodes,
                60,
                state,
                "pod-runtime",
            )
        _wait(
            "the default ServiceAccount",
            lambda: _api(state, "/api/v1/namespaces/default/serviceaccounts/default") is not None,
            60,
            state,
            "kube-controller-manager",
        )
    except BaseException:
        _log(f"dev cluster failed to start; component logs are in {logs}")
        down(state_dir, quiet=True, keep_logs=True)
        raise
    _log(
        f"dev cluster ready in {time.monotonic() - started:.1f}s "
        f"({topo.node_count} nodes, topology {topo.name})"
    )
    return state


def _start_runtime(state: State) -> None:
    """The local pod runtime (fireflyer.dev.runtime), stopped by `down` with every pod."""
    log = Path(state.state_dir) / "logs" / "pod-runtime.log"
    args = [
        "-m", "fireflyer.dev.runtime",
        "--kubeconfig", str(Path(state.state_dir) / "kwok.kubeconfig"),
        "--state-dir", str(Path(state.state_dir) / "runtime"),
        "--nodes", str(state.local_nodes),
        "--network-index", str(state.network_index),
        *(["--threefs-state-dir", str(Path(state.state_dir) / "threefs-sim")] if state.play_threefs else []),
    ]  # fmt: skip
    state.pids["pod-runtime"] = processes.start(Path(sys.executable), args, log)
    state.save()


def _ready_nodes(state: State) -> int:
    """Nodes that are Ready and carry none of the node lifecycle controller's taints (it taints
    new nodes not-ready/unreachable until it has seen them healthy)."""
    listing = _api(state, "/api/v1/nodes")
    count = 0
    for node in listing.get("items", []):
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        tainted = any(
            t.get("key", "").startswith("node.kubernetes.io/")
            for t in node.get("spec", {}).get("taints") or []
        )
        count += ready and not tainted
    return count


def _create_nodes(state: State, node_objects: list[dict[str, Any]]) -> None:
    _create(state, "/api/v1/nodes", node_objects)


def _create(state: State, path: str, objects: list[dict[str, Any]]) -> None:
    ctx = _tls_context(Path(state.state_dir))
    url = f"https://127.0.0.1:{state.ports.apiserver}{path}"

    def create(node: dict[str, Any]) -> None:
        request = urllib.request.Request(
            url,
            data=json.dumps(node).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=30):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already there from an earlier run over the same etcd
                raise ClusterError(f"creating {node['metadata']['name']}: {exc.read()[:500]!r}") from exc

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, objects))


def down(state_dir: Path, quiet: bool = False, keep_logs: bool = False) -> bool:
    """Stop exactly the processes recorded in the state dir, then remove the state."""
    state_dir = state_dir.resolve()
    state = State.load(state_dir)
    if state is None:
        if not quiet:
            _log(f"no dev cluster state in {state_dir}")
        return False
    for name in (*EXTRA_PROCESSES, *reversed(START_ORDER)):
        pid = state.pids.get(name)
        grace = 40.0 if name == "pod-runtime" else 10.0  # it stops every pod first
        if pid is not None and processes.stop(pid, _binary_of(name), grace) and not quiet:
            _log(f"stopped {name} (pid {pid})")
    if state.local_nodes:
        from fireflyer.dev.runtime.network import ClusterNetwork, PodNetwork

        PodNetwork(ClusterNetwork(state.network_index)).teardown()  # in case the runtime died
    if keep_logs:
        for child in state_dir.iterdir():
            if child.name != "logs":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    return True


def status(state_dir: Path) -> dict[str, Any]:
    state_dir = state_dir.resolve()
    state = State.load(state_dir)
    if state is None:
        return {"stateDir": str(state_dir), "running": False}
    alive = state.running()
    report: dict[str, Any] = {
        "stateDir": str(state_dir),
        "topology": state.topology,
        "kubeconfig": str(state.kubeconfig),
        "running": all(alive.values()),
        "components": {
            name: {
                "pid": pid,
                "running": processes.is_ours(pid, _binary_of(name)),
                "log": str(
                    Path(state.state_dir) / "logs" / f"{'operator' if name == 'fireflyer' else name}.log"
                ),
            }
            for name, pid in state.pids.items()
        },
    }
    if alive.get("kube-apiserver"):
        try:
            report["readyNodes"] = _ready_nodes(state)
        except (OSError, ValueError) as exc:
            report["apiError"] = str(exc)
    return report
