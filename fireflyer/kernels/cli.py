"""`fireflyer kernels autotune`: measure (or show) the table `backend="auto"` chooses from."""

from __future__ import annotations

import argparse
import json
from typing import Any


def render_table(table: dict[str, Any]) -> str:
    """One line per op and shape class: the choice, then every candidate's time or why it is out."""
    lines = [f"device: {table.get('device', '?')}", f"{'op':<6} {'class':<9} {'choice':<9} candidates"]
    for op, classes in sorted(table.get("ops", {}).items()):
        for klass, entry in classes.items():
            times = entry.get("microseconds", {})
            excluded = entry.get("excluded", {})
            parts = [f"{name} {us:.1f} µs" for name, us in sorted(times.items(), key=lambda kv: kv[1])]
            parts += [f"{name}: {why}" for name, why in sorted(excluded.items())]
            lines.append(f"{op:<6} {klass:<9} {entry.get('choice') or '-':<9} " + "; ".join(parts))
    return "\n".join(lines)


def _autotune(args: argparse.Namespace) -> int:
    import torch

    from fireflyer.kernels import autotune

    if not torch.cuda.is_available():
        print("no CUDA device: `auto` runs the torch reference on the CPU; nothing to measure")
        return 1
    device = torch.device("cuda", args.device)
    table = autotune.table_for(device, force=args.force)
    print(json.dumps(table, indent=1, sort_keys=True) if args.json else render_table(table))
    print(f"table: {autotune.table_path(device)}")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kernels = sub.add_parser("kernels", help="the GPU kernels' backends")
    kernels_sub = kernels.add_subparsers(dest="kernels_command", required=True)
    tune = kernels_sub.add_parser(
        "autotune",
        help="print the measured table `auto` picks backends from (measured now when missing)",
    )
    tune.add_argument("--force", action="store_true", help="measure again even when a table is cached")
    tune.add_argument("--device", type=int, default=0, help="CUDA device index")
    tune.add_argument("--json", action="store_true", help="print the table as JSON")
    tune.set_defaults(handler=_autotune)
