"""What the pods the operator renders may do: seccomp, privilege escalation, capabilities, user and
root file system for the router, the units of each engine and the trainers; and the API key
Secret mounted into the router and the fireflyer engine's units."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from fireflyer.api.inference import InferenceDeployment
from fireflyer.api.training import TrainingJob
from fireflyer.cli import build_parser
from fireflyer.operator import pod_security as security
from fireflyer.operator.inference import children, mounts
from fireflyer.operator.training import children as training
from fireflyer.workloads import api_keys

REPO = Path(__file__).resolve().parents[2]
INFERENCE = yaml.safe_load((REPO / "manifests/samples/small/inference.yaml").read_text())
TRAINING = yaml.safe_load((REPO / "manifests/samples/small/training.yaml").read_text())
NODES = ("h100-000", "h100-001")
DOMAIN = ("leaf", "network.topology.nvidia.com/leaf", "leaf-00")


def _inference(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(INFERENCE)
    doc["metadata"] |= {"namespace": "serving", "uid": "cr-uid"}
    for key, value in spec.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return doc


def _unit_pod(doc: dict[str, Any], role: str = "decode") -> dict[str, Any]:
    spec = InferenceDeployment.model_validate(doc).spec
    nodes = NODES[: getattr(spec, role).nodes_per_unit]
    sts = children.statefulset(doc, spec, role, 0, nodes, DOMAIN, "2025-01-01T00:00:00Z")
    return sts["spec"]["template"]["spec"]


def _router(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = InferenceDeployment.model_validate(doc).spec
    deployment = children.router(doc, spec, {"decode": ["d0.svc"]})[0]
    pod = deployment["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _trainer_pod(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(TRAINING)
    doc["metadata"] |= {"namespace": "train", "uid": "cr-uid"}
    doc["spec"].update(spec)
    parsed = TrainingJob.model_validate(doc).spec
    job = training.job(doc, parsed, 0, NODES[: parsed.nodes], DOMAIN, "2025-01-01T00:00:00Z", [])
    return job["spec"]["template"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def _assert_locked_down(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """What every pod gets: seccomp, no escalation, every capability dropped, a writable /tmp."""
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "privileged" not in context
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volume = next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    assert volume == {"name": tmp["name"], "emptyDir": {}}


# -- the pure builders ---------------------------------------------------------------------------


def test_the_security_contexts() -> None:
    assert security.pod_security_context(non_root=False) == {"seccompProfile": {"type": "RuntimeDefault"}}
    non_root = security.pod_security_context(non_root=True)
    assert non_root["runAsNonRoot"] is True
    assert non_root["runAsUser"] == non_root["runAsGroup"] == non_root["fsGroup"] == 65532
    assert security.container_security_context(read_only_root=True) == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    added = security.container_security_context(read_only_root=False, add=["IPC_LOCK", "IPC_LOCK"])
    assert added["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert added["readOnlyRootFilesystem"] is False


# -- the router ------------------------------------------------------------------------------------


def test_the_router_runs_as_non_root_on_a_read_only_root_without_capabilities() -> None:
    pod, container = _router(_inference())
    _assert_locked_down(pod, container)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "add" not in container["securityContext"]["capabilities"]
    assert not any("hostPath" in v for v in pod["volumes"])
    assert "--api-key-file" not in container["args"]
    assert not any(v["name"] == mounts.API_KEYS_VOLUME for v in pod["volumes"])


def test_the_router_mounts_the_api_key_secret_and_reads_it() -> None:
    pod, container = _router(_inference(router={"apiKeySecret": "llm-keys"}))
    volume = next(v for v in pod["volumes"] if v["name"] == mounts.API_KEYS_VOLUME)
    assert volume["secret"] == {
        "secretName": "llm-keys",
        "items": [{"key": "api-keys", "path": "api-keys"}],
        "defaultMode": 0o440,  # readable through fsGroup, by nobody else
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == mounts.API_KEYS_VOLUME)
    assert mount["readOnly"] is True
    args = build_parser().parse_args(container["args"])
    assert args.api_key_file == f"{mount['mountPath']}/api-keys" == mounts.API_KEY_FILE
    assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in container.get("env", []))


# -- engine units -------------------------------------------------------------------------------


def test_fireflyer_units_keep_ipc_lock_for_rdma_and_a_read_only_root() -> None:
    doc = _inference()
    assert InferenceDeployment.model_validate(doc).spec.network.rdma_per_pod > 0
    for role in ("prefill", "decode"):
        pod = _unit_pod(doc, role)
        (container,) = pod["containers"]
        _assert_locked_down(pod, container)
        assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert _env(container)["HOME"] == "/tmp"  # Triton's and CUDA's caches land in the emptyDir
        # uid 0 in the container: an added capability is effective for uid 0 only.
        assert "runAsNonRoot" not in pod["securityContext"]
        # /tmp is mounted before anything that could sit below it.
        assert container["volumeMounts"][0]["mountPath"] == "/tmp"


def test_units_without_rdma_get_no_capability() -> None:
    pod = _unit_pod(_inference(network={"rdmaPerPod": 0}))
    assert "add" not in pod["containers"][0]["securityContext"]["capabilities"]


def test_another_engine_keeps_a_writable_root() -> None:
    pod = _unit_pod(_inference(engine={"kind": "vllm", "image": "vllm/vllm-openai:v0.9"}))
    (container,) = pod["containers"]
    _assert_locked_down(pod, container)
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    assert "HOME" not in _env(container)


def test_fireflyer_units_mount_the_api_keys_and_name_them_in_the_environment() -> None:
    pod = _unit_pod(_inference(router={"apiKeySecret": "llm-keys"}))
    (container,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if v["name"] == mounts.API_KEYS_VOLUME)
    assert volume["secret"]["secretName"] == "llm-keys"
    mount = next(m for m in container["volumeMounts"] if m["name"] == mounts.API_KEYS_VOLUME)
    assert mount["readOnly"] and mount["mountPath"] == "/etc/fireflyer/api-keys"
    # `fireflyer serve --api-key-file` defaults to this variable: the command line is engines.py's.
    assert _env(container)[api_keys.ENV] == mounts.API_KEY_FILE
    assert mounts.API_KEY_FILE_ENV == api_keys.ENV
    vllm = _unit_pod(_inference(router={"apiKeySecret": "k"}, engine={"kind": "vllm", "image": "v:1"}))
    assert not any(v["name"] == mounts.API_KEYS_VOLUME for v in vllm["volumes"])
    assert api_keys.ENV not in _env(vllm["containers"][0])


def test_the_api_key_secret_is_part_of_the_unit_revision_only_when_set() -> None:
    def revision(doc: dict[str, Any]) -> str:
        return children.revision(InferenceDeployment.model_validate(doc).spec, "decode", NODES)

    base = revision(_inference())
    keyed = revision(_inference(router={"apiKeySecret": "llm-keys"}))
    assert keyed != base  # the units start asking for keys: they are recreated
    assert revision(_inference(router={"apiKeySecret": "other-keys"})) not in (base, keyed)
    # Another engine mounts nothing: its units stay as they are.
    vllm = {"kind": "vllm", "image": "v:1"}
    assert revision(_inference(engine=vllm)) == revision(
        _inference(engine=vllm, router={"apiKeySecret": "k"})
    )


@pytest.mark.parametrize("name", ["", "Keys", "keys_1", "-keys", "keys-", "a" * 254])
def test_a_malformed_secret_name_is_refused(name: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        InferenceDeployment.model_validate(_inference(router={"apiKeySecret": name}))


# -- trainers ------------------------------------------------------------------------------------


def test_the_trainer_runs_fireflyer_train_on_a_read_only_root_with_ipc_lock_for_rdma() -> None:
    pod = _trainer_pod()
    (container,) = pod["containers"]
    _assert_locked_down(pod, container)
    assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert _env(container)["HOME"] == "/tmp"
    assert container["volumeMounts"][0]["mountPath"] == "/tmp"


def test_a_trainer_without_rdma_or_with_its_own_command() -> None:
    pod = _trainer_pod(network={"rdmaPerPod": 0, "preflight": False})
    assert "add" not in pod["containers"][0]["securityContext"]["capabilities"]
    own = _trainer_pod(command=["python", "/opt/train.py"])
    (container,) = own["containers"]
    _assert_locked_down(own, container)
    assert container["securityContext"]["readOnlyRootFilesystem"] is False  # its writes are unknown
    assert "HOME" not in _env(container)


def test_a_checkpoint_under_tmp_is_mounted_over_the_tmp_volume() -> None:
    pod = _trainer_pod(checkpoint={"path": "/tmp/checkpoints/run-1", "intervalSteps": 10, "keep": 2})
    paths = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert paths.index("/tmp") < paths.index("/tmp/checkpoints/run-1")
