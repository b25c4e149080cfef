"""3FS service configuration (launcher, app and main TOMLs) rendered from a ThreeFSCluster spec.

Only keys that 3FS's own templates define are written (a unit test checks every key path against
them); everything else keeps 3FS's built-in default. Addresses of mgmtd are IPv4 literals because
3FS does not resolve host names in `mgmtd_server_addresses`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from fireflyer.api.threefs import ThreeFSClusterSpec

CONFIG_DIR = "/etc/3fs"
FDB_CLUSTER_FILE = "/etc/foundationdb/fdb.cluster"
TOKEN_FILE = "/etc/3fs/token/token"

# (RDMA/serde port, TCP core port). Storage moves off mgmtd's defaults so both can share a host
# network namespace.
PORTS: dict[str, tuple[int, ...]] = {
    "mgmtd": (8000, 9000),
    "meta": (8001, 9001),
    "storage": (8002, 9002),
    "monitor": (10000,),
}
MGMTD_NODE_ID_BASE = 1
META_NODE_ID_BASE = 100
STORAGE_NODE_ID_BASE = 10001

SERVICE_FILES: dict[str, tuple[str, ...]] = {
    "mgmtd": ("mgmtd_main_launcher.toml", "mgmtd_main.toml"),
    "meta": ("meta_main_launcher.toml", "meta_main.toml"),
    "storage": ("storage_main_launcher.toml", "storage_main.toml"),
    "fuse": ("hf3fs_fuse_main_launcher.toml", "hf3fs_fuse_main.toml"),
    "monitor": ("monitor_collector_main.toml",),
    "admin": ("admin_cli.toml",),
}
APP_FILE = {"mgmtd": "mgmtd_main_app.toml", "meta": "meta_main_app.toml", "storage": "storage_main_app.toml"}


class ConfigError(ValueError):
    """Inputs that cannot produce a valid 3FS configuration."""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool | int | float | str) or value is None:
        return json.dumps("" if value is None else value)
    if isinstance(value, Sequence):
        return "[ " + ", ".join(_toml_value(v) for v in value) + " ]" if value else "[]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("fireflyer.threefs", "templates"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
_environment.filters["toml"] = _toml_value


@dataclass(frozen=True)
class ClickHouse:
    host: str = ""
    port: str = ""
    db: str = "3fs"
    user: str = "default"
    passwd: str = ""


@dataclass(frozen=True)
class RenderInputs:
    """What the configuration depends on besides the spec: addresses known only at run time."""

    cluster_id: str
    mgmtd_ips: Sequence[str]
    monitor_address: str = ""  # ip:port of the monitor collector; empty when disabled
    clickhouse: ClickHouse = field(default_factory=ClickHouse)
    storage_node_ids: Mapping[int, int] = field(default_factory=dict)  # pod ordinal → 3FS node id


def mgmtd_addresses(ips: Sequence[str], transport: str) -> list[str]:
    scheme = "RDMA" if transport == "rdma" else "TCP"
    out = []
    for ip in ips:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(
                f"mgmtd address {ip!r} is not an IP address (3FS needs IPv4 literals)"
            ) from None
        if address.version != 4:
            raise ConfigError(f"mgmtd address {ip} is IPv6; 3FS needs IPv4 literals")
        out.append(f"{scheme}://{ip}:{PORTS['mgmtd'][0]}")
    return out


def target_paths(spec: ThreeFSClusterSpec) -> list[str]:
    return [
        spec.storage.disk_path_template.replace("{disk}", str(d)) for d in range(spec.storage.disks_per_node)
    ]


def default_storage_node_ids(spec: ThreeFSClusterSpec) -> dict[int, int]:
    return {ordinal: STORAGE_NODE_ID_BASE + ordinal for ordinal in range(spec.storage.nodes)}


def _context(spec: ThreeFSClusterSpec, inputs: RenderInputs) -> dict[str, Any]:
    return {
        "cluster_id": inputs.cluster_id,
        "ib_devices": list(spec.network.ib_devices),
        "network_type": "RDMA" if spec.network.transport == "rdma" else "TCP",
        "fdb_cluster_file": FDB_CLUSTER_FILE,
        "mgmtd_addresses": mgmtd_addresses(inputs.mgmtd_ips, spec.network.transport),
        "monitor_address": inputs.monitor_address,
        "clickhouse": inputs.clickhouse,
        "ports": PORTS,
        "target_paths": target_paths(spec),
        "mount_point": spec.clients.mount_point,
        "token_file": TOKEN_FILE,
    }


def render_service(spec: ThreeFSClusterSpec, inputs: RenderInputs, service: str) -> dict[str, str]:
    """File name → contents for one service; app TOMLs are keyed `app-<ordinal>.toml`."""
    if service not in SERVICE_FILES:
        raise ConfigError(f"unknown 3FS service {service!r}")
    if service in ("meta", "storage", "fuse") and not inputs.mgmtd_ips:
        raise ConfigError(f"{service} configuration needs the mgmtd addresses")
    context = _context(spec, inputs)
    files = {name: _environment.get_template(f"{name}.j2").render(context) for name in SERVICE_FILES[service]}
    for ordinal, node_id in sorted(_node_ids(spec, inputs, service).items()):
        files[f"app-{ordinal}.toml"] = _environment.get_template("app.toml.j2").render(node_id=node_id)
    return files


def _node_ids(spec: ThreeFSClusterSpec, inputs: RenderInputs, service: str) -> dict[int, int]:
    if service == "mgmtd":
        return {i: MGMTD_NODE_ID_BASE + i for i in range(spec.mgmtd.replicas)}
    if service == "meta":
        return {i: META_NODE_ID_BASE + i for i in range(spec.meta.replicas)}
    if service == "storage":
        return dict(inputs.storage_node_ids) or default_storage_node_ids(spec)
    return {}


def key_paths(table: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of a parsed TOML's keys; arrays of tables appear as `name[]`, elements merged.

    The form of the key index that the rendered files are checked against
    (hack/threefs/template_keys.py writes it from 3FS's templates)."""
    out: set[str] = set()
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out |= key_paths(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for element in value:
                out |= key_paths(element, f"{path}[]")
        else:
            out.add(path)
    return out


def render_all(spec: ThreeFSClusterSpec, inputs: RenderInputs) -> dict[str, dict[str, str]]:
    return {service: render_service(spec, inputs, service) for service in SERVICE_FILES}
