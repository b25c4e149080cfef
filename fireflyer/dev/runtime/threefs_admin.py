"""The pod runtime's part for the simulated nodes: what a kubelet and 3FS would do with 3FS
admin Jobs.

kwok runs no containers and 3FS's binaries do not run here, so for the pods of 3FS admin Jobs on
the simulated nodes the runtime plays the container: for every Running pod labelled
fireflyer.dev/admin-step it materialises the pod's ConfigMap volumes, runs the step's commands
through the admin_cli contract double (tests/doubles/admin_cli.py, a simulated 3FS with its state
in a file per ThreeFSCluster), writes the result Secret exactly as the Job's script does, and ends
the pod with the exit code. It also plays the storage services' heartbeats: a storage pod that
runs on a Ready node is an alive 3FS storage node (its node id read from the pod's app TOML), one
on a NotReady node is dead.

It runs inside the pod runtime process (`python -m fireflyer.dev.runtime --threefs-state-dir D`).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import logging
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

from kubernetes import client, config

from fireflyer.dev.build import REPO_ROOT
from fireflyer.operator.threefs.admin_jobs import TOKEN_CHARS, encode_result
from fireflyer.threefs import admin

DOUBLE = REPO_ROOT / "tests" / "doubles" / "admin_cli.py"
STEP = "fireflyer.dev/admin-step"
CLUSTER = "fireflyer.dev/threefs"

log = logging.getLogger(__name__)


def _load_double() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fireflyer_admin_cli_double", DOUBLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AdminRunner:
    def __init__(self, kubeconfig: Path, state_dir: Path, interval: float = 0.3) -> None:
        self.api = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
        self.state_dir = state_dir
        self.interval = interval
        self.double = _load_double()
        self._handled: set[str] = set()
        self._stop = threading.Event()
        self.steps_run: list[tuple[str, str, int]] = []  # (cluster, step, exit code)
        state_dir.mkdir(parents=True, exist_ok=True)

    def state_path(self, namespace: str, cluster: str) -> Path:
        return self.state_dir / f"{namespace}_{cluster}.json"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="admin-runner", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.once()
            except Exception:  # keep serving; the next pass retries
                log.exception("admin runner pass failed")
            self._stop.wait(self.interval)

    def once(self) -> None:
        pods: list[Any] = self.api.list_pod_for_all_namespaces(label_selector=CLUSTER).items
        node_items: list[Any] = self.api.list_node().items
        nodes: dict[str, Any] = {n.metadata.name: n for n in node_items}
        self._heartbeats(pods, nodes)
        for pod in pods:
            labels = pod.metadata.labels or {}
            if STEP in labels and pod.status.phase == "Running" and pod.metadata.uid not in self._handled:
                self._handled.add(pod.metadata.uid)
                self._run_step(pod)

    # -- storage heartbeats ------------------------------------------------------------------

    def _heartbeats(self, pods: list[Any], nodes: dict[str, Any]) -> None:
        by_cluster: dict[tuple[str, str], dict[int, bool]] = {}
        for pod in pods:
            labels = pod.metadata.labels or {}
            if labels.get("fireflyer.dev/component") != "storage" or pod.status.phase != "Running":
                continue
            if pod.metadata.deletion_timestamp is not None:
                continue
            node_id = self._storage_node_id(pod)
            if node_id is None:
                continue
            node = nodes.get(pod.spec.node_name)
            ready = node is not None and any(
                c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
            )
            key = (pod.metadata.namespace, labels[CLUSTER])
            by_cluster.setdefault(key, {})[node_id] = ready
        for (namespace, cluster), alive in by_cluster.items():
            self.double.set_storage_nodes(self.state_path(namespace, cluster), alive)

    def _storage_node_id(self, pod: Any) -> int | None:
        ordinal = pod.metadata.name.rsplit("-", 1)[1]
        for volume in pod.spec.volumes or []:
            if volume.config_map is not None and volume.name == "storage-config":
                try:
                    cm = self.api.read_namespaced_config_map(volume.config_map.name, pod.metadata.namespace)
                except client.ApiException:
                    return None  # the cluster is being deleted
                text = (cm.data or {}).get(f"app-{ordinal}.toml")
                return int(tomllib.loads(text)["node_id"]) if text else None
        return None

    # -- admin steps -------------------------------------------------------------------------

    def _run_step(self, pod: Any) -> None:
        """What the Job's script does (fireflyer.operator.threefs.admin_jobs.RUN_STEP): the token
        from the mounted Secret into a private admin_cli config, never onto a command line; the
        user-add token into the token Secret; output with tokens blanked out; the result patched
        into the step's ConfigMap. The writes go as the Job's own ServiceAccount, so that its Role
        is what allows them."""
        namespace = pod.metadata.namespace
        labels = pod.metadata.labels
        cluster, step = labels[CLUSTER], labels[STEP]
        container = pod.spec.containers[0]
        env = {e.name: e.value for e in container.env or [] if e.value is not None}
        root = self.state_dir / "roots" / pod.metadata.uid
        volumes = {v.name: v for v in pod.spec.volumes or []}
        token = ""
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            if volume is not None and volume.secret is not None:
                token = self._secret_value(namespace, volume.secret.secret_name, "token")
            if volume is None or volume.config_map is None:
                continue
            try:
                cm = self.api.read_namespaced_config_map(volume.config_map.name, namespace)
            except client.ApiException:
                continue  # optional ConfigMaps that do not exist yet
            target = root / mount.mount_path.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            for key, value in (cm.data or {}).items():
                (target / key).write_text(value)
        work = root / env["WORK_DIR"].lstrip("/")
        work.mkdir(parents=True, exist_ok=True)
        admin_toml = root / env["CONFIG_DIR"].lstrip("/") / "admin" / "admin_cli.toml"
        config = admin_toml.read_text() if admin_toml.is_file() else ""
        output: list[str] = []
        code = 0
        if token and not TOKEN_CHARS.match(token):
            output.append(f"the root token in {env['TOKEN_FILE']} has unexpected characters")
            code = 1
        elif token:
            config += f'\n[user_info]\ntoken = "{token}"\n'
        (work / "admin_cli.toml").write_text(config)
        commands_file = root / env["FILES_DIR"].lstrip("/") / "commands"
        commands = [] if code else [c for c in commands_file.read_text().splitlines() if c.strip()]
        for command in commands:
            output.append(f"{env['MARK']}{command}")
            if env.get("RUNNER") == "fdbcli":
                output.append("Database created")
                continue
            run = subprocess.run(
                [
                    sys.executable,
                    str(DOUBLE),
                    "-cfg",
                    f"{env['WORK_DIR']}/admin_cli.toml",
                    "--root",
                    str(root),
                    "--state",
                    str(self.state_path(namespace, cluster)),
                    command,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            output.append((run.stdout + run.stderr).rstrip("\n"))
            if run.returncode:
                code = run.returncode
                break
        text = "\n".join(output) + "\n"
        as_job = self._as_service_account(namespace, pod.spec.service_account_name)
        new = ""
        if code == 0 and env.get("TOKEN_SECRET"):
            try:
                new = admin.parse_token(text)
                body = {"data": {"token": base64.b64encode(new.encode()).decode()}}
                as_job.patch_namespaced_secret(env["TOKEN_SECRET"], namespace, body)
            except admin.AdminOutputError:
                text, code = text + "user-add printed no token\n", 1
            except client.ApiException as error:
                text += f"could not store the root token in Secret {env['TOKEN_SECRET']}: {error.reason}\n"
                code = 1
        text = admin.redact(text)
        for secret in (token, new):
            if secret:
                text = "".join(
                    "(a line holding the root token is withheld)\n" if secret in line else line
                    for line in text.splitlines(keepends=True)
                )
        try:
            as_job.patch_namespaced_config_map(env["RESULT"], namespace, encode_result(code, text))
        except client.ApiException as error:
            # As the Job's curl would fail: the Job then ends without a result.
            log.warning("admin step %s/%s %s: no result written (%s)", namespace, cluster, step, error.reason)
            code = code or 1
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        phase = "Succeeded" if code == 0 else "Failed"
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": now,
            "finishedAt": now,
        }
        container_status = {
            "name": container.name,
            "image": container.image,
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": terminated},
        }
        ended = {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
        self.api.patch_namespaced_pod_status(
            pod.metadata.name,
            namespace,
            {"status": {"phase": phase, "containerStatuses": [container_status], "conditions": [ended]}},
        )
        self.steps_run.append((cluster, step, code))
        log.info("admin step %s/%s %s: exit %d", namespace, cluster, step, code)

    def _secret_value(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = self.api.read_namespaced_secret(name, namespace)
        except client.ApiException:
            return ""  # an optional Secret volume whose Secret does not exist
        return base64.b64decode((secret.data or {}).get(key, "")).decode()

    def _as_service_account(self, namespace: str, name: str) -> Any:
        """A client that authenticates as a pod's ServiceAccount (a short-lived token)."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
        )
        issued = self.api.create_namespaced_service_account_token(name, namespace, request)
        assert issued.status is not None
        configuration = copy.copy(self.api.api_client.configuration)
        configuration.cert_file = configuration.key_file = None
        configuration.api_key = {"authorization": f"Bearer {issued.status.token}"}
        return client.CoreV1Api(client.ApiClient(configuration))
