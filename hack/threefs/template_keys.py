#!/usr/bin/env python3
"""Write the key paths (names and nesting only) of 3FS's configuration templates.

Usage: python hack/threefs/template_keys.py DIR > tests/unit/golden/threefs_template_keys.json
DIR holds 3FS's own `configs/*.toml`. The output lets a unit test check that every key fireflyer
renders exists at the same path in 3FS, without keeping 3FS's templates in this repository.
Arrays of tables appear as `name[]`, their elements merged.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any


# The files fireflyer renders (fireflyer.threefs.config); the client agent is not deployed.
RENDERED = {
    *(f"{service}_main{suffix}" for service in ("mgmtd", "meta", "storage") for suffix in ("", "_launcher", "_app")),
    "hf3fs_fuse_main",
    "hf3fs_fuse_main_launcher",
    "monitor_collector_main",
    "admin_cli",
}


def paths(table: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out |= paths(value, path)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for element in value:
                out |= paths(element, f"{path}[]")
        else:
            out.add(path)
    return out


def main() -> int:
    directory = Path(sys.argv[1])
    index = {
        file.name: sorted(paths(tomllib.loads(file.read_text())))
        for file in sorted(directory.glob("*.toml"))
        if file.stem in RENDERED
    }
    json.dump(index, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
