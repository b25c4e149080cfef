"""The part of a kubelet's HTTPS API that `kubectl logs` reaches through the API server:
GET /containerLogs/{namespace}/{pod}/{container}[?follow=true&tailLines=N&previous=true]."""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

log = logging.getLogger(__name__)

FindLog = Callable[[str, str, str, bool], Path | None]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """The API server does not verify a kubelet's certificate unless told to; any will do."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not cert.exists():
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "3650",
                "-subj",
                "/CN=fireflyer-local-kubelet",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
    return cert, key


def _tail(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:]) if lines > 0 else b""


class LogsServer:
    def __init__(self, find: FindLog, port: int, tls_dir: Path) -> None:
        self.find = find
        self.tls_dir = tls_dir
        self.requested_port = port
        self.server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        find = self.find

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                log.debug(format, *args)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/{namespace}/{pod}/{container} is served")
                    return
                query = parse_qs(url.query)
                previous = query.get("previous", ["false"])[0] == "true"
                path = find(parts[1], parts[2], parts[3], previous)
                if path is None or not path.exists():
                    self.send_error(404, f"no log for {parts[2]}/{parts[3]} on this node")
                    return
                tail = int(query["tailLines"][0]) if "tailLines" in query else None
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                self.wfile.write(_tail(data, tail))
                if query.get("follow", ["false"])[0] != "true":
                    return
                offset = len(data)
                try:
                    while True:  # until the client goes away
                        time.sleep(0.5)
                        with path.open("rb") as handle:
                            handle.seek(offset)
                            chunk = handle.read()
                        if chunk:
                            offset += len(chunk)
                            self.wfile.write(chunk)
                            self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, OSError):
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", self.requested_port), Handler)
        self.server.daemon_threads = True
        cert, key = _self_signed(self.tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, name="kubelet-logs", daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
