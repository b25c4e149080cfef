"""`fireflyer prepare` end to end: raw JSONL/Parquet → dedup → length filter → tokens the trainer
reads, idempotent through its manifest."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from fireflyer.cli import main
from fireflyer.workloads.train.data import Loader, TokenShards
from tests.workloads.train_support import tiny_model

EOS = 1  # the tiny checkpoint's eos id


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("prepare-model"))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _argv(args: tuple[str | Path | int, ...], termination: Path | None) -> list[str]:
    argv = ["prepare", *map(str, args)]
    return argv + (["--termination-log", str(termination)] if termination is not None else [])


def prepare(*args: str | Path | int, termination: Path | None = None) -> Run:
    """`fireflyer prepare` in this process (the imports are paid once per test session)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(_argv(args, termination))
    return Run(code, out.getvalue(), err.getvalue())


def prepare_process(*args: str | Path | int, termination: Path | None = None) -> Run:
    """The installed command as a process of its own."""
    argv = [sys.executable, "-m", "fireflyer.cli", *_argv(args, termination)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return Run(done.returncode, done.stdout, done.stderr)


def result(run: Run) -> dict[str, Any]:
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


LONG = " ".join(f"word{i}" for i in range(200))


def corpus(root: Path) -> list[str]:
    """Two files with a duplicate across them, one inside a file, an empty document and one
    far longer than the bound; returns the texts that must survive, in order."""
    write_jsonl(
        root / "a.jsonl",
        [
            {"text": "the quick brown fox", "id": 1},
            {"text": "jumps over the lazy dog"},
            {"text": "the quick brown fox"},  # duplicate inside the file
            {"text": ""},  # too short (0 tokens)
        ],
    )
    write_jsonl(
        root / "b.jsonl",
        [
            {"text": LONG},  # too long
            {"text": "jumps over the lazy dog"},  # duplicate of a.jsonl's second line
            {"text": "pack my box with five dozen liquor jugs"},
        ],
    )
    return ["the quick brown fox", "jumps over the lazy dog", "pack my box with five dozen liquor jugs"]


def test_prepare_dedups_filters_tokenizes_and_is_idempotent(tmp_path: Path, model: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    kept = corpus(raw)
    termination = tmp_path / "termination-log"
    termination.write_text("")

    first = prepare(
        "--input", raw, "--tokenizer", model, "--out", out, "--max-tokens", 100, termination=termination
    )
    assert first.returncode == 0, first.stderr
    report = result(first)
    assert report["result"] == "prepared"
    assert (report["read"], report["duplicates"], report["too_short"], report["too_long"]) == (7, 2, 1, 1)
    assert report["documents"] == 3
    assert json.loads(termination.read_text())["result"] == "prepared"

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    expected: list[int] = []
    for text in kept:
        expected += [*tokenizer.encode(text, add_special_tokens=False).ids, EOS]
    shards = TokenShards(out)
    assert shards.documents == 3
    assert shards.read(0, shards.total).tolist() == expected
    assert report["tokens"] == len(expected)
    loader = Loader(shards, seq_len=4, micro_batch_size=1, micro_batches=2)
    assert loader.batch(0).shape == (2, 1, 5)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(
        "--input", raw, "--tokenizer", model, "--out", out, "--max-tokens", 100, termination=termination
    )
    assert again.returncode == 0, again.stderr
    assert result(again)["result"] == "already-prepared"
    assert "already prepared" in again.stderr
    assert json.loads(termination.read_text())["result"] == "already-prepared"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # Other options are another preparation.
    wider = prepare("--input", raw, "--tokenizer", model, "--out", out)
    assert result(wider)["result"] == "prepared"
    assert result(wider)["documents"] == 4  # the long one is kept without --max-tokens

    # Changed input prepares again, and the new document comes last (file order, then line).
    write_jsonl(raw / "c.jsonl", [{"text": "a brand new document"}])
    changed = prepare("--input", raw, "--tokenizer", model, "--out", out)
    assert changed.returncode == 0, changed.stderr
    assert result(changed)["result"] == "prepared"
    tail = [*tokenizer.encode("a brand new document", add_special_tokens=False).ids, EOS]
    shards = TokenShards(out)
    assert shards.documents == 5
    assert shards.read(shards.total - len(tail), len(tail)).tolist() == tail


def test_output_is_deterministic_and_shards_split(tmp_path: Path, model: Path) -> None:
    raw = tmp_path / "raw"
    corpus(raw)
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        run = prepare("--input", raw, "--tokenizer", model, "--out", out, "--shard-tokens", 8, "--no-dedup")
        assert run.returncode == 0, run.stderr
        assert result(run)["duplicates"] == 0
    names = sorted(p.name for p in outs[0].glob("shard-*.bin"))
    assert len(names) > 1
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_parquet_input(tmp_path: Path, model: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    pq.write_table(
        pa.table({"text": ["from parquet", "from parquet", "second row"], "n": [1, 2, 3]}), raw / "p.parquet"
    )
    run = prepare("--input", raw, "--tokenizer", model, "--out", out)
    assert run.returncode == 0, run.stderr
    assert result(run)["documents"] == 2
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    first = tokenizer.encode("from parquet", add_special_tokens=False).ids
    assert TokenShards(out).read(0, len(first) + 1).tolist() == [*first, EOS]


def test_clear_errors(tmp_path: Path, model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = prepare("--input", empty, "--tokenizer", model, "--out", tmp_path / "o1")
    assert run.returncode != 0
    assert "no *.jsonl or *.parquet files" in run.stderr

    raw = tmp_path / "raw"
    write_jsonl(raw / "a.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    bad_tokenizer = tmp_path / "not-a-model"
    bad_tokenizer.mkdir()
    run = prepare("--input", raw, "--tokenizer", bad_tokenizer, "--out", tmp_path / "o2")
    assert run.returncode != 0
    assert "tokenizer.json: not found" in run.stderr

    termination = tmp_path / "termination-log"
    termination.write_text("")
    run = prepare("--input", raw, "--tokenizer", model, "--out", tmp_path / "o3", termination=termination)
    assert run.returncode != 0
    assert "a.jsonl: line 2 has no `text` field" in run.stderr
    failed = json.loads(termination.read_text())
    assert failed["result"] == "failed" and "line 2" in failed["message"]
    assert not (tmp_path / "o3" / "index.json").exists()

    write_jsonl(raw / "a.jsonl", [{"text": "fine"}])
    (raw / "b.jsonl").write_text('{"text": "fine too"}\n{not json\n')
    run = prepare("--input", raw, "--tokenizer", model, "--out", tmp_path / "o4")
    assert run.returncode != 0
    assert "b.jsonl: " in run.stderr and "Malformed JSON" in run.stderr
    assert "Traceback" not in run.stderr
