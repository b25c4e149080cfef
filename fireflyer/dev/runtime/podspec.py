"""What a kubelet derives from a pod object before it runs anything (pure functions): the
container's environment with downward-API and `$(VAR)` references resolved, its argv, the restart
decision and back-off, the status it reports, and the name-resolution records of a namespace."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

VAR_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
# Crash-loop back-off: the kubelet's shape (doubling from a base up to a cap), shortened so that a
# failing pod of the dev cluster comes back within seconds instead of minutes.
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 20.0
CLUSTER_DOMAIN = "cluster.local"


class PodSpecError(ValueError):
    """The pod asks for something the local runtime cannot give it; the message says what."""


Lookup = Callable[[str, str, str], str | None]
"""(kind ConfigMap|Secret, name, key) → the value, None when absent."""


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The downward API's fieldRef values."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(p["ip"] for p in status.get("podIPs") or []),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = FIELD_LABEL.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodSpecError(f"fieldRef {path!r} is not supported by the downward API")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return VAR_REFERENCE.sub(replace, text)


def _resource_value(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    resource = ref.get("resource", "")
    section, _, name = resource.partition(".")
    value = ((container.get("resources") or {}).get(section) or {}).get(name)
    return str(value) if value is not None else "0"


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup, base: Mapping[str, str]
) -> dict[str, str]:
    """envFrom first, then env in order (later entries see earlier ones through `$(VAR)`)."""
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = source.get(key)
            if ref is None:
                continue
            data = lookup(kind, ref["name"], "")
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodSpecError(f"{kind} {ref['name']} (envFrom) does not exist")
            for line in (data or "").splitlines():
                name, _, value = line.partition("=")
                env[prefix + name] = value
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = _resource_value(container, source["resourceFieldRef"])
        else:
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = source.get(key)
                if ref is None:
                    continue
                found = lookup(kind, ref["name"], ref["key"])
                if found is None and not ref.get("optional"):
                    raise PodSpecError(f"{kind} {ref['name']} has no key {ref['key']!r} (env {name})")
                if found is not None:
                    env[name] = found
    return env


def argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with `$(VAR)` expanded. Images are not pulled, so a container must say what
    to run."""
    command = list(container.get("command") or [])
    if not command:
        raise PodSpecError(
            f"container {container.get('name')!r} has no command: the local runtime runs commands "
            "on this machine and cannot use an image's entrypoint"
        )
    return [expand(str(part), env) for part in [*command, *(container.get("args") or [])]]


def unsupported(pod: Mapping[str, Any]) -> str:
    """Why the local runtime cannot run this pod as asked ("" when it can): better a pod that
    says so than one that runs without what it asked for."""
    spec = pod.get("spec", {})
    if spec.get("initContainers"):
        return "init containers are not supported by the local runtime"
    if spec.get("hostNetwork"):
        return "hostNetwork pods are not supported by the local runtime (every pod has its own network)"
    return ""


def decode_secret(data: Mapping[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in (data or {}).items()}


def restarts_when(restart_policy: str, exit_code: int) -> bool:
    """Whether a container that ended with exit_code runs again."""
    if restart_policy == "Always":
        return True
    if restart_policy == "OnFailure":
        return exit_code != 0
    return False


def backoff_seconds(restarts: int) -> float:
    return float(min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, restarts)))


@dataclass
class ContainerState:
    """What the runtime knows about one container, reported as a containerStatus."""

    name: str
    image: str
    started_at: str | None = None
    running: bool = False
    ready: bool = False
    restarts: int = 0
    exit_code: int | None = None
    finished_at: str | None = None
    reason: str = ""
    message: str = ""
    last_exit_code: int | None = None
    last_started_at: str | None = None
    last_finished_at: str | None = None
    waiting_reason: str = "ContainerCreating"

    def as_status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.running:
            state = {"running": {"startedAt": self.started_at}}
        elif self.exit_code is not None and not self.waiting_reason:
            state = {"terminated": self._terminated(self.exit_code, self.started_at, self.finished_at)}
        else:
            state = {
                "waiting": {
                    "reason": self.waiting_reason,
                    **({"message": self.message} if self.message else {}),
                }
            }
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready and self.running,
            "started": self.running,
            "restartCount": self.restarts,
            "state": state,
        }
        if self.last_exit_code is not None:
            status["lastState"] = {
                "terminated": self._terminated(
                    self.last_exit_code, self.last_started_at, self.last_finished_at
                )
            }
        return status

    def _terminated(self, code: int, started: str | None, finished: str | None) -> dict[str, Any]:
        reason = self.reason or ("Completed" if code == 0 else "Error")
        out: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": finished,
        }
        if self.message:
            out["message"] = self.message
        return out


def pod_phase(restart_policy: str, states: list[ContainerState]) -> str:
    """Running while any container runs or will run again; Succeeded/Failed once all ended."""
    if any(s.running for s in states):
        return "Running"
    ended = [s for s in states if s.exit_code is not None and not restarts_when(restart_policy, s.exit_code)]
    if states and len(ended) == len(states):
        return "Succeeded" if all(s.exit_code == 0 for s in ended) else "Failed"
    if any(s.restarts or s.exit_code is not None for s in states):
        return "Running"  # between restarts, as a kubelet reports a crash-looping pod
    return "Pending"


def condition(
    kind: str, value: bool, now: str, previous: Mapping[str, Any] | None, reason: str = ""
) -> dict[str, Any]:
    """A pod condition whose lastTransitionTime moves only when its status flips."""
    status = "True" if value else "False"
    since = previous.get("lastTransitionTime") if previous and previous.get("status") == status else now
    out = {"type": kind, "status": status, "lastTransitionTime": since, "lastProbeTime": None}
    if reason:
        out["reason"] = reason
    return out


def pod_hostnames(pod: Mapping[str, Any]) -> list[str]:
    """The names a pod answers to through its headless Service (hostname + subdomain)."""
    spec = pod.get("spec", {})
    hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
    if not hostname or not subdomain:
        return []
    namespace = pod["metadata"]["namespace"]
    base = f"{hostname}.{subdomain}"
    return [
        f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}",
        f"{base}.{namespace}.svc",
        f"{base}.{namespace}",
        base,
    ]


def service_names(name: str, namespace: str, local: bool) -> list[str]:
    names = [f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
    return [*names, name] if local else names


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in (selector or {}).items())


def hosts_file(
    namespace: str,
    pods: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]],
    ready: Callable[[Mapping[str, Any]], bool],
) -> str:
    """/etc/hosts for the pods of one namespace: every pod's headless-Service names, and for each
    Service with a selector one address of a ready pod behind it (a DNS-level stand-in for
    kube-proxy: the dev cluster has none). Names of other namespaces are given fully qualified."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    for pod in sorted(pods, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"])):
        ip = pod.get("status", {}).get("podIP")
        names = pod_hostnames(pod)
        if ip and names:
            if pod["metadata"]["namespace"] != namespace:
                names = names[:3]
            lines.append(f"{ip} {' '.join(names)}")
    for service in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        meta, spec = service["metadata"], service.get("spec", {})
        if spec.get("clusterIP") == "None":
            continue  # headless: its pods' own names above
        behind = [
            p
            for p in pods
            if p["metadata"]["namespace"] == meta["namespace"]
            and selects(spec.get("selector"), p["metadata"].get("labels"))
            and p.get("status", {}).get("podIP")
        ]
        behind.sort(key=lambda p: (not ready(p), p["metadata"]["name"]))
        if behind:
            names = service_names(meta["name"], meta["namespace"], meta["namespace"] == namespace)
            lines.append(f"{behind[0]['status']['podIP']} {' '.join(names)}")
    return "\n".join(lines) + "\n"


def resolv_conf(namespace: str) -> str:
    """No name server: pods reach nothing beyond the dev cluster, and a server they cannot reach
    would make every unknown name (and Python's getfqdn) wait for its timeout. Names come from
    /etc/hosts; anything else fails at once."""
    search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    return f"search {search}\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n"
