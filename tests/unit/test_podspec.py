"""What the local pod runtime derives from a pod before running it (pure functions)."""

from __future__ import annotations

from typing import Any

import pytest

from fireflyer.dev.runtime import podspec
from fireflyer.dev.runtime.podspec import ContainerState, PodSpecError

POD: dict[str, Any] = {
    "metadata": {"name": "web-0", "namespace": "ns", "uid": "u1", "labels": {"app": "web", "rank": "3"}},
    "spec": {"nodeName": "local-0", "hostname": "web-0", "subdomain": "web", "serviceAccountName": "sa"},
    "status": {"podIP": "10.126.0.12", "hostIP": "10.126.0.1"},
}


def _lookup(kind: str, name: str, key: str) -> str | None:
    data = {("ConfigMap", "cfg"): {"mode": "fast", "size": "3"}, ("Secret", "tok"): {"token": "s3cret"}}
    values = data.get((kind, name))
    if values is None:
        return None
    return "\n".join(f"{k}={v}" for k, v in values.items()) if not key else values.get(key)


def test_environment_resolves_downward_api_references_and_expansions_in_order() -> None:
    container = {
        "name": "main",
        "resources": {"limits": {"cpu": "2"}},
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['rank']"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
            {"name": "URL", "value": "http://$(IP):80/$(MISSING)/$$(IP)"},
            {
                "name": "GONE",
                "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": True}},
            },
        ],
    }
    env = podspec.container_env(POD, container, _lookup, {"PATH": "/bin"})
    assert env["IP"] == "10.126.0.12" and env["RANK"] == "3" and env["NODE"] == "local-0"
    assert env["CPUS"] == "2" and env["TOKEN"] == "s3cret" and env["CFG_mode"] == "fast"
    assert env["URL"] == "http://10.126.0.12:80/$(MISSING)/$(IP)"
    assert "GONE" not in env and env["PATH"] == "/bin"


def test_a_missing_required_key_or_an_unknown_field_is_an_error_that_names_it() -> None:
    with pytest.raises(PodSpecError, match="nope"):
        podspec.container_env(
            POD,
            {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x"}}}]},
            _lookup,
            {},
        )
    with pytest.raises(PodSpecError, match=r"spec\.bogus"):
        podspec.field_value(POD, "spec.bogus")


def test_argv_expands_variables_and_needs_a_command() -> None:
    assert podspec.argv({"command": ["sh", "-c"], "args": ["echo $(IP)"]}, {"IP": "1.2.3.4"}) == [
        "sh",
        "-c",
        "echo 1.2.3.4",
    ]
    with pytest.raises(PodSpecError, match="no command"):
        podspec.argv({"name": "main", "image": "x"}, {})


def test_restart_policy_back_off_and_phase() -> None:
    assert podspec.restarts_when("Always", 0) and podspec.restarts_when("OnFailure", 1)
    assert not podspec.restarts_when("OnFailure", 0) and not podspec.restarts_when("Never", 1)
    delays = [podspec.backoff_seconds(n) for n in range(8)]
    assert delays == sorted(delays) and delays[0] == podspec.BACKOFF_BASE_SECONDS
    assert delays[-1] == podspec.BACKOFF_CAP_SECONDS
    running = ContainerState("a", "i", running=True)
    done = ContainerState("b", "i", exit_code=0, waiting_reason="")
    failed = ContainerState("c", "i", exit_code=2, waiting_reason="")
    assert podspec.pod_phase("Never", [running, done]) == "Running"
    assert podspec.pod_phase("Never", [done]) == "Succeeded"
    assert podspec.pod_phase("Never", [done, failed]) == "Failed"
    assert podspec.pod_phase("Always", [failed]) == "Running"  # it will run again
    assert podspec.pod_phase("Always", [ContainerState("d", "i")]) == "Pending"


def test_container_status_shapes() -> None:
    state = ContainerState("main", "img", running=True, ready=True, started_at="t0", restarts=2)
    state.last_exit_code, state.last_started_at, state.last_finished_at = 7, "s", "f"
    status = state.as_status()
    assert (
        status["ready"]
        and status["restartCount"] == 2
        and status["state"] == {"running": {"startedAt": "t0"}}
    )
    assert status["lastState"]["terminated"]["exitCode"] == 7
    ended = ContainerState("main", "img", exit_code=0, waiting_reason="", message="done").as_status()
    assert (
        ended["state"]["terminated"]["reason"] == "Completed"
        and ended["state"]["terminated"]["message"] == "done"
    )
    waiting = ContainerState("main", "img", waiting_reason="CrashLoopBackOff", exit_code=1).as_status()
    assert waiting["state"]["waiting"]["reason"] == "CrashLoopBackOff" and not waiting["ready"]


def test_hosts_file_names_pods_and_one_ready_pod_per_service() -> None:
    other = {**POD, "metadata": {**POD["metadata"], "name": "web-1", "namespace": "ns"},
             "spec": {**POD["spec"], "hostname": "web-1"}, "status": {"podIP": "10.126.0.13"}}  # fmt: skip
    elsewhere = {
        **POD,
        "metadata": {**POD["metadata"], "namespace": "team-b"},
        "status": {"podIP": "10.126.0.20"},
    }
    service = {"metadata": {"name": "front", "namespace": "ns"}, "spec": {"selector": {"app": "web"}}}
    headless = {
        "metadata": {"name": "web", "namespace": "ns"},
        "spec": {"clusterIP": "None", "selector": {"app": "web"}},
    }
    text = podspec.hosts_file(
        "ns", [POD, other, elsewhere], [service, headless], lambda p: p["metadata"]["name"] == "web-1"
    )
    lines = text.splitlines()
    assert "10.126.0.12 web-0.web.ns.svc.cluster.local web-0.web.ns.svc web-0.web.ns web-0.web" in lines
    assert "10.126.0.20 web-0.web.team-b.svc.cluster.local web-0.web.team-b.svc web-0.web.team-b" in lines
    # The Service points at the ready pod; its short name only for pods of its own namespace.
    assert "10.126.0.13 front.ns.svc.cluster.local front.ns.svc front.ns front" in lines
    assert not any(line.split()[1:2] == ["web.ns.svc.cluster.local"] for line in lines)


def test_pods_asking_for_what_the_runtime_lacks_are_refused_with_a_reason() -> None:
    assert podspec.unsupported(POD) == ""
    assert "init containers" in podspec.unsupported({"spec": {"initContainers": [{"name": "i"}]}})
    assert "hostNetwork" in podspec.unsupported({"spec": {"hostNetwork": True}})


def test_a_pod_volume_over_the_programs_directory_does_not_hide_them() -> None:
    """An emptyDir at /tmp in a pod whose programs run from /tmp/cc/.venv (a checkout under
    /tmp): the sandbox binds the programs back over the volume."""
    from fireflyer.dev.runtime.sandbox import shadowed_software

    software = ["/tmp/cc", "/tmp/cc/.venv"]
    assert shadowed_software(["/tmp", "/etc/fireflyer/net"], software) == ["/tmp/cc"]
    assert shadowed_software(["/tmp/other", "/var/tmp"], software) == []
    assert shadowed_software(["/tmp/cc/.venv"], software) == ["/tmp/cc/.venv"]
    assert shadowed_software(["/"], software) == []
