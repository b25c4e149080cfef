"""TrainingJob progress from rank 0: the status fields read from its /status and its
termination message, and the flags the operator renders for `fireflyer train`."""

from __future__ import annotations

import argparse
import http.server
import json
import threading
from typing import Any

import pytest

from fireflyer.cli import build_parser
from fireflyer.operator.training import children
from fireflyer.operator.training.controller import fetch_progress
from fireflyer.operator.training.plan import plan
from fireflyer.operator.training.progress import progress_changes, progress_status, rank0_address
from tests.unit.training_plan_harness import (
    job_child,
    observed_with,
    pods_of,
    started_job,
    training_job,
)


def test_status_from_rank_zero() -> None:
    polled = {"step": 120, "loss": 2.5, "lastCheckpointStep": 100, "tokensPerSecond": 5e5, "phase": "train"}
    assert progress_status(polled) == {
        "step": 120,
        "loss": 2.5,
        "lastCheckpointStep": 100,
        "tokensPerSecond": 500000.0,
    }
    # values of the wrong type or not finite are left out, never written
    assert progress_status({"step": "7", "loss": float("nan"), "lastCheckpointStep": None}) == {}
    assert progress_status({"step": True, "loss": float("inf")}) == {}
    # only what changed is patched
    assert progress_changes({"step": 120, "loss": 2.5}, polled) == {
        "lastCheckpointStep": 100,
        "tokensPerSecond": 5e5,
    }
    assert progress_changes(progress_status(polled), polled) == {}


def test_rank_zero_is_found_by_completion_index_and_pod_ip() -> None:
    job = started_job(training_job())
    pods = pods_of(job)
    assert rank0_address(pods) == "10.1.0.0"
    pods[0]["status"]["phase"] = "Pending"
    assert rank0_address(pods) is None


@pytest.mark.parametrize("name", ["a.b.c", "9lives", "x" * 80])
def test_child_names_are_dns_labels_short_enough_for_host_names(name: str) -> None:
    child = children.child_name(name)
    assert child[0].isalpha() and "." not in child and len(f"{child}-8191") <= 63
    assert len(children.label_value(name)) <= 63


def test_rendered_arguments_are_ones_the_trainer_accepts() -> None:
    """Every flag the operator renders for `fireflyer train` parses (argparse exits on an unknown
    flag or a bad value)."""
    parser = build_parser()
    commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    assert "train" in commands
    for cr in (training_job(), training_job(steps=5, microBatches=8)):
        container = job_child(plan(cr, observed_with()))["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["fireflyer", "train"]
        parser.parse_args(["train", *container["args"]])


def test_progress_is_fetched_and_a_silent_trainer_is_tolerated() -> None:
    body = json.dumps({"step": 3, "loss": 1.5, "lastCheckpointStep": None, "phase": "train"}).encode()

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/status" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        polled = fetch_progress("127.0.0.1", server.server_address[1], timeout=2)
        assert polled is not None and progress_status(polled) == {"step": 3, "loss": 1.5}
    finally:
        server.shutdown()
        server.server_close()
    assert fetch_progress("127.0.0.1", server.server_address[1], timeout=0.5) is None


def test_a_succeeded_job_reports_rank0s_final_step_from_its_termination_message() -> None:
    """The poller cannot reach rank 0 once it has exited; its last /status is its termination
    message, and the job's final status carries it."""
    job = started_job(training_job())
    pods = pods_of(job, "Succeeded")
    final = {"step": 1000, "loss": 1.25, "lastCheckpointStep": 1000, "tokensPerSecond": 9.0, "phase": "done"}
    for pod, message in zip(pods, [json.dumps(final), "not json"], strict=True):
        pod["status"]["containerStatuses"] = [
            {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": message}}}
        ]
    desired = plan(training_job({"phase": "Running", "step": 990}), observed_with(job, pods))
    assert desired.status["phase"] == "Succeeded"
    assert (desired.status["step"], desired.status["loss"], desired.status["lastCheckpointStep"]) == (
        1000,
        1.25,
        1000,
    )
    # Rank 1's message is not rank 0's: without one from rank 0 nothing is claimed.
    pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = ""
    assert "step" not in plan(training_job({"phase": "Running"}), observed_with(job, pods)).status
