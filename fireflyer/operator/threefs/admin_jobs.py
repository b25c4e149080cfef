"""Admin actions as Kubernetes Jobs, and the channel their results come back through.

Each step runs in a Job from the cluster's 3FS image: it runs the step's commands in order
(admin_cli, or fdbcli for FoundationDB's one-time configure), stopping at the first failure, then
stores the combined output (gzip, base64) and the exit code in a Secret named after the step,
owned by the ThreeFSCluster. The operator reads that Secret, records the step in status, and
removes Job and Secret. A result that outlives an operator restart is read on the next pass, so a
finished step is never run twice.

Contract for the image: /opt/3fs/bin/admin_cli, sh, gzip, base64 and curl (the same tools 3FS's
own Kubernetes bootstrap script relies on).
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import dataclass
from typing import Any

from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator.objects import owner_reference
from fireflyer.operator.threefs.children import (
    CLUSTER,
    FDB_IMAGE,
    FDB_MOUNT,
    STEP,
    _fdb_volume,
    labels,
    name_of,
    token_secret_name,
)
from fireflyer.threefs.admin import COMMAND_MARK, FILES_DIR, AdminStep
from fireflyer.threefs.config import CONFIG_DIR, FDB_CLUSTER_FILE

RUNNER = "fireflyer.dev/admin-runner"
JOB_TTL_SECONDS = 3600
ADMIN_CLI = "/opt/3fs/bin/admin_cli"

RUN_STEP = r"""
set -u
out=/tmp/step-output
: > "$out"
rc=0
while IFS= read -r cmd || [ -n "$cmd" ]; do
  [ -z "$cmd" ] && continue
  printf '%s%s\n' "$MARK" "$cmd" >> "$out"
  if [ "$RUNNER" = fdbcli ]; then
    fdbcli -C "$FDB_CLUSTER_FILE" --exec "$cmd" >> "$out" 2>&1 || rc=$?
  else
    "$ADMIN_CLI" -cfg "$CONFIG_DIR/admin/admin_cli.toml" \
      --config.user_info.token "${TOKEN:-}" "$cmd" >> "$out" 2>&1 || rc=$?
  fi
  [ "$rc" -ne 0 ] && break
done < "$FILES_DIR/commands"
cat "$out"
payload=$(gzip -c "$out" | base64 | tr -d '\n')
exit_b64=$(printf '%s' "$rc" | base64)
sa=/var/run/secrets/kubernetes.io/serviceaccount
meta=$(printf '{"name":"%s","labels":{"%s":"%s","%s":"%s"},"ownerReferences":[%s]}' \
  "$RESULT" "$CLUSTER_LABEL" "$CLUSTER_NAME" "$STEP_LABEL" "$STEP_NAME" "$OWNER")
body=$(printf '{"apiVersion":"v1","kind":"Secret","metadata":%s,"data":{"output.gz":"%s","exitCode":"%s"}}' \
  "$meta" "$payload" "$exit_b64")
url="https://kubernetes.default.svc/api/v1/namespaces/$(cat $sa/namespace)/secrets"
curl --silent --show-error --fail --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat $sa/token)" \
  -H 'Content-Type: application/json' -X POST -d "$body" "$url" > /dev/null \
  || curl --silent --show-error --fail --cacert "$sa/ca.crt" -H "Authorization: Bearer $(cat $sa/token)" \
       -H 'Content-Type: application/json' -X PUT -d "$body" "$url/$RESULT" > /dev/null
exit "$rc"
"""


def job_name(cluster: str, step: str) -> str:
    return name_of(cluster, f"admin-{step}")


def result_name(cluster: str, step: str) -> str:
    return name_of(cluster, f"admin-{step}-result")


def service_account_name(cluster: str) -> str:
    return name_of(cluster, "admin")


def rbac(cr: dict[str, Any]) -> list[dict[str, Any]]:
    """The admin Jobs' identity: it may write result Secrets in this namespace, nothing more."""
    cluster = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    meta = {
        "name": service_account_name(cluster),
        "namespace": namespace,
        "labels": labels(cluster, "admin"),
        "ownerReferences": [owner_reference(cr)],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "update"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": meta["name"], "namespace": namespace}],
        },
    ]


def step_config_map(cr: dict[str, Any], step: AdminStep) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": job_name(cluster, step.name),
            "namespace": cr["metadata"]["namespace"],
            "labels": {**labels(cluster, "admin"), STEP: step.name},
            "ownerReferences": [owner_reference(cr)],
        },
        "data": {"commands": "\n".join(step.commands) + "\n", **step.files},
    }


def job(
    cr: dict[str, Any], spec: ThreeFSClusterSpec, step: AdminStep, runner: str = "admin_cli"
) -> dict[str, Any]:
    cluster = cr["metadata"]["name"]
    owner = owner_reference(cr)
    owner_json = (
        f'{{"apiVersion":"{owner["apiVersion"]}","kind":"{owner["kind"]}","name":"{owner["name"]}",'
        f'"uid":"{owner["uid"]}","controller":false}}'
    )
    env = [
        {"name": "RUNNER", "value": runner},
        {"name": "MARK", "value": COMMAND_MARK},
        {"name": "ADMIN_CLI", "value": ADMIN_CLI},
        {"name": "CONFIG_DIR", "value": CONFIG_DIR},
        {"name": "FILES_DIR", "value": FILES_DIR},
        {"name": "FDB_CLUSTER_FILE", "value": FDB_CLUSTER_FILE},
        {"name": "RESULT", "value": result_name(cluster, step.name)},
        {"name": "CLUSTER_LABEL", "value": CLUSTER},
        {"name": "CLUSTER_NAME", "value": cluster},
        {"name": "STEP_LABEL", "value": STEP},
        {"name": "STEP_NAME", "value": step.name},
        {"name": "OWNER", "value": owner_json},
        {
            "name": "TOKEN",
            "valueFrom": {
                "secretKeyRef": {"name": token_secret_name(cluster), "key": "token", "optional": True}
            },
        },
    ]
    mounts = [{"name": "step", "mountPath": FILES_DIR}, FDB_MOUNT]
    volumes = [{"name": "step", "configMap": {"name": job_name(cluster, step.name)}}, _fdb_volume(cluster)]
    for component in ("admin", "mgmtd", "meta", "storage", "fuse"):
        mounts.append({"name": f"{component}-config", "mountPath": f"{CONFIG_DIR}/{component}"})
        volumes.append(
            {
                "name": f"{component}-config",
                "configMap": {"name": name_of(cluster, f"{component}-config"), "optional": True},
            }
        )
    pod_labels = {**labels(cluster, "admin"), STEP: step.name, RUNNER: runner}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(cluster, step.name),
            "namespace": cr["metadata"]["namespace"],
            "labels": pod_labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": 0,  # the operator decides about retries, after reading the output
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": service_account_name(cluster),
                    "hostNetwork": spec.network.host_network,
                    "dnsPolicy": "ClusterFirstWithHostNet" if spec.network.host_network else "ClusterFirst",
                    "containers": [
                        {
                            "name": "admin",
                            "image": FDB_IMAGE if runner == "fdbcli" else spec.image,
                            "command": ["/bin/sh", "-c", RUN_STEP],
                            "env": env,
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


@dataclass(frozen=True)
class StepResult:
    step: str
    exit_code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def read_result(secret: dict[str, Any]) -> StepResult:
    """A result Secret written by an admin Job; ValueError when it is malformed."""
    data = secret.get("data") or {}
    step = (secret["metadata"].get("labels") or {}).get(STEP, "")
    try:
        output = gzip.decompress(base64.b64decode(data.get("output.gz", ""))).decode(errors="replace")
        exit_code = int(base64.b64decode(data.get("exitCode", "")).decode() or "1")
    except (ValueError, OSError) as error:
        raise ValueError(f"result of step {step!r} is unreadable: {error}") from error
    return StepResult(step, exit_code, output)


def encode_result(exit_code: int, output: str) -> dict[str, str]:
    """The `data` of a result Secret, as the Job's script writes it."""
    return {
        "output.gz": base64.b64encode(gzip.compress(output.encode())).decode(),
        "exitCode": base64.b64encode(str(exit_code).encode()).decode(),
    }
