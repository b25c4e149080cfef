"""Admin actions as Kubernetes Jobs, and the channel their results come back through.

Each step runs in a Job from the cluster's 3FS image: it runs the step's commands in order
(admin_cli, or fdbcli for FoundationDB's one-time configure), stopping at the first failure, then
stores the combined output (gzip, base64) and the exit code in a result ConfigMap the operator
created for the step, owned by the ThreeFSCluster. The operator reads it, records the step in
status, and removes Job and ConfigMaps. A result that outlives an operator restart is read on the
next pass, so a finished step is never run twice.

The root token never leaves Secrets and private files: the Job reads it from the token Secret
mounted as a file and hands it to admin_cli in a config file of its own (never on a command line);
the user-add step writes the new token straight into the token Secret and blanks it out of its
output, so neither the pod log, the result, status nor an Event carries it. The Job's identity may
patch only its step's result ConfigMap (and, during user-add, the token Secret), by name.

Contract for the image: /opt/3fs/bin/admin_cli, sh, cat, sed, gzip, base64, tr, head, mv and curl
(7.55 or later, for headers read from a file).
"""

from __future__ import annotations

import base64
import gzip
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fireflyer.api.threefs import ThreeFSClusterSpec
from fireflyer.operator.objects import owner_reference
from fireflyer.operator.threefs.children import (
    FDB_IMAGE,
    FDB_MOUNT,
    STEP,
    _fdb_volume,
    labels,
    name_of,
    token_secret_name,
)
from fireflyer.threefs.admin import COMMAND_MARK, FILES_DIR, USER_ADD, AdminStep
from fireflyer.threefs.config import CONFIG_DIR, FDB_CLUSTER_FILE, TOKEN_FILE

RUNNER = "fireflyer.dev/admin-runner"
RESULT_COMPONENT = "admin-result"
JOB_TTL_SECONDS = 3600
ADMIN_CLI = "/opt/3fs/bin/admin_cli"
WORK_DIR = "/run/3fs-admin"  # memory-backed, private to the Job: the token's config file lives here
TOKEN_CHARS = re.compile(r"^[A-Za-z0-9+/=._-]+$")

# Every program the script runs gets the token through a file or a pipe, never an argument
# (arguments are world-readable in /proc); printf and echo are shell builtins.
RUN_STEP = r"""
set -u
umask 077
work="$WORK_DIR"
out="$work/output"
cfg="$work/admin_cli.toml"
sa="${SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}"
: > "$out"
rc=0

api() {  # api METHOD PATH: a merge patch read from stdin, as this Job's ServiceAccount
  printf 'Authorization: Bearer %s\n' "$(cat "$sa/token")" > "$work/auth"
  curl --silent --show-error --fail --cacert "$sa/ca.crt" -H @"$work/auth" \
    -H 'Content-Type: application/merge-patch+json' -X "$1" --data-binary @- \
    "${API_SERVER:-https://kubernetes.default.svc}/api/v1/namespaces/$(cat "$sa/namespace")/$2" \
    > /dev/null
}

withhold() {  # withhold TOKEN: drop every output line that holds it
  [ -n "$1" ] || return 0
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      *"$1"*) printf '%s\n' "(a line holding the root token is withheld)" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done < "$out" > "$work/kept" && mv "$work/kept" "$out"
}

cat "$CONFIG_DIR/admin/admin_cli.toml" > "$cfg" 2>/dev/null || : > "$cfg"
token=""
if [ -s "$TOKEN_FILE" ]; then
  token=$(cat "$TOKEN_FILE")
  case "$token" in
    *[!A-Za-z0-9+/=._-]*) echo "the root token in $TOKEN_FILE has unexpected characters" >> "$out"; rc=1 ;;
    *) printf '\n[user_info]\ntoken = "%s"\n' "$token" >> "$cfg" ;;
  esac
fi

while [ "$rc" -eq 0 ] && { IFS= read -r cmd || [ -n "$cmd" ]; }; do
  [ -z "$cmd" ] && continue
  printf '%s%s\n' "$MARK" "$cmd" >> "$out"
  if [ "$RUNNER" = fdbcli ]; then
    fdbcli -C "$FDB_CLUSTER_FILE" --exec "$cmd" >> "$out" 2>&1 || rc=$?
  else
    "$ADMIN_CLI" -cfg "$cfg" "$cmd" >> "$out" 2>&1 || rc=$?
  fi
done < "$FILES_DIR/commands"

# `Token <token>(Expired at …)`, as admin_cli prints it (fireflyer.threefs.admin.TOKEN_PATTERN).
found='s/^Token[[:space:]]\{1,\}\([^([:space:]]\{1,\}\)(Expired at [^)]*)[[:space:]]*$/\1/p'
blank='s/^\(Token[[:space:]]\{1,\}\)[^([:space:]]\{1,\}/\1<redacted>/'
new=""
if [ "$rc" -eq 0 ] && [ -n "${TOKEN_SECRET:-}" ]; then
  new=$(sed -n "$found" "$out" | head -n 1)
  if [ -z "$new" ]; then
    echo "user-add printed no token" >> "$out"; rc=1
  elif ! printf '{"data":{"token":"%s"}}' "$(printf '%s' "$new" | base64 | tr -d '\n')" \
      | api PATCH "secrets/$TOKEN_SECRET"; then
    echo "could not store the root token in Secret $TOKEN_SECRET" >> "$out"; rc=1
  fi
fi
sed "$blank" "$out" > "$work/kept" && mv "$work/kept" "$out" || : > "$out"
withhold "$token"
withhold "$new"

cat "$out"
printf '{"binaryData":{"output.gz":"%s"},"data":{"exitCode":"%s"}}' \
  "$(gzip -c "$out" | base64 | tr -d '\n')" "$rc" | api PATCH "configmaps/$RESULT"
exit "$rc"
"""


def job_name(cluster: str, step: str) -> str:
    return name_of(cluster, f"admin-{step}")


def result_name(cluster: str, step: str) -> str:
    return name_of(cluster, f"admin-{step}-result")


def service_account_name(cluster: str) -> str:
    return name_of(cluster, "admin")


def rbac(cr: dict[str, Any], steps: Sequence[str]) -> list[dict[str, Any]]:
    """The admin Jobs' identity: it may patch the result ConfigMaps of the steps in flight and,
    while user-add runs, the token Secret — each by name; nothing else. No step in flight: no
    rule at all (a rule with an empty name list would cover every name)."""
    cluster = cr["metadata"]["name"]
    namespace = cr["metadata"]["namespace"]
    meta = {
        "name": service_account_name(cluster),
        "namespace": namespace,
        "labels": labels(cluster, "admin"),
        "ownerReferences": [owner_reference(cr)],
    }
    rules: list[dict[str, Any]] = []
    if steps:
        results = sorted({result_name(cluster, step) for step in steps})
        rules.append(
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"], "resourceNames": results}
        )
    if USER_ADD in steps:
        rules.append(
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "verbs": ["patch"],
                "resourceNames": [token_secret_name(cluster)],
            }
        )
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": meta["name"], "namespace": namespace}],
        },
    ]


def result_config_map(cr: dict[str, Any], step: str) -> dict[str, Any]:
    """Created empty with the Job; the Job fills it in (its Role may patch it, not create it)."""
    cluster = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": result_name(cluster, step),
            "namespace": cr["metadata"]["namespace"],
            "labels": {**labels(cluster, RESULT_COMPONENT), STEP: step},
            "ownerReferences": [owner_reference(cr)],
        },
    }


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
    env = [
        {"name": "RUNNER", "value": runner},
        {"name": "MARK", "value": COMMAND_MARK},
        {"name": "ADMIN_CLI", "value": ADMIN_CLI},
        {"name": "CONFIG_DIR", "value": CONFIG_DIR},
        {"name": "FILES_DIR", "value": FILES_DIR},
        {"name": "FDB_CLUSTER_FILE", "value": FDB_CLUSTER_FILE},
        {"name": "TOKEN_FILE", "value": TOKEN_FILE},
        {"name": "WORK_DIR", "value": WORK_DIR},
        {"name": "RESULT", "value": result_name(cluster, step.name)},
    ]
    if step.name == USER_ADD:
        env.append({"name": "TOKEN_SECRET", "value": token_secret_name(cluster)})
    mounts = [
        {"name": "step", "mountPath": FILES_DIR, "readOnly": True},
        FDB_MOUNT,
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "token", "mountPath": TOKEN_FILE.rsplit("/", 1)[0], "readOnly": True},
    ]
    volumes = [
        {"name": "step", "configMap": {"name": job_name(cluster, step.name)}},
        _fdb_volume(cluster),
        {"name": "work", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        # Optional: it holds no token before user-add has run.
        {
            "name": "token",
            "secret": {"secretName": token_secret_name(cluster), "optional": True, "defaultMode": 0o400},
        },
    ]
    for component in ("admin", "mgmtd", "meta", "storage", "fuse"):
        mounts.append({"name": f"{component}-config", "mountPath": f"{CONFIG_DIR}/{component}"})
        volumes.append(
            {
                "name": f"{component}-config",
                "configMap": {"name": name_of(cluster, f"{component}-config"), "optional": True},
            }
        )
    pod_labels = {**labels(cluster, "admin"), STEP: step.name, RUNNER: runner}
    rdma = spec.network.transport == "rdma" and runner == "admin_cli"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(cluster, step.name),
            "namespace": cr["metadata"]["namespace"],
            "labels": pod_labels,
            "ownerReferences": [owner_reference(cr)],
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
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "admin",
                            "image": FDB_IMAGE if runner == "fdbcli" else spec.image,
                            "command": ["/bin/sh", "-c", RUN_STEP],
                            "workingDir": WORK_DIR,  # admin_cli writes its log file here
                            "env": env,
                            "volumeMounts": mounts,
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                # admin_cli over RDMA pins its buffers.
                                "capabilities": {"drop": ["ALL"], **({"add": ["IPC_LOCK"]} if rdma else {})},
                            },
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


def has_result(config_map: dict[str, Any]) -> bool:
    """Whether the Job has filled in its result ConfigMap (it is created empty)."""
    return "exitCode" in (config_map.get("data") or {})


def read_result(config_map: dict[str, Any]) -> StepResult:
    """A result ConfigMap filled in by an admin Job; ValueError when it is malformed."""
    data = config_map.get("data") or {}
    binary = config_map.get("binaryData") or {}
    step = (config_map["metadata"].get("labels") or {}).get(STEP, "")
    try:
        output = gzip.decompress(base64.b64decode(binary.get("output.gz", ""))).decode(errors="replace")
        exit_code = int(data.get("exitCode", "") or "1")
    except (ValueError, OSError) as error:
        raise ValueError(f"result of step {step!r} is unreadable: {error}") from error
    return StepResult(step, exit_code, output)


def encode_result(exit_code: int, output: str) -> dict[str, dict[str, str]]:
    """The merge patch the Job's script sends to its result ConfigMap."""
    return {
        "binaryData": {"output.gz": base64.b64encode(gzip.compress(output.encode())).decode()},
        "data": {"exitCode": str(exit_code)},
    }
