"""The preparation as a smallpond logical plan, run in this process.

    file i ──read (DuckDB: file_index, line, text)──┐
    ...                                              ├─ union → one partition → dedup (md5 of the
    file n ──read──────────────────────────────────┘    text, first occurrence kept) → tokenize
                                                        (Arrow) → length filter, ordered by
                                                        (file_index, line)

Documents keep their input order (file by path, then line), so the same input gives the same
shards. The plan's tasks run here, one after another, through smallpond's planner and task
executors (DuckDB and Arrow): `smallpond.init()` would start a Ray cluster with fixed dashboard
and metrics ports, more than a one-pod Job needs and a collision between two jobs on one node.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fireflyer.workloads.prepare.manifest import Options
from fireflyer.workloads.prepare.tokenizing import PrepareError, TokenizeTable

Progress = Callable[[str], None]


@dataclass
class Counts:
    files: int = 0
    read: int = 0
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    documents: int = 0
    tokens: int = 0


def _sql_literal(value: int | None) -> str:
    return "NULL" if value is None else str(int(value))


class Plan:
    """The nodes of one preparation and the files each read task stands for."""

    def __init__(self, files: list[Path], tokenizer_dir: Path, options: Options) -> None:
        from smallpond.logical.dataset import JsonDataSet, ParquetDataSet
        from smallpond.logical.node import (
            ArrowComputeNode,
            Context,
            DataSourceNode,
            EvenlyDistributedPartitionNode,
            SqlEngineNode,
            UnionNode,
        )

        ctx = Context()
        one = {"per_thread_output": False, "cpu_limit": 1}  # one thread: rows stay in file order
        self.reads: dict[int, Path] = {}
        reads = []
        for i, path in enumerate(files):
            dataset: Any
            if path.suffix == ".parquet":
                dataset = ParquetDataSet([str(path)], columns=["text"])
            else:
                dataset = JsonDataSet([str(path)], schema={"text": "VARCHAR"})
            node = SqlEngineNode(
                ctx,
                (DataSourceNode(ctx, dataset),),
                f"select {i}::BIGINT as file_index, (row_number() over ())::BIGINT as line,"
                " text::VARCHAR as text from {0}",
                **one,
            )
            self.reads[node.id] = path
            reads.append(node)
        merged = EvenlyDistributedPartitionNode(ctx, (UnionNode(ctx, tuple(reads)),), npartitions=1)
        self.read_stats = SqlEngineNode(
            ctx,
            (merged,),
            "select count(*)::BIGINT as documents,"
            " count(*) filter (where text is null)::BIGINT as missing,"
            " min(file_index) filter (where text is null) as missing_file,"
            " min(line) filter (where text is null) as missing_line from {0}",
            **one,
        )
        first = "qualify row_number() over (partition by md5(text) order by file_index, line) = 1"
        unique = SqlEngineNode(
            ctx,
            (merged,),
            "select file_index, line, text from {0} where text is not null "
            + (first if options.dedup else ""),
            per_thread_output=False,
        )
        tokenized = ArrowComputeNode(ctx, (unique,), process_func=TokenizeTable(str(tokenizer_dir)))
        low, high = _sql_literal(options.min_tokens), _sql_literal(options.max_tokens)
        self.length_stats = SqlEngineNode(
            ctx,
            (tokenized,),
            f"select count(*)::BIGINT as documents, count(*) filter (where n_tokens < {low})::BIGINT"
            f" as too_short, count(*) filter (where n_tokens > coalesce({high}, n_tokens))::BIGINT"
            " as too_long from {0}",
            **one,
        )
        self.kept = SqlEngineNode(
            ctx,
            (tokenized,),
            f"select tokens from {{0}} where n_tokens >= {low} and n_tokens <= coalesce({high}, n_tokens)"
            " order by file_index, line",
            **one,
        )


class Runner:
    """Runs a plan's tasks in this process, each after its inputs, each once."""

    def __init__(self, plan: Plan, work_dir: Path) -> None:
        from smallpond.execution.task import JobId, RuntimeContext
        from smallpond.logical.planner import Planner

        self.plan = plan
        work_dir.mkdir(parents=True, exist_ok=True)
        # A failed task is reported as one line (_exec); smallpond's console log would repeat it
        # as a long traceback.
        context = RuntimeContext(
            JobId(hex=uuid.uuid4().hex), datetime.now(), str(work_dir), console_log_level="CRITICAL"
        )
        context.initialize(exec_id=socket.gethostname())
        self.planner = Planner(context)
        self.outputs: dict[str, Any] = {}

    def run(self, node: Any) -> list[Any]:
        """The output datasets of a node's tasks."""
        return [self._exec(task) for task in self.planner.visit(node)]

    def _exec(self, task: Any) -> Any:
        from smallpond.execution.workqueue import WorkStatus

        if task.key in self.outputs:
            return self.outputs[task.key]
        task.input_datasets = [self._exec(dep) for dep in task.input_deps.values()]
        if task.exec() != WorkStatus.SUCCEED:
            cause = str(task.exception or "failed").strip().splitlines()[0]
            where = self.plan.reads.get(task.node_id)
            raise PrepareError(f"{where}: {cause}" if where else f"{task.key}: {cause}")
        self.outputs[task.key] = task.output
        return task.output


def _rows(datasets: list[Any]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [
        row for d in datasets for path in sorted(d.resolved_paths) for row in pq.read_table(path).to_pylist()
    ]


def check_parquet_columns(files: list[Path]) -> None:
    import pyarrow.parquet as pq

    for path in files:
        if path.suffix == ".parquet" and "text" not in pq.read_schema(path).names:
            raise PrepareError(f"{path}: no `text` column")


def run_plan(
    files: list[Path], tokenizer_dir: Path, options: Options, work_dir: Path, progress: Progress
) -> tuple[Counts, Iterator[np.ndarray]]:
    """Read, check, dedup, tokenize and filter; the kept documents' tokens, in order."""
    check_parquet_columns(files)
    plan = Plan(files, tokenizer_dir, options)
    runner = Runner(plan, work_dir)
    counts = Counts(files=len(files))
    [stats] = _rows(runner.run(plan.read_stats))
    counts.read = int(stats["documents"])
    if stats["missing"]:
        where = files[int(stats["missing_file"])]
        raise PrepareError(
            f"{where}: line {stats['missing_line']} has no `text` field ({stats['missing']} documents"
            " without text in all)"
        )
    progress(f"read {counts.read} documents from {len(files)} files; deduplicating and tokenizing")
    lengths = _rows(runner.run(plan.length_stats))
    unique = sum(int(r["documents"]) for r in lengths)
    counts.duplicates = counts.read - unique
    counts.too_short = sum(int(r["too_short"]) for r in lengths)
    counts.too_long = sum(int(r["too_long"]) for r in lengths)
    counts.documents = unique - counts.too_short - counts.too_long
    return counts, _token_docs(runner.run(plan.kept))


def _token_docs(datasets: list[Any]) -> Iterator[np.ndarray]:
    import pyarrow.parquet as pq

    for dataset in datasets:
        for path in sorted(dataset.resolved_paths):
            for batch in pq.ParquetFile(path).iter_batches(columns=["tokens"]):
                column = batch.column(0)
                offsets = column.offsets.to_numpy()
                values = column.values.to_numpy(zero_copy_only=False)
                for start, end in itertools.pairwise(offsets):
                    yield values[start:end]


def default_work_dir(out: Path) -> Path:
    return out / f".prepare-work-{os.getpid()}"
