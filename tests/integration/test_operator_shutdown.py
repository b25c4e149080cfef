"""The operator stops within 10 s of SIGTERM while reconciles are queued and running."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import running_operator
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.integration
DEPLOYMENTS = 30
EXIT_LIMIT_SECONDS = 10.0


def _deployment(i: int) -> dict[str, Any]:
    role = {
        "units": 1,
        "nodesPerUnit": 1,
        "gpusPerNode": 8,
        "parallelism": {"tensor": 1, "data": 8, "expert": 8},
    }
    return {
        "apiVersion": "fireflyer.dev/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": f"stop-{i:02d}"},
        "spec": {
            "model": {"name": f"m{i}", "source": "/3fs/stage/models/m"},
            "prefill": role,
            "decode": role,
            "router": {"replicas": 1},
            # Planned and reported, never placed: the cluster's GPUs stay free for other tests.
            "placement": {"nodeSelector": {"fireflyer.dev/no-such-label": "x"}},
        },
    }


def test_sigterm_under_load_ends_the_operator_within_ten_seconds(
    crds: Kube, kube: Kube, tmp_path: Path
) -> None:
    log = tmp_path / "operator.log"
    with running_operator(crds.kubeconfig, log, watch_namespace=kube.namespace) as op:
        assert op.proc is not None
        # Its own start, not only a status: the session's cluster-wide operator, when an earlier
        # test started it, reconciles these deployments too and could write the first status.
        wait_for("the operator to start", lambda: log.exists() and "operator started" in log.read_text(), 60)
        kube.apply([_deployment(i) for i in range(DEPLOYMENTS)])

        def reconciling() -> bool:
            items = kube.get("inferencedeployments")["items"]
            return any((item.get("status") or {}).get("conditions") for item in items)

        wait_for("the first reconcile's status", reconciling, timeout=60)
        signalled = time.monotonic()
        op.proc.send_signal(signal.SIGTERM)
        try:
            code = op.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the operator still runs 30 s after SIGTERM:\n{op.tail()}")
        took = time.monotonic() - signalled
        pending = [
            item["metadata"]["name"]
            for item in kube.get("inferencedeployments")["items"]
            if not (item.get("status") or {}).get("conditions")
        ]
    assert took <= EXIT_LIMIT_SECONDS, f"exit took {took:.1f} s:\n{op.tail()}"
    assert code == 0, op.tail()
    assert "SIGTERM received" in log.read_text()
    print(f"exit {took:.2f} s after SIGTERM; {len(pending)} deployments never reconciled")
