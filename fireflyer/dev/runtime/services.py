"""Services for the local pods: name resolution (one hosts file per namespace, bind-mounted as
each pod's /etc/hosts and rewritten in place as pods come and go) and LoadBalancer Services (a
loopback address on this machine, proxied to a ready pod behind the Service)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fireflyer.dev.runtime import podspec

log = logging.getLogger(__name__)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


class NameFiles:
    """/etc/hosts and /etc/resolv.conf per namespace."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def hosts(self, namespace: str) -> Path:
        path = self.directory / f"hosts.{namespace}"
        if not path.exists():
            path.write_text(podspec.hosts_file(namespace, [], [], pod_ready))
        return path

    def resolv(self, namespace: str) -> Path:
        path = self.directory / f"resolv.{namespace}"
        if not path.exists():
            path.write_text(podspec.resolv_conf(namespace))
        return path

    def refresh(self, pods: Sequence[Mapping[str, Any]], services: Sequence[Mapping[str, Any]]) -> None:
        for path in self.directory.glob("hosts.*"):
            namespace = path.name.split(".", 1)[1]
            text = podspec.hosts_file(namespace, pods, services, pod_ready)
            if path.read_text() != text:
                # In place, not by rename: the file is bind-mounted into running pods.
                with path.open("r+") as handle:
                    handle.write(text)
                    handle.truncate()


def _target_port(service_port: Mapping[str, Any], pod: Mapping[str, Any]) -> int | None:
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod["spec"].get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class LoadBalancers:
    """One TCP proxy per (LoadBalancer Service, port), on a loopback address of its own."""

    def __init__(self, address_of: Callable[[int], str], publish: Callable[[str, str, str], None]) -> None:
        self.address_of = address_of
        self.publish = publish
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="load-balancers", daemon=True)
        self.thread.start()
        self.addresses: dict[str, str] = {}  # service uid → address
        self.servers: dict[tuple[str, int], asyncio.Server] = {}
        self.backends: dict[str, list[tuple[str, int, int]]] = {}  # uid → [(pod ip, port, svc port)]
        self._count = 0

    def refresh(self, pods: Sequence[Mapping[str, Any]], services: Sequence[Mapping[str, Any]]) -> None:
        alive = set()
        for service in services:
            spec, meta = service.get("spec", {}), service["metadata"]
            if spec.get("type") != "LoadBalancer":
                continue
            uid = meta["uid"]
            alive.add(uid)
            if uid not in self.addresses:
                self.addresses[uid] = self.address_of(self._count)
                self._count += 1
            address = self.addresses[uid]
            ready = [
                p
                for p in pods
                if p["metadata"]["namespace"] == meta["namespace"]
                and podspec.selects(spec.get("selector"), p["metadata"].get("labels"))
                and pod_ready(p)
                and (p.get("status") or {}).get("podIP")
            ]
            backends = []
            for port in spec.get("ports") or []:
                for pod in ready:
                    target = _target_port(port, pod)
                    if target is not None:
                        backends.append((pod["status"]["podIP"], target, int(port["port"])))
                if (uid, int(port["port"])) not in self.servers:
                    self._listen(uid, address, int(port["port"]))
            self.backends[uid] = backends
            ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if [i.get("ip") for i in ingress] != [address]:
                self.publish(meta["namespace"], meta["name"], address)
        for key in [k for k in self.servers if k[0] not in alive]:
            server = self.servers.pop(key)
            self.loop.call_soon_threadsafe(server.close)
            self.addresses.pop(key[0], None)

    def _listen(self, uid: str, address: str, port: int) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            choices = [b for b in self.backends.get(uid, []) if b[2] == port]
            for _ in range(50):  # a pod that just turned Ready reaches this list within a refresh
                if choices:
                    break
                await asyncio.sleep(0.1)
                choices = [b for b in self.backends.get(uid, []) if b[2] == port]
            if not choices:
                writer.close()
                return
            ip, target, _ = choices[hash(writer.get_extra_info("peername")) % len(choices)]
            try:
                up_reader, up_writer = await asyncio.open_connection(ip, target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        async def start() -> None:
            self.servers[(uid, port)] = await asyncio.start_server(handle, address, port, reuse_address=True)

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
        log.info("load balancer %s:%d", address, port)

    def close(self) -> None:
        for server in self.servers.values():
            self.loop.call_soon_threadsafe(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
