"""One pod on a local node, from scheduled to deleted: its network, volumes and containers, the
restarts its policy asks for, its probes, and the status a kubelet would report."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fireflyer.dev.runtime import podspec
from fireflyer.dev.runtime.containers import ContainerProcess, probe
from fireflyer.dev.runtime.network import PodNetwork
from fireflyer.dev.runtime.pod_volumes import PodVolumes, Reader
from fireflyer.dev.runtime.podspec import ContainerState, PodSpecError

log = logging.getLogger(__name__)
TICK_SECONDS = 0.25
# How often a running pod's ConfigMap/Secret/downward-API/projected files are rewritten from the
# objects (a kubelet's sync period is about a minute; short here, so a dev loop sees an edit
# within seconds). A pod waiting for a volume's ConfigMap or Secret looks for it as often.
VOLUME_SYNC_SECONDS = 2.0


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RuntimeContext:
    """What every pod worker shares with the runtime."""

    network: PodNetwork
    pods_dir: Path
    read: Reader
    patch_status: Callable[[str, str, dict[str, Any]], None]
    remove: Callable[[str, str, str], None]
    """(namespace, name, uid): delete the pod object for good once its processes are gone."""
    token: Callable[[Mapping[str, Any]], str]
    hosts_file: Callable[[str], Path]
    resolv_file: Callable[[str], Path]
    base_env: Mapping[str, str]
    host_ip: str


@dataclass
class _Probe:
    spec: Mapping[str, Any]
    next_at: float
    successes: int = 0
    failures: int = 0


class _Container:
    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec
        self.state = ContainerState(name=spec["name"], image=spec.get("image", ""))
        self.process: ContainerProcess | None = None
        self.restart_at = 0.0
        self.readiness: _Probe | None = None
        self.liveness: _Probe | None = None


class PodWorker:
    """A thread per pod. The runtime hands it the latest pod object; the worker acts on it."""

    def __init__(self, pod: Mapping[str, Any], ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.pod: Mapping[str, Any] = pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = ctx.pods_dir / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.containers = [_Container(c) for c in pod["spec"]["containers"]]
        self.volumes = PodVolumes(self.dir, ctx.read, lambda: ctx.token(self.pod))
        self.netns = ""
        self.ip = ""
        self.error = ""
        self.started_at = now_iso()
        self.done = threading.Event()
        self._stop = threading.Event()
        self._last_status: dict[str, Any] | None = None
        self._volumes_synced = 0.0
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.thread.start()

    def update(self, pod: Mapping[str, Any]) -> None:
        self.pod = pod

    def stop(self) -> None:
        """The pod object is gone: kill without a grace period."""
        self._stop.set()

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
            while not self._stop.is_set():
                if self.pod["metadata"].get("deletionTimestamp"):
                    self._terminate()
                    self._release_network()  # gone before the pod object is: nothing outlives it
                    self.ctx.remove(self.namespace, self.name, self.uid)
                    return
                self._tick()
                phase = self._report()
                if phase in ("Succeeded", "Failed") and self.netns:
                    self._release_network()  # as a kubelet removes an ended pod's sandbox
                self._stop.wait(TICK_SECONDS)
            self._kill_all()
        except Exception as exc:  # report it on the pod rather than dying silently
            log.exception("pod %s/%s", self.namespace, self.name)
            self.error = str(exc)
            self._report(force_phase="Failed")
        finally:
            self._cleanup()
            self.done.set()

    def _setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.netns, self.ip = self.ctx.network.create(self.uid)
        # The pod's address must be in its status before its containers read it (downward API).
        self.pod = {**self.pod, "status": {**(self.pod.get("status") or {}), "podIP": self.ip}}
        self._report()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._volumes_synced >= VOLUME_SYNC_SECONDS:
            waiting = self.volumes.sync(self.pod)
            self._volumes_synced = now
            if waiting and not any(c.process for c in self.containers):
                for c in self.containers:
                    c.state.waiting_reason = "ContainerCreating"
                    c.state.message = f"waiting for volume(s) {', '.join(waiting)}"
                return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in self.containers:
            self._tick_container(c, policy, now)

    def _tick_container(self, c: _Container, policy: str, now: float) -> None:
        st = c.state
        if c.process is not None:
            code = c.process.poll()
            if code is None:
                self._probe(c, now)
                return
            st.running, st.ready, st.exit_code, st.finished_at = False, False, code, now_iso()
            st.reason, st.waiting_reason = "", ""
            st.message = self._termination_message(c, code)
            c.process = None
            if not podspec.restarts_when(policy, code):
                return
            c.restart_at = now + podspec.backoff_seconds(st.restarts)
            st.waiting_reason, st.message = "CrashLoopBackOff", f"back-off restarting after exit {code}"
            return
        if st.exit_code is not None and not podspec.restarts_when(policy, st.exit_code):
            return
        if now < c.restart_at:
            return
        self._start(c)

    def _start(self, c: _Container) -> None:
        st = c.state
        refusal = podspec.unsupported(self.pod)
        if refusal:
            st.waiting_reason, st.message = "CreateContainerConfigError", refusal
            c.restart_at = time.monotonic() + 30.0
            return
        try:
            env = podspec.container_env(
                self.pod, c.spec, self._lookup, {**self.ctx.base_env, "HOSTNAME": self.name}
            )
            argv = podspec.argv(c.spec, env)
            mounts = self.volumes.mounts(self.pod, c.spec)
        except PodSpecError as exc:
            st.waiting_reason, st.message = "CreateContainerConfigError", str(exc)
            c.restart_at = time.monotonic() + 2.0
            return
        termination = self.dir / f"{c.spec['name']}.termination-log"
        termination.write_text("")
        mounts += [
            {
                "kind": "bind",
                "source": str(termination),
                "target": c.spec.get("terminationMessagePath") or "/dev/termination-log",
                "file": True,
            },
            {
                "kind": "bind",
                "source": str(self.ctx.hosts_file(self.namespace)),
                "target": "/etc/hosts",
                "file": True,
            },
            {
                "kind": "bind",
                "source": str(self.ctx.resolv_file(self.namespace)),
                "target": "/etc/resolv.conf",
                "file": True,
            },
        ]
        spec = {
            "podDir": str(self.dir / "rootfs" / c.spec["name"]),
            "mounts": mounts,
            "hostname": self.pod["spec"].get("hostname") or self.name,
            "workingDir": c.spec.get("workingDir"),
            "argv": argv,
            "env": env,
        }
        rootfs = self.dir / "rootfs" / c.spec["name"]
        shutil.rmtree(rootfs, ignore_errors=True)  # a restarted container starts from a clean root
        if st.exit_code is not None:
            st.last_exit_code, st.last_started_at, st.last_finished_at = (
                st.exit_code,
                st.started_at,
                st.finished_at,
            )
            st.restarts += 1
        c.process = ContainerProcess(
            self.netns, spec, self.dir / f"{c.spec['name']}.json", self.log_path(c.spec["name"])
        )
        st.running, st.ready, st.exit_code, st.started_at = True, False, None, now_iso()
        st.waiting_reason, st.message, st.reason = "", "", ""
        start = time.monotonic()
        for kind in ("readiness", "liveness"):
            spec_ = c.spec.get(f"{kind}Probe")
            setattr(
                c, kind, _Probe(spec_, start + float(spec_.get("initialDelaySeconds", 0))) if spec_ else None
            )
        log.info("started %s/%s container %s: %s", self.namespace, self.name, c.spec["name"], " ".join(argv))

    def _probe(self, c: _Container, now: float) -> None:
        st = c.state
        if c.readiness is None:
            st.ready = True
        for kind in ("readiness", "liveness"):
            p: _Probe | None = getattr(c, kind)
            if p is None or now < p.next_at:
                continue
            p.next_at = now + float(p.spec.get("periodSeconds", 10))
            init = c.process.init_pid if c.process else None
            if probe(p.spec, c.spec, self.ip, init):
                p.successes, p.failures = p.successes + 1, 0
                if kind == "readiness" and p.successes >= int(p.spec.get("successThreshold", 1)):
                    st.ready = True
            else:
                p.failures, p.successes = p.failures + 1, 0
                if p.failures >= int(p.spec.get("failureThreshold", 3)):
                    if kind == "readiness":
                        st.ready = False
                    elif c.process is not None:
                        log.info(
                            "%s/%s container %s failed its liveness probe",
                            self.namespace,
                            self.name,
                            c.spec["name"],
                        )
                        c.process.stop(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def _termination_message(self, c: _Container, code: int) -> str:
        """What the container wrote to its terminationMessagePath, or with the policy
        FallbackToLogsOnError and nothing written, the end of its log after a failure."""
        written = (self.dir / f"{c.spec['name']}.termination-log").read_text(errors="replace")[:4096]
        if written or code == 0 or c.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return written
        lines = self.log_path(c.spec["name"]).read_text(errors="replace").splitlines()[-80:]
        return "\n".join(lines)[-2048:]

    def _lookup(self, kind: str, name: str, key: str) -> str | None:
        obj = self.ctx.read(kind, self.namespace, name)
        if obj is None:
            return None
        data = obj.get("data") or {}
        values = podspec.decode_secret(data) if kind == "Secret" else dict(data)
        if not key:
            return "\n".join(f"{k}={v}" for k, v in values.items())
        return values.get(key)

    def log_path(self, container: str) -> Path:
        return self.dir / f"{container}.log"

    # -- ending ---------------------------------------------------------------------------------

    def _deletion_grace(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        return 30.0 if grace is None else float(grace)

    def _terminate(self) -> None:
        """A kubelet's graceful stop: SIGTERM to every container at once, SIGKILL to those still
        running when the grace ends. A later deletion with a shorter grace brings the kill
        forward, and the pod object's removal makes it immediate."""
        running = [c.process for c in self.containers if c.process is not None]
        for process in running:
            process.signal_term()
        deadline = time.monotonic() + self._deletion_grace()
        while not self._stop.is_set() and any(process.poll() is None for process in running):
            now = time.monotonic()
            deadline = min(deadline, now + self._deletion_grace())
            if now >= deadline:
                break
            time.sleep(0.1)
        self._kill_all()

    def _kill_all(self) -> None:
        for c in self.containers:
            if c.process is not None:
                code = c.process.kill()
                c.state.running, c.state.exit_code, c.state.finished_at = False, code, now_iso()
                c.process = None

    def _cleanup(self) -> None:
        self._kill_all()
        self._release_network()

    def _release_network(self) -> None:
        if self.netns:
            self.ctx.network.delete(self.uid)
            self.ctx.network.release(self.ip)
            self.netns = ""

    # -- status ---------------------------------------------------------------------------------

    def _report(self, force_phase: str | None = None) -> str:
        states = [c.state for c in self.containers]
        if self.error:
            for s in states:
                s.waiting_reason, s.message = s.waiting_reason or "RunContainerError", self.error
        policy = self.pod["spec"].get("restartPolicy", "Always")
        phase = force_phase or podspec.pod_phase(policy, states)
        ready = phase == "Running" and all(s.ready and s.running for s in states)
        previous = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}
        stamp = now_iso()
        conditions = [
            podspec.condition(
                "PodReadyToStartContainers", bool(self.ip), stamp, previous.get("PodReadyToStartContainers")
            ),
            podspec.condition("Initialized", True, stamp, previous.get("Initialized")),
            podspec.condition("ContainersReady", ready, stamp, previous.get("ContainersReady")),
            podspec.condition(
                "Ready", ready, stamp, previous.get("Ready"), "" if ready else "ContainersNotReady"
            ),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.ctx.host_ip,
            "hostIPs": [{"ip": self.ctx.host_ip}],
            "startTime": self.started_at,
            "conditions": conditions,
            "containerStatuses": [s.as_status() for s in states],
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        comparable = {**status, "conditions": [(c["type"], c["status"]) for c in conditions]}
        if comparable != self._last_status:
            self.ctx.patch_status(self.namespace, self.name, status)
            self._last_status = comparable
        return phase
