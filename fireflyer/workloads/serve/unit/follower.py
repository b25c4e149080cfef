"""Ranks other than the leader: step when told, report back, and answer health checks so that
their pods become Ready (requests go to the leader only)."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from typing import Any

import torch.distributed as dist

from fireflyer.workloads.serve.unit.rank import RankEngine

log = logging.getLogger(__name__)


def follow(rank: RankEngine, control_group: Any) -> None:
    """Run the leader's commands until it says stop; raises when the unit breaks (a rank or the
    leader gone), so that the process exits non-zero and its pod restarts."""
    while True:
        holder: list[Any] = [None]
        dist.broadcast_object_list(holder, src=0, group=control_group)
        command = holder[0]
        if command.stop:
            log.info("rank %d: the leader stopped the unit", rank.rank)
            return
        rank.apply(command)
        events, preempted = rank.step(command)
        report = rank.report(events, preempted)
        dist.gather_object(report, None, dst=0, group=control_group)


class HealthServer:
    """GET /health → 200 while this rank follows its leader; anything else → 404 naming rank 0."""

    def __init__(self, host: str, port: int, rank: int) -> None:
        self.alive = True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: dict[str, Any]
                if self.path.split("?")[0] == "/health":
                    status = 200 if server.alive else 503
                    body = {"status": "ok" if server.alive else "stopped", "rank": rank}
                else:
                    status = 404
                    body = {
                        "error": {
                            "message": f"this is rank {rank} of a unit; requests go to the unit's rank 0",
                            "type": "not_found",
                        }
                    }
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.alive = False
        self._httpd.shutdown()
        self._httpd.server_close()


__all__ = ["HealthServer", "follow"]
