"""`fireflyer threefs render|chain-table`: a ThreeFSCluster's 3FS files, offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fireflyer.api.threefs import ThreeFSCluster
from fireflyer.errors import FireflyerError
from fireflyer.threefs.chaintable import ChainTableError, plan_chain_table
from fireflyer.threefs.config import STORAGE_NODE_ID_BASE, ConfigError, RenderInputs, render_all


def _read_cluster(path: str) -> ThreeFSCluster:
    file = Path(path)
    if not file.is_file():
        raise FireflyerError(f"{path}: no such file")
    docs = [d for d in yaml.safe_load_all(file.read_text()) if d and d.get("kind") == "ThreeFSCluster"]
    if len(docs) != 1:
        raise FireflyerError(f"{path}: expected one ThreeFSCluster, found {len(docs)}")
    try:
        return ThreeFSCluster.model_validate(docs[0])
    except ValidationError as error:
        raise FireflyerError(f"{path}: {error}") from error


def cmd_render(args: argparse.Namespace) -> int:
    cluster = _read_cluster(args.file)
    ips = [ip.strip() for ip in args.mgmtd_addresses.split(",") if ip.strip()]
    inputs = RenderInputs(cluster.metadata.name or "threefs", ips, args.monitor_address)
    try:
        files = render_all(cluster.spec, inputs)
    except ConfigError as error:
        raise FireflyerError(str(error)) from error
    out = Path(args.out)
    for service, contents in files.items():
        (out / service).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (out / service / name).write_text(text)
    count = sum(len(c) for c in files.values())
    print(f"wrote {count} files for {len(files)} services under {out}")
    return 0


def cmd_chain_table(args: argparse.Namespace) -> int:
    nodes = [STORAGE_NODE_ID_BASE + i for i in range(args.nodes)]
    try:
        table = plan_chain_table(nodes, args.disks, args.targets_per_disk, args.replication, args.type)
    except ChainTableError as error:
        raise FireflyerError(str(error)) from error
    print("# create_target_cmd.txt")
    print("\n".join(table.create_target_commands()))
    print("# generated_chains.csv")
    print(table.chains_csv(), end="")
    print("# generated_chain_table.csv")
    print(table.chain_table_csv(), end="")
    counts = table.pair_counts().values()
    if counts:
        print(f"# {len(table.chains)} chains; chains shared per node pair: {min(counts)}–{max(counts)}")
    return 0


def add_parser(sub: Any) -> None:
    threefs = sub.add_parser("threefs", help="3FS configuration and chain tables offline")
    threefs_sub = threefs.add_subparsers(dest="threefs_command", required=True)
    render = threefs_sub.add_parser("render", help="render every service's TOML files for a ThreeFSCluster")
    render.add_argument("-f", "--file", required=True, help="YAML with one ThreeFSCluster")
    render.add_argument(
        "--mgmtd-addresses", required=True, help="IPv4 addresses of the mgmtd pods, comma-separated"
    )
    render.add_argument("--monitor-address", default="", help="ip:port of the monitor collector")
    render.add_argument("--out", required=True, help="output directory (one folder per service)")
    render.set_defaults(handler=cmd_render)
    table = threefs_sub.add_parser("chain-table", help="target placement, chains and the admin commands")
    table.add_argument("--nodes", type=int, required=True, help="storage nodes (node ids from 10001)")
    table.add_argument("--disks", type=int, required=True, help="disks per node")
    table.add_argument("--targets-per-disk", type=int, required=True)
    table.add_argument(
        "--replication", type=int, required=True, help="targets per chain (CR replicas or EC k+m)"
    )
    table.add_argument("--type", choices=["CR", "EC"], default="CR")
    table.set_defaults(handler=cmd_chain_table)
