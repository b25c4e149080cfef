"""Rank 0's status endpoint, `GET /status`, which the operator polls:
{"step", "loss", "lastCheckpointStep", "tokensPerSecond", "phase"}, and "message" once a run stopped on
request (why, e.g. "checkpointed at step 40 on request").

http.server in a daemon thread: one tiny JSON document, no framework needed, and it keeps
answering while the training loop holds the main thread.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fireflyer.workloads.train.config import TrainError

# starting → loading (model, data, checkpoint) → training → finishing (last checkpoint) → done | failed;
# stopped: checkpointed and ended on request (SIGTERM, SIGUSR1) before --steps.
PHASES = ("starting", "loading", "training", "finishing", "done", "failed", "stopped")


class Status:
    """The numbers the endpoint serves; the training loop updates them, the server reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {
            "step": 0,
            "loss": None,
            "lastCheckpointStep": None,
            "tokensPerSecond": 0.0,
            "phase": "starting",
        }

    OPTIONAL = ("message",)
    """Served only once set: why a run stopped on request."""

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - set(self._fields) - set(self.OPTIONAL)
        if unknown:
            raise KeyError(f"unknown status fields: {', '.join(sorted(unknown))}")
        if "phase" in fields and fields["phase"] not in PHASES:
            raise ValueError(f"unknown phase {fields['phase']!r}")
        with self._lock:
            self._fields.update(fields)

    def snapshot(self) -> dict[str, Any]:
        """The fields as JSON values: a NaN or infinite loss becomes null (JSON has no NaN)."""
        with self._lock:
            fields = dict(self._fields)
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}


class StatusServer:
    """Serves `status` at http://host:port/status until `close()`."""

    def __init__(self, status: Status, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/status", "/status/"):
                    self.send_error(404, "only /status is served")
                    return
                body = json.dumps(status.snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # polls would flood stderr
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as error:
            raise TrainError(f"--status-port {port}: cannot listen on {host} ({error.strerror})") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="train-status", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
