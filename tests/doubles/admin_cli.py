#!/usr/bin/env python3
"""Contract double of 3FS's `admin_cli`, for tests where 3FS cannot run.

Invoked like the real tool — `admin_cli -cfg admin_cli.toml [--config.KEY VALUE …] "command"`, or
with commands on stdin — it implements the commands the operator issues, validates their
arguments the way admin_cli does, keeps cluster state in a JSON file (`--state`, or the
FIREFLYER_ADMIN_CLI_STATE environment variable) and prints the same tables. Storage nodes come
and go through `set_storage_nodes` (the test's stand-in for heartbeats); target public states
move as in 3FS: a new chain's targets serve at once, a target added to a chain waits, then syncs,
then serves (one step per list-* call); a dead node's targets go offline, and the last serving
target of a chain becomes LASTSRV. `--root` prefixes paths the commands read (configs, CSVs).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

NODE_TYPES = {"MGMTD", "META", "STORAGE", "CLIENT", "FUSE"}
CONFIG_TYPES = {"MGMTD", "META", "STORAGE", "FUSE", "CLIENT"}


class CliError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: {message}")


def _empty() -> dict[str, Any]:
    return {
        "cluster": None,
        "configs": {},
        "users": {},
        "nodes": {},
        "targets": {},
        "chains": {},
        "chainTable": None,
        "log": [],
    }


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else _empty()


def save(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(temporary, path)


def set_storage_nodes(path: Path, alive: dict[int, bool]) -> None:
    """Register storage nodes and mark them alive or dead (heartbeats, in the real system). As
    3FS's state-transition table has it: a dead service's targets go offline; when it is back, its
    offline targets wait to be synced again (waiting → syncing → serving on later ticks) and a
    last-serving one serves at once."""
    state = load(path)
    for node_id, up in alive.items():
        state["nodes"][str(node_id)] = {"type": "STORAGE", "alive": up}
        for target in state["targets"].values():
            if target["node"] != node_id:
                continue
            if not up:
                target["state"] = "OFFLINE"
            elif target["state"] == "OFFLINE":
                target["state"] = "WAITING"
            elif target["state"] == "LASTSRV":
                target["state"] = "SERVING"
    _settle_lastsrv(state)
    save(path, state)


def _settle_lastsrv(state: dict[str, Any]) -> None:
    for chain in state["chains"].values():
        states = [state["targets"][str(t)]["state"] for t in chain["targets"]]
        if "SERVING" in states or "SYNCING" in states:
            continue
        for t in chain["targets"]:
            target = state["targets"][str(t)]
            if target["state"] == "OFFLINE" and target.get("servedLast"):
                target["state"] = "LASTSRV"


def _tick(state: dict[str, Any]) -> None:
    for chain in state["chains"].values():
        serving = [t for t in chain["targets"] if state["targets"][str(t)]["state"] == "SERVING"]
        for t in chain["targets"]:
            target = state["targets"][str(t)]
            if target["state"] == "SYNCING":
                target["state"] = "SERVING"
            elif target["state"] == "WAITING" and serving and _alive(state, target["node"]):
                target["state"] = "SYNCING"
        serving = [t for t in chain["targets"] if state["targets"][str(t)]["state"] == "SERVING"]
        for t in chain["targets"]:
            state["targets"][str(t)]["servedLast"] = len(serving) == 1 and t in serving


def _alive(state: dict[str, Any], node_id: int) -> bool:
    node = state["nodes"].get(str(node_id))
    return bool(node and node["alive"])


def _read(root: Path, path: str) -> Path:
    resolved = root / path.lstrip("/") if str(root) != "/" else Path(path)
    if not resolved.is_file():
        raise CliError(f"{path}: no such file")
    return resolved


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _need_cluster(state: dict[str, Any]) -> None:
    if state["cluster"] is None:
        raise CliError("cluster is not initialized (run init-cluster first)")


def cmd_init_cluster(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("init-cluster")
    p.add_argument("chaintableid", type=int)
    p.add_argument("chunksize", type=int)
    p.add_argument("stripesize", type=int)
    p.add_argument("--mgmtd", "--mgmtd-config-path")
    p.add_argument("--allow-config-existed", action="store_true")
    a = p.parse_args(args)
    if state["cluster"] is not None:
        raise CliError("cluster already initialized")
    if a.chunksize <= 0 or a.chunksize & (a.chunksize - 1):
        raise CliError(f"chunksize {a.chunksize} is not a power of two")
    if a.mgmtd:
        tomllib.loads(_read(root, a.mgmtd).read_text())
        state["configs"]["MGMTD"] = 1
    state["cluster"] = {"chainTableId": a.chaintableid, "chunkSize": a.chunksize, "stripeSize": a.stripesize}
    return (
        f"Init filesystem, root directory layout: chain table ChainTableId({a.chaintableid}),"
        f" chunksize {a.chunksize}, stripesize {a.stripesize}"
    )


def cmd_set_config(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("set-config")
    p.add_argument("--type", required=True)
    p.add_argument("--file", required=True)
    a = p.parse_args(args)
    _need_cluster(state)
    if a.type not in CONFIG_TYPES:
        raise CliError(f"unknown node type {a.type}")
    tomllib.loads(_read(root, a.file).read_text())
    version = state["configs"].get(a.type, 0) + 1
    state["configs"][a.type] = version
    return f"Succeed\nConfigVersion  {version}"


def cmd_user_add(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("user-add")
    p.add_argument("uid", type=int)
    p.add_argument("name")
    p.add_argument("--root", action="store_true")
    p.add_argument("--admin", action="store_true")
    a = p.parse_args(args)
    _need_cluster(state)
    if a.name in state["users"]:
        raise CliError(f"user {a.name} already exists")
    token = "AAA" + hashlib.sha256(f"{a.name}/{a.uid}/{len(state['log'])}".encode()).hexdigest()[:21]
    state["users"][a.name] = {"uid": a.uid, "token": token, "root": a.root}
    return _table(
        [
            ["Uid", str(a.uid)],
            ["Name", a.name],
            ["Token", f"{token}(Expired at N/A)"],
            ["IsRootUser", str(a.root).lower()],
            ["IsAdmin", str(a.admin).lower()],
            ["Gid", str(a.uid)],
        ]
    )


def cmd_create_target(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("create-target")
    p.add_argument("--node-id", type=int, required=True)
    p.add_argument("--disk-index", type=int, required=True)
    p.add_argument("--target-id", type=int, required=True)
    p.add_argument("--chain-id", type=int, required=True)
    p.add_argument("--use-new-chunk-engine", action="store_true")
    a = p.parse_args(args)
    _need_cluster(state)
    node = state["nodes"].get(str(a.node_id))
    if not node or node["type"] != "STORAGE" or not node["alive"]:
        raise CliError(f"storage node {a.node_id} is not registered or not alive")
    if str(a.target_id) in state["targets"]:
        raise CliError(f"target {a.target_id} already exists")
    state["targets"][str(a.target_id)] = {
        "node": a.node_id,
        "disk": a.disk_index,
        "chain": a.chain_id,
        "state": "WAITING",
        "used": 0,
    }
    return f"Create target {a.target_id} on {a.node_id}:{a.disk_index} succeeded"


def cmd_upload_chains(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("upload-chains")
    p.add_argument("file")
    a = p.parse_args(args)
    _need_cluster(state)
    with open(_read(root, a.file)) as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][0] != "ChainId" or any(c != "TargetId" for c in rows[0][1:]):
        raise CliError("chains csv must start with ChainId,TargetId,…")
    for row in rows[1:]:
        chain_id, targets = int(row[0]), [int(t) for t in row[1:] if t]
        nodes = []
        for t in targets:
            if str(t) not in state["targets"]:
                raise CliError(f"target {t} of chain {chain_id} does not exist")
            nodes.append(state["targets"][str(t)]["node"])
        if len(set(nodes)) != len(nodes):
            raise CliError(f"chain {chain_id} has two targets on one node")
        if str(chain_id) in state["chains"]:
            raise CliError(f"chain {chain_id} already exists")
        state["chains"][str(chain_id)] = {"version": 1, "targets": targets}
        for t in targets:
            state["targets"][str(t)]["state"] = "SERVING"
    return f"Upload {len(rows) - 1} chains succeeded"


def cmd_upload_chain_table(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("upload-chain-table")
    p.add_argument("tableid", type=int)
    p.add_argument("file")
    p.add_argument("--desc", default="")
    a = p.parse_args(args)
    _need_cluster(state)
    if a.tableid != state["cluster"]["chainTableId"]:
        raise CliError(
            f"chain table {a.tableid} is not the cluster's chain table {state['cluster']['chainTableId']}"
        )
    with open(_read(root, a.file)) as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] != ["ChainId"]:
        raise CliError("chain table csv must start with ChainId")
    chains = [int(r[0]) for r in rows[1:]]
    missing = [c for c in chains if str(c) not in state["chains"]]
    if missing:
        raise CliError(f"chains {missing[:5]} do not exist")
    state["chainTable"] = {
        "id": a.tableid,
        "version": (state["chainTable"] or {}).get("version", 0) + 1,
        "chains": chains,
    }
    return f"Upload chain table ChainTableId({a.tableid}) succeeded"


def cmd_list_chains(state: dict[str, Any], args: list[str], root: Path) -> str:
    Parser("list-chains").parse_args(args)
    _tick(state)
    width = max((len(c["targets"]) for c in state["chains"].values()), default=0)
    rows = [["ChainId", "ReferencedBy", "ChainVersion", "Status", "PreferredOrder", *["Target"] * width]]
    table_chains = set((state["chainTable"] or {}).get("chains", []))
    for cid in sorted(state["chains"], key=int):
        chain = state["chains"][cid]
        states = [state["targets"][str(t)]["state"] for t in chain["targets"]]
        serving = states.count("SERVING")
        if "SYNCING" in states:
            status = "SYNCING"
        elif serving == len(states):
            status = "SERVING"
        elif serving == 0:
            status = "UNAVAILABLE"
        else:
            status = f"SERVING({serving}/{len(states)})"
        cells = [
            f"{t}({s}-{'UPTODATE' if s == 'SERVING' else 'OFFLINE' if s == 'OFFLINE' else 'ONLINE'})"
            for t, s in zip(chain["targets"], states, strict=True)
        ]
        rows.append(
            [cid, "1" if int(cid) in table_chains else "N/A", str(chain["version"]), status, "[]", *cells]
        )
    return _table(rows)


def cmd_list_targets(state: dict[str, Any], args: list[str], root: Path) -> str:
    Parser("list-targets").parse_args(args)
    _tick(state)
    rows = [["TargetId", "ChainId", "Role", "PublicState", "LocalState", "NodeId", "DiskIndex", "UsedSize"]]
    for cid in sorted(state["chains"], key=int):
        targets = state["chains"][cid]["targets"]
        for i, t in enumerate(targets):
            target = state["targets"][str(t)]
            role = "HEAD" if i == 0 else "TAIL" if i == len(targets) - 1 else "MIDDLE"
            local = (
                "UPTODATE"
                if target["state"] == "SERVING"
                else "OFFLINE"
                if target["state"] == "OFFLINE"
                else "ONLINE"
            )
            rows.append(
                [
                    str(t),
                    cid,
                    role,
                    target["state"],
                    local,
                    str(target["node"]),
                    str(target["disk"]),
                    str(target["used"]),
                ]
            )
    return _table(rows)


def cmd_list_nodes(state: dict[str, Any], args: list[str], root: Path) -> str:
    Parser("list-nodes").parse_args(args)
    rows = [["Id", "Type", "Status"]]
    for nid in sorted(state["nodes"], key=int):
        node = state["nodes"][nid]
        rows.append([nid, node["type"], "HEARTBEAT_CONNECTED" if node["alive"] else "HEARTBEAT_FAILED"])
    return _table(rows)


def cmd_offline_target(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("offline-target")
    p.add_argument("--node-id", type=int)
    p.add_argument("--target-id", type=int, required=True)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(args)
    target = state["targets"].get(str(a.target_id))
    if target is None:
        raise CliError(f"target {a.target_id} not found")
    if a.node_id is not None and target["node"] != a.node_id:
        raise CliError(f"target {a.target_id} is not on node {a.node_id}")
    target["state"] = "OFFLINE"
    _settle_lastsrv(state)
    return f"Offline target {a.target_id} succeeded"


def cmd_update_chain(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("update-chain")
    p.add_argument("chainId", type=int)
    p.add_argument("targetId", type=int)
    p.add_argument("-m", "--mode", required=True)
    a = p.parse_args(args)
    chain = state["chains"].get(str(a.chainId))
    if chain is None:
        raise CliError(f"chain {a.chainId} not found")
    mode = a.mode.lower()
    if mode == "remove":
        if a.targetId not in chain["targets"]:
            raise CliError(f"target {a.targetId} is not in chain {a.chainId}")
        others = [t for t in chain["targets"] if t != a.targetId]
        if not any(state["targets"][str(t)]["state"] == "SERVING" for t in others):
            raise CliError(f"removing {a.targetId} would leave chain {a.chainId} without a serving target")
        chain["targets"] = others
    elif mode == "add":
        target = state["targets"].get(str(a.targetId))
        if target is None:
            raise CliError(f"target {a.targetId} not found")
        if a.targetId in chain["targets"]:
            raise CliError(f"target {a.targetId} already in chain {a.chainId}")
        if any(state["targets"][str(t)]["node"] == target["node"] for t in chain["targets"]):
            raise CliError(f"chain {a.chainId} already has a target on node {target['node']}")
        chain["targets"].append(a.targetId)
        target["state"] = "WAITING"
        target["chain"] = a.chainId
    else:
        raise CliError(f"update-chain: mode must be add or remove, not {a.mode}")
    chain["version"] += 1
    return f"Update chain {a.chainId} succeeded, version {chain['version']}"


def cmd_unregister_node(state: dict[str, Any], args: list[str], root: Path) -> str:
    p = Parser("unregister-node")
    p.add_argument("nodeId", type=int)
    p.add_argument("type")
    a = p.parse_args(args)
    if a.type not in NODE_TYPES:
        raise CliError(f"type must be one of {sorted(NODE_TYPES)}")
    node = state["nodes"].get(str(a.nodeId))
    if node is None or node["type"] != a.type:
        raise CliError(f"{a.type} node {a.nodeId} not found")
    if node["alive"]:
        raise CliError(f"node {a.nodeId} is still alive")
    in_chains = [
        t
        for c in state["chains"].values()
        for t in c["targets"]
        if state["targets"][str(t)]["node"] == a.nodeId
    ]
    if in_chains:
        raise CliError(f"node {a.nodeId} still has targets in chains: {in_chains[:5]}")
    del state["nodes"][str(a.nodeId)]
    return f"Unregister node {a.nodeId} succeeded"


COMMANDS: dict[str, Callable[[dict[str, Any], list[str], Path], str]] = {
    "init-cluster": cmd_init_cluster,
    "set-config": cmd_set_config,
    "user-add": cmd_user_add,
    "create-target": cmd_create_target,
    "upload-chains": cmd_upload_chains,
    "upload-chain-table": cmd_upload_chain_table,
    "list-chains": cmd_list_chains,
    "list-targets": cmd_list_targets,
    "list-nodes": cmd_list_nodes,
    "offline-target": cmd_offline_target,
    "update-chain": cmd_update_chain,
    "unregister-node": cmd_unregister_node,
}
NEEDS_TOKEN = {
    "set-config",
    "create-target",
    "upload-chains",
    "upload-chain-table",
    "offline-target",
    "update-chain",
    "unregister-node",
}


def run_command(state: dict[str, Any], line: str, root: Path, token: str) -> str:
    words = shlex.split(line)
    if not words:
        return ""
    name, args = words[0], words[1:]
    if name not in COMMANDS:
        raise CliError(f"unknown command {name}")
    if name in NEEDS_TOKEN and state["users"] and token not in {u["token"] for u in state["users"].values()}:
        raise CliError(f"{name}: authentication failed (token required)")
    state["log"].append(line)
    return COMMANDS[name](state, args, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admin_cli")
    parser.add_argument("-cfg", "--cfg", required=True)
    parser.add_argument("--state", default=os.environ.get("FIREFLYER_ADMIN_CLI_STATE", ""))
    parser.add_argument("--root", default="/")
    parser.add_argument("command", nargs="?")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--config.KEY VALUE` overrides take a value that may be empty, like admin_cli's.
    overrides: dict[str, str] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index].startswith("--config."):
            if index + 1 >= len(argv):
                print(f"{argv[index]} needs a value", file=sys.stderr)
                return 2
            overrides[argv[index]] = argv[index + 1]
            index += 2
        else:
            rest.append(argv[index])
            index += 1
    known = parser.parse_args(rest)
    if not known.state:
        print("admin_cli double: --state or FIREFLYER_ADMIN_CLI_STATE is required", file=sys.stderr)
        return 2
    root = Path(known.root)
    config = tomllib.loads(_read(root, known.cfg).read_text())
    # Like admin_cli: user_info.token from the config file, a --config.user_info.token override first.
    token = overrides.get("--config.user_info.token", (config.get("user_info") or {}).get("token", ""))
    lines = (
        [known.command] if known.command else [line for line in sys.stdin.read().splitlines() if line.strip()]
    )
    state_path = Path(known.state)
    state = load(state_path)
    try:
        for line in lines:
            print(run_command(state, line, root, token))
    except CliError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    finally:
        save(state_path, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
