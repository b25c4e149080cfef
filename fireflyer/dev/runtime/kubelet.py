"""The local pod runtime: a kubelet for the dev cluster's local nodes.

It registers the local nodes and keeps their leases, runs every pod bound to them as processes
on this machine (fireflyer.dev.runtime.pod_worker), keeps the pods' name files and the
LoadBalancer proxies current, and serves `kubectl logs`. The kwok nodes beside them keep
simulating the GPU fabric; pods there never run.

Run: python -m fireflyer.dev.runtime --kubeconfig K --state-dir D --nodes N --network-index I
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config

from fireflyer.dev.runtime import nodes
from fireflyer.dev.runtime.logs_server import LogsServer
from fireflyer.dev.runtime.network import ClusterNetwork, PodNetwork, require_privileges
from fireflyer.dev.runtime.pod_worker import PodWorker, RuntimeContext
from fireflyer.dev.runtime.services import LoadBalancers, NameFiles

log = logging.getLogger(__name__)
SYNC_SECONDS = 0.5
HEARTBEAT_SECONDS = 5.0
NAMES_SECONDS = 1.0
READ_KINDS = {
    "ConfigMap": "read_namespaced_config_map",
    "Secret": "read_namespaced_secret",
    "PersistentVolumeClaim": "read_namespaced_persistent_volume_claim",
}


class Kubelet:
    def __init__(
        self,
        kubeconfig: Path,
        state_dir: Path,
        node_count: int,
        network_index: int,
        slots: int = 2,
        kubelet_port: int = 0,
        stop: threading.Event | None = None,
    ) -> None:
        """stop: set to end run() (the process's SIGTERM)."""
        require_privileges()
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.serializer = client.ApiClient()
        self.core = client.CoreV1Api(api_client)
        self.leases = client.CoordinationV1Api(api_client)
        self.state_dir = state_dir
        self.node_names = nodes.node_names(node_count)
        self.slots = slots
        self.network = PodNetwork(ClusterNetwork(network_index))
        self.workers: dict[str, PodWorker] = {}
        self.ended: set[str] = set()  # pods whose worker finished: never started twice
        self.names = NameFiles(state_dir / "names")
        self.logs = LogsServer(self.find_log, kubelet_port, state_dir / "tls")
        self.balancers = LoadBalancers(self.network.cluster.load_balancer_ip, self._publish_ingress)
        venv_bin = str(Path(sys.executable).parent)
        self.ctx = RuntimeContext(
            network=self.network,
            pods_dir=state_dir / "pods",
            read=self.read,
            patch_status=self._patch_status,
            remove=self._remove,
            token=self._token,
            hosts_file=self.names.hosts,
            resolv_file=self.names.resolv,
            base_env={
                "PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root",
                "LANG": "C.UTF-8",
            },
            host_ip=self.network.cluster.host_ip,
        )
        self._stop = stop or threading.Event()

    # -- API helpers ----------------------------------------------------------------------------

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if kind == "PersistentVolume":
                obj = self.core.read_persistent_volume(name)
            else:
                obj = getattr(self.core, READ_KINDS[kind])(name, namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        result: dict[str, Any] = self.serializer.sanitize_for_serialization(obj)
        return result

    def _patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": status})
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def _remove(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet's last word on a terminated pod: delete it with no grace left."""
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
                ),
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _token(self, pod: Mapping[str, Any]) -> str:
        account = pod["spec"].get("serviceAccountName") or "default"
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        )
        try:
            answer = self.core.create_namespaced_service_account_token(
                account, pod["metadata"]["namespace"], request
            )
        except client.ApiException:
            return ""
        return str(answer.status.token) if answer.status else ""

    def _publish_ingress(self, namespace: str, name: str, address: str) -> None:
        try:
            self.core.patch_namespaced_service_status(
                name, namespace, {"status": {"loadBalancer": {"ingress": [{"ip": address, "ipMode": "VIP"}]}}}
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise

    def find_log(self, namespace: str, pod: str, container: str, previous: bool) -> Path | None:
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == pod:
                path = worker.log_path(container)
                return path.with_name(path.stem + ".previous.log") if previous else path
        return None

    # -- loops ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.network.teardown()  # whatever an earlier runtime of this cluster left behind
        self.network.ensure_bridge()
        self.logs.start()
        for name in self.node_names:
            node = nodes.node_object(
                name, self.slots, self.network.cluster.host_ip, self.logs.port, "8", "16Gi"
            )
            nodes.register(self.core, node)
        threading.Thread(target=self._loop, args=(self._heartbeats, HEARTBEAT_SECONDS), daemon=True).start()
        threading.Thread(target=self._loop, args=(self._names, NAMES_SECONDS), daemon=True).start()
        log.info(
            "local nodes %s; pods on 10.%d.0.0/16",
            ", ".join(self.node_names),
            100 + self.network.cluster.index,
        )

    def run(self) -> None:
        self.start()
        self._loop(self.sync, SYNC_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        for worker in list(self.workers.values()):
            worker.stop()
        for worker in list(self.workers.values()):
            worker.done.wait(30)
        self.balancers.close()
        self.logs.stop()
        self.network.teardown()

    def _loop(self, step: Any, interval: float) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception:  # keep serving; the next pass retries
                log.exception("%s failed", getattr(step, "__name__", step))
            self._stop.wait(interval)

    def _local_pods(self) -> list[dict[str, Any]]:
        pods = []
        for name in self.node_names:
            listing = self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={name}", _request_timeout=nodes.REQUEST_TIMEOUT
            )
            pods += self.serializer.sanitize_for_serialization(listing.items)
        return pods

    def sync(self) -> None:
        pods = self._local_pods()
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if worker is None:
                if pod["metadata"].get("deletionTimestamp"):
                    self._remove(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)
                    continue  # its processes are gone already (or never ran here)
                if uid in self.ended or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                self.workers[uid] = PodWorker(pod, self.ctx)
            else:
                worker.update(pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.stop()
            if worker.done.is_set():
                del self.workers[uid]
                self.ended.add(uid)

    def _heartbeats(self) -> None:
        for name in self.node_names:
            nodes.heartbeat(self.core, self.leases, name)

    def _names(self) -> None:
        pods = self._local_pods()
        services = self.serializer.sanitize_for_serialization(
            self.core.list_service_for_all_namespaces(_request_timeout=nodes.REQUEST_TIMEOUT).items
        )
        self.names.refresh(pods, services)
        self.balancers.refresh(pods, services)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    from fireflyer.dev.runtime.threefs_admin import AdminRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=0, help="local nodes whose pods run here (root)")
    parser.add_argument("--slots", type=int, default=2, help="workload ranks per node (nvidia.com/gpu)")
    parser.add_argument("--network-index", type=int, default=0)
    parser.add_argument("--kubelet-port", type=int, default=0)
    parser.add_argument(
        "--threefs-state-dir", type=Path, help="also play the 3FS admin Jobs of the simulated nodes"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    admin = AdminRunner(args.kubeconfig, args.threefs_state_dir) if args.threefs_state_dir else None
    if admin is not None:
        admin.start()
    kubelet = None
    if args.nodes:
        kubelet = Kubelet(
            args.kubeconfig,
            args.state_dir,
            args.nodes,
            args.network_index,
            args.slots,
            args.kubelet_port,
            stop,
        )
    try:
        if kubelet is not None:
            kubelet.run()
        else:
            stop.wait()
    finally:
        if admin is not None:
            admin.stop()
        if kubelet is not None:
            kubelet.stop()
            log.info("local runtime stopped; no pod process is left (pid %d)", os.getpid())
    return 0
