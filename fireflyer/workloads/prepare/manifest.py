"""What makes a prepared directory current: the input files, the tokenizer and the options,
recorded in `prepare.json` beside the shards. Pure apart from reading file metadata."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fireflyer.workloads.train.data import INDEX, DataError, TokenShards

MANIFEST = "prepare.json"
MANIFEST_FORMAT = "fireflyer.prepare/v1"
# The tokenizer files whose content decides the token ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
InputFormat = Literal["auto", "jsonl", "parquet"]
SUFFIXES: dict[str, tuple[str, ...]] = {
    "auto": (".jsonl", ".parquet"),
    "jsonl": (".jsonl",),
    "parquet": (".parquet",),
}


@dataclass(frozen=True)
class Options:
    min_tokens: int = 1
    max_tokens: int | None = None
    dedup: bool = True
    shard_tokens: int = 1 << 28
    input_format: InputFormat = "auto"


def input_files(root: Path, input_format: InputFormat = "auto") -> list[Path]:
    """The input files under root, in the order their documents are written: by path relative to
    root (sorted), hidden files and directories left out."""
    suffixes = SUFFIXES[input_format]
    found = [
        p
        for p in root.rglob("*")
        if p.suffix in suffixes
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def tokenizer_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = tokenizer_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def fingerprint(root: Path, files: list[Path], tokenizer_dir: Path, options: Options) -> dict[str, Any]:
    """Everything the output depends on. Inputs by name, size and modification time: hashing
    terabytes of text to decide that nothing changed would cost as much as preparing them."""
    inputs = []
    for path in files:
        stat = path.stat()
        inputs.append(
            {"file": path.relative_to(root).as_posix(), "size": stat.st_size, "mtimeNs": stat.st_mtime_ns}
        )
    return {
        "format": MANIFEST_FORMAT,
        "inputs": inputs,
        "tokenizer": tokenizer_digest(tokenizer_dir),
        "options": asdict(options),
    }


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def already_prepared(out: Path, expected: dict[str, Any]) -> bool:
    """The output matches these inputs, tokenizer and options, and its index names shards that
    are all there (an interrupted run never leaves a matching manifest: it is written last)."""
    recorded = read_manifest(out)
    if recorded is None or recorded.get("fingerprint") != expected:
        return False
    try:
        TokenShards(out)
    except (DataError, OSError, ValueError):
        return False
    return True


def write_manifest(out: Path, expected: dict[str, Any], summary: dict[str, Any]) -> None:
    temporary = out / f".{MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps({"fingerprint": expected, "summary": summary}, indent=1) + "\n")
    os.replace(temporary, out / MANIFEST)


def clear_output(out: Path) -> None:
    """Remove what an earlier preparation left (manifest first, so no partial output ever looks
    current); other files in the directory are not ours and stay."""
    for name in (MANIFEST, INDEX):
        (out / name).unlink(missing_ok=True)
    for shard in out.glob("shard-*.bin"):
        shard.unlink()
