"""`fireflyer prepare`: flags, the already-prepared check, and the report. The last line on
stdout and the pod's termination message are one JSON object: {"result": "prepared" |
"already-prepared" | "failed", ...}; the TrainingJob controller reads it for its DataPrepared
condition."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fireflyer.workloads.preflight.failure import write_termination_log
from fireflyer.workloads.prepare.manifest import (
    SUFFIXES,
    Options,
    already_prepared,
    clear_output,
    fingerprint,
    input_files,
    write_manifest,
)
from fireflyer.workloads.prepare.tokenizing import PrepareError, load_tokenizer

PREPARED = "prepared"
ALREADY_PREPARED = "already-prepared"
FAILED = "failed"
PROGRESS_EVERY_TOKENS = 1 << 26


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prepare",
        help="raw JSONL/Parquet text → deduplicated, tokenized training shards (smallpond)",
        description="Read every *.jsonl (a `text` field per line) and *.parquet (a `text` column)"
        " under --input, drop exact duplicates and documents outside the token bounds, tokenize"
        " with the model's tokenizer and write the shards `fireflyer train --data` reads. Exits"
        " at once when --out already holds this preparation.",
    )
    p.add_argument("--input", required=True, type=Path, help="directory of raw documents")
    p.add_argument("--tokenizer", required=True, type=Path, help="model directory with tokenizer.json")
    p.add_argument("--out", required=True, type=Path, help="where the shards and index.json go")
    p.add_argument("--min-tokens", type=int, default=1, help="drop documents with fewer tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="drop documents with more tokens")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True, help="drop repeated texts")
    p.add_argument("--shard-tokens", type=int, default=Options.shard_tokens, help="tokens per shard file")
    p.add_argument("--format", choices=tuple(SUFFIXES), default="auto", help="which input files to read")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="intermediate files (default: a hidden directory in --out)",
    )
    p.add_argument(
        "--termination-log",
        type=Path,
        default=Path("/dev/termination-log"),
        help="where the result is written when the file exists (the pod's terminationMessagePath)",
    )
    p.set_defaults(handler=run)


def _progress(line: str) -> None:
    print(f"prepare: {line}", file=sys.stderr, flush=True)


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    write_termination_log(line, args.termination_log)


def _options(args: argparse.Namespace) -> Options:
    if args.min_tokens < 0:
        raise PrepareError(f"--min-tokens must be ≥ 0, not {args.min_tokens}")
    if args.max_tokens is not None and args.max_tokens < max(args.min_tokens, 1):
        raise PrepareError(f"--max-tokens must be ≥ --min-tokens and ≥ 1, not {args.max_tokens}")
    if args.shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be ≥ 1, not {args.shard_tokens}")
    return Options(args.min_tokens, args.max_tokens, args.dedup, args.shard_tokens, args.format)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from fireflyer.workloads.prepare.pipeline import default_work_dir, run_plan
    from fireflyer.workloads.train.data import write_shards

    options = _options(args)
    root, out = args.input.resolve(), args.out.resolve()
    if not root.is_dir():
        raise PrepareError(f"{root}: not a directory (--input)")
    files = input_files(root, options.input_format)
    if not files:
        wanted = " or ".join(f"*{s}" for s in SUFFIXES[options.input_format])
        raise PrepareError(f"{root}: no {wanted} files")
    _, eos_id = load_tokenizer(args.tokenizer)
    expected = fingerprint(root, files, args.tokenizer, options)
    if already_prepared(out, expected):
        _progress(f"{out} is already prepared from these {len(files)} files; nothing to do")
        return {"result": ALREADY_PREPARED, "out": str(out)}
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    clear_output(out)
    work = args.work_dir or default_work_dir(out)
    try:
        counts, docs = run_plan(files, args.tokenizer, options, work, _progress)

        def counted() -> Any:
            next_report = PROGRESS_EVERY_TOKENS
            for tokens in docs:
                counts.tokens += len(tokens) + 1
                if counts.tokens >= next_report:
                    _progress(f"{counts.tokens} tokens written")
                    next_report += PROGRESS_EVERY_TOKENS
                yield tokens

        write_shards(counted(), out, shard_tokens=options.shard_tokens, eos_id=eos_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if counts.documents == 0:
        clear_output(out)
        raise PrepareError(f"{root}: no document is left after dedup and the length filter")
    summary = {**asdict(counts), "seconds": round(time.monotonic() - started, 3)}
    write_manifest(out, expected, summary)
    _progress(
        f"wrote {counts.documents} documents, {counts.tokens} tokens to {out}"
        f" ({counts.duplicates} duplicates, {counts.too_short} too short, {counts.too_long} too long dropped)"
    )
    return {"result": PREPARED, "out": str(out), **summary}


def run(args: argparse.Namespace) -> int:
    try:
        result = prepare(args)
    except PrepareError as error:
        _report(args, {"result": FAILED, "message": str(error)})
        raise
    _report(args, result)
    return 0
