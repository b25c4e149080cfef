#!/usr/bin/env python3
"""Write the key paths (names and nesting only) of 3FS's configuration templates.

Usage: .venv/bin/python hack/threefs/template_keys.py DIR > tests/unit/golden/threefs_template_keys.json
DIR holds 3FS's own `configs/*.toml`. The output lets a unit test check that every key fireflyer
renders exists at the same path in 3FS, without keeping 3FS's templates in this repository.
Arrays of tables appear as `name[]`, their elements merged.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from fireflyer.threefs.config import key_paths

# The files fireflyer renders (fireflyer.threefs.config); the client agent is not deployed.
RENDERED = {
    *(
        f"{service}_main{suffix}"
        for service in ("mgmtd", "meta", "storage")
        for suffix in ("", "_launcher", "_app")
    ),
    "hf3fs_fuse_main",
    "hf3fs_fuse_main_launcher",
    "monitor_collector_main",
    "admin_cli",
}


def main() -> int:
    directory = Path(sys.argv[1])
    index = {
        file.name: sorted(key_paths(tomllib.loads(file.read_text())))
        for file in sorted(directory.glob("*.toml"))
        if file.stem in RENDERED
    }
    json.dump(index, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
