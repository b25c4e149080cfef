"""3FS cannot be used to root a node, and its root token stays secret: the FUSE DaemonSet, the
disk-wipe Job and the admin Jobs as built, and the admin Job's own shell script run for real
against the admin_cli contract double, with every program it starts recording its arguments."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fireflyer.api.threefs import CLIENT_NODE_LABEL, ThreeFSCluster
from fireflyer.operator.threefs import admin_jobs, children
from fireflyer.operator.threefs.cleanup import wipe_job
from fireflyer.threefs import admin

REPO = Path(__file__).resolve().parents[2]
DOUBLE = REPO / "tests" / "doubles" / "admin_cli.py"
SAMPLE = yaml.safe_load((REPO / "manifests/samples/threefs-cluster.yaml").read_text())
SA_TOKEN = "service-account-token-value"


def _cr(**clients: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["metadata"].update(namespace="ns", uid="0123-4567")
    doc["spec"]["clients"].update(clients)
    return doc


def _spec(cr: dict[str, Any]) -> Any:
    return ThreeFSCluster.model_validate(cr).spec


def _shell_lines(obj: dict[str, Any]) -> list[str]:
    pod = obj["spec"]["template"]["spec"]
    return [
        c["command"][2]
        for c in [*pod.get("initContainers", []), *pod["containers"]]
        if c.get("command", [])[:2] == ["/bin/sh", "-c"]
    ]


# -- FUSE clients ----------------------------------------------------------------------------


def test_fuse_pods_share_only_the_mount_point_and_run_only_on_picked_nodes() -> None:
    cr = _cr(mountPoint="/mnt/3fs/stage")
    pod = children.fuse_daemonset(cr, _spec(cr), "digest")["spec"]["template"]["spec"]
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/mnt/3fs/stage", "/dev/fuse", "/dev/shm"}
    [propagated] = [m for m in pod["containers"][0]["volumeMounts"] if m.get("mountPropagation")]
    assert propagated == {"name": "mount", "mountPath": "/mnt/3fs/stage", "mountPropagation": "Bidirectional"}
    assert pod["nodeSelector"] == SAMPLE["spec"]["clients"]["nodeSelector"]
    assert pod["automountServiceAccountToken"] is False
    token = next(v for v in pod["volumes"] if v["name"] == "token")
    assert token["secret"]["defaultMode"] == 0o400


def test_fuse_pods_default_to_labelled_client_nodes() -> None:
    cr = _cr()
    del cr["spec"]["clients"]["nodeSelector"]
    pod = children.fuse_daemonset(cr, _spec(cr), "digest")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {CLIENT_NODE_LABEL: "true"}


def test_no_shell_line_carries_a_user_path() -> None:
    """The mount point and the disk paths reach pods as arguments and volumes, never as shell text;
    what shell text there is is valid shell."""
    cr = _cr(mountPoint="/data/3fs-x.y_z")
    spec = _spec(cr)
    objects = [
        children.fuse_daemonset(cr, spec, "d"),
        children.storage_statefulset(cr, spec, "d"),
        children.service_statefulset(cr, spec, "meta", "meta_main", 1, "d"),
        wipe_job(cr, "node-1", spec),
        admin_jobs.job(cr, spec, admin.user_add()),
    ]
    for obj in objects:
        for line in _shell_lines(obj):
            assert subprocess.run(["/bin/sh", "-n", "-c", line]).returncode == 0, line
            assert "/data/3fs-x.y_z" not in line and "/storage/data" not in line, line


# -- disk wipe -------------------------------------------------------------------------------


def test_wipe_job_is_owned_unprivileged_and_tolerates_only_the_storage_taints() -> None:
    cr = _cr()
    taint = {"key": "dedicated", "operator": "Equal", "value": "3fs", "effect": "NoSchedule"}
    cr["spec"]["storage"]["tolerations"] = [taint]
    job = wipe_job(cr, "node-7", _spec(cr))
    assert job["metadata"]["ownerReferences"][0]["uid"] == "0123-4567"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "ThreeFSCluster"
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeName"] == "node-7" and pod["tolerations"] == [taint]
    assert pod["automountServiceAccountToken"] is False
    context = pod["containers"][0]["securityContext"]
    assert "privileged" not in context and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "FOWNER"]}
    del cr["spec"]["storage"]["tolerations"]
    assert "tolerations" not in wipe_job(cr, "node-7", _spec(cr))["spec"]["template"]["spec"]


# -- admin Jobs ------------------------------------------------------------------------------


def test_admin_job_reads_the_token_from_a_file_and_its_role_names_what_it_may_write() -> None:
    cr = _cr()
    job = admin_jobs.job(cr, _spec(cr), admin.health(3))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert all("valueFrom" not in e for e in container["env"])  # no token in the environment
    token = next(v for v in pod["volumes"] if v["name"] == "token")
    assert token["secret"] == {"secretName": "threefs-token", "optional": True, "defaultMode": 0o400}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    sa, role, binding = admin_jobs.rbac(cr, ["health-3"])
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["patch"],
            "resourceNames": ["threefs-admin-health-3-result"],
        }
    ]
    account = sa["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "ns"}]
    # Nothing in flight: no rule (an empty name list would mean every name).
    assert admin_jobs.rbac(cr, [])[1]["rules"] == []


def test_redaction_blanks_every_token_line() -> None:
    output = "$ user-add --root --admin 0 root\nUid 0\nToken AAAxyz(Expired at N/A)\nToken   BBB\nTokens 3\n"
    redacted = admin.redact(output)
    assert "AAAxyz" not in redacted and "BBB" not in redacted
    assert "Token <redacted>(Expired at N/A)" in redacted and "Tokens 3" in redacted


# -- the admin Job's script, run ------------------------------------------------------------

SHIM = """#!/bin/sh
printf '%s\\n' "$(basename "$0")" "$@" >> "$ARGV_LOG"
printf '\\n' >> "$ARGV_LOG"
exec {real} "$@"
"""

FAKE_CURL = """#!{python}
import json, os, sys
args = sys.argv[1:]
record = {{"argv": args, "method": args[args.index("-X") + 1], "url": args[-1], "body": sys.stdin.read()}}
for i, a in enumerate(args):
    if a == "-H" and args[i + 1].startswith("@"):
        record["header_file"] = open(args[i + 1][1:]).read()
with open(os.environ["CURL_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


class Pod:
    """A directory laid out like the admin Job's pod, and the script run in it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state.json"
        sys.path.insert(0, str(DOUBLE.parent))
        import admin_cli as double

        state = double._empty()
        state["cluster"] = {"chainTableId": 1, "chunkSize": 1048576, "stripeSize": 4}
        double.save(self.state, state)
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        for program in ("cat", "sed", "head", "mv", "gzip", "base64", "tr"):
            real = shutil.which(program)
            assert real, program
            (bin_dir / program).write_text(SHIM.format(real=real))
        (bin_dir / "admin_cli").write_text(
            SHIM.format(real=f"{sys.executable} {DOUBLE} --state {self.state} --root /")
        )
        (bin_dir / "curl").write_text(FAKE_CURL.format(python=sys.executable))
        for shim in bin_dir.iterdir():
            shim.chmod(0o755)
        for folder in ("work", "etc/admin", "files", "token", "sa"):
            (tmp / folder).mkdir(parents=True)
        (tmp / "etc/admin/admin_cli.toml").write_text("cluster_id = 'threefs'\n")
        (tmp / "sa/token").write_text(SA_TOKEN)
        (tmp / "sa/ca.crt").write_text("")
        (tmp / "sa/namespace").write_text("ns")
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "ARGV_LOG": str(tmp / "argv.log"),
            "CURL_LOG": str(tmp / "curl.log"),
            "SA_DIR": str(tmp / "sa"),
            "API_SERVER": "https://api.invalid",
            "RUNNER": "admin_cli",
            "MARK": admin.COMMAND_MARK,
            "ADMIN_CLI": str(bin_dir / "admin_cli"),
            "CONFIG_DIR": str(tmp / "etc"),
            "FILES_DIR": str(tmp / "files"),
            "FDB_CLUSTER_FILE": str(tmp / "fdb.cluster"),
            "TOKEN_FILE": str(tmp / "token/token"),
            "WORK_DIR": str(tmp / "work"),
            "RESULT": "threefs-admin-step-result",
        }

    def run(self, *commands: str, token_secret: str = "") -> subprocess.CompletedProcess[str]:
        (self.tmp / "files/commands").write_text("\n".join(commands) + "\n")
        for log in ("argv.log", "curl.log"):
            (self.tmp / log).write_text("")
        env = dict(self.env, **({"TOKEN_SECRET": token_secret} if token_secret else {}))
        return subprocess.run(
            ["/bin/sh", "-c", admin_jobs.RUN_STEP], env=env, capture_output=True, text=True, timeout=60
        )

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.tmp / "curl.log").read_text().splitlines()]

    def argv(self) -> str:
        return (self.tmp / "argv.log").read_text()

    def root_token(self) -> str:
        return str(json.loads(self.state.read_text())["users"]["root"]["token"])


def _result(request: dict[str, Any]) -> admin_jobs.StepResult:
    patch = json.loads(request["body"])
    return admin_jobs.read_result({"metadata": {"labels": {}}, **patch})


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_user_add_token_goes_only_into_its_secret(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    run = pod.run("user-add --root --admin 0 root", token_secret="threefs-token")
    assert run.returncode == 0, run.stdout + run.stderr
    token = pod.root_token()
    store, result = pod.requests()
    assert store["method"] == "PATCH" and store["url"].endswith("/namespaces/ns/secrets/threefs-token")
    assert json.loads(store["body"]) == {"data": {"token": base64.b64encode(token.encode()).decode()}}
    assert result["url"].endswith("/namespaces/ns/configmaps/threefs-admin-step-result")
    step = _result(result)
    assert step.ok and re.search(r"^Token +<redacted>\(Expired at N/A\)$", step.output, re.MULTILINE)
    # Neither the pod's log, the result, nor any program's arguments (the process list) hold the
    # root token or the ServiceAccount's token; the latter travels in a header file.
    curl_argv = json.dumps([r["argv"] for r in pod.requests()])
    for text in (run.stdout, run.stderr, step.output, pod.argv(), curl_argv):
        assert token not in text and SA_TOKEN not in text
    assert store["header_file"] == f"Authorization: Bearer {SA_TOKEN}\n"
    assert "admin_cli" in pod.argv() and "sed" in pod.argv()  # the recording did record


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_later_steps_authenticate_through_a_private_config_file(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    assert pod.run("user-add --root --admin 0 root", token_secret="threefs-token").returncode == 0
    token = pod.root_token()
    (tmp_path / "token/token").write_text(token)
    (tmp_path / "meta.toml").write_text("[common]\n")
    command = f"set-config --type META --file {tmp_path / 'meta.toml'}"
    run = pod.run(command)
    assert run.returncode == 0, run.stdout + run.stderr
    [result] = pod.requests()
    assert _result(result).ok
    assert token not in pod.argv() and token not in run.stdout
    config = (tmp_path / "work/admin_cli.toml").read_text()
    assert f'[user_info]\ntoken = "{token}"' in config
    assert (tmp_path / "work/admin_cli.toml").stat().st_mode & 0o077 == 0

    # A wrong token: admin_cli refuses, the step fails, and the output says so without a token.
    (tmp_path / "token/token").write_text("AAAwrong")
    run = pod.run(command)
    assert run.returncode == 1
    failed = _result(pod.requests()[0])
    assert failed.exit_code == 1 and "authentication failed" in failed.output
    assert "AAAwrong" not in failed.output and "AAAwrong" not in pod.argv()

    # A token that could break out of the TOML string is refused before anything runs.
    (tmp_path / "token/token").write_text('x"\n[evil]')
    run = pod.run(command)
    assert run.returncode == 1 and "unexpected characters" in _result(pod.requests()[0]).output
    assert "$ set-config" not in _result(pod.requests()[0]).output


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_the_script_and_the_operator_read_a_token_line_alike(tmp_path: Path) -> None:
    """The Job finds and blanks the token with sed; the operator's parser and redaction (and the
    dev cluster's admin runner) use the Python patterns: both agree on admin_cli's output."""
    pod = Pod(tmp_path)
    raw = subprocess.run(
        [sys.executable, str(DOUBLE), "--state", str(pod.state), "--root", "/", "-cfg",
         str(tmp_path / "etc/admin/admin_cli.toml"), "user-add --root --admin 0 alice"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    pod.run("user-add --root --admin 0 root", token_secret="threefs-token")
    token = pod.root_token()
    assert admin.parse_token(raw) != token  # alice's, a different one
    stored = base64.b64decode(json.loads(pod.requests()[0]["body"])["data"]["token"]).decode()
    assert stored == token
    script_output = _result(pod.requests()[1]).output
    assert admin.redact(script_output) == script_output  # nothing left to blank
    assert gzip.decompress(base64.b64decode(json.loads(pod.requests()[1]["body"])["binaryData"]["output.gz"]))
