"""`fireflyer train`: flags and entry point. Importing this module imports no torch, so building
the `fireflyer` parser stays cheap."""

from __future__ import annotations

import argparse
import logging

from fireflyer.workloads.train.config import DEVICES, DTYPES, SCHEDULES, ZERO_STAGES, TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--model", required=True, help="Hugging Face DeepSeek-V3 checkpoint directory")
    io.add_argument("--data", required=True, help="directory of tokenized shards (index.json)")
    io.add_argument("--log-jsonl", help="rank 0 writes one JSON line per step here")
    io.add_argument(
        "--timeline-jsonl", help="rank 0 writes every rank's executed pipeline operations per step here"
    )
    io.add_argument("--status-port", type=int, default=0, help="rank 0 serves GET /status here (0: off)")
    io.add_argument("--status-host", default="0.0.0.0", help="address the status endpoint listens on")

    run = parser.add_argument_group("steps and batches")
    run.add_argument("--steps", type=int, required=True, help="train until this many steps are done")
    run.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches per step and data-parallel replica (one pipeline)",
    )
    run.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    run.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    run.add_argument("--seed", type=int, default=0, help="data order")
    run.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="compute (auto: bf16 on CUDA, fp32 on CPU)"
    )
    run.add_argument("--device", choices=DEVICES, default="auto")
    run.add_argument(
        "--cpu-threads", type=int, default=0, help="intra-op threads per rank on CPU (0: cores ÷ local ranks)"
    )

    opt = parser.add_argument_group("optimizer")
    opt.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup (default: min(100, steps/10))")
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--adam-beta1", type=float, default=0.9)
    opt.add_argument("--adam-beta2", type=float, default=0.95)
    opt.add_argument("--adam-eps", type=float, default=1e-8)
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient L2 norm (0: off)")
    opt.add_argument("--bias-update-speed", type=float, default=0.001, help="router bias step per update (γ)")
    opt.add_argument("--seq-aux-alpha", type=float, default=1e-4, help="sequence-wise balance loss α")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", help="save here and resume from the newest intact checkpoint")
    ckpt.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at the end)"
    )
    ckpt.add_argument("--keep", type=int, default=3, help="complete checkpoints to keep (0: all)")

    par = parser.add_argument_group(
        "parallelism (NNODES × NPROC_PER_NODE ranks = pipeline stages × data-parallel replicas)"
    )
    par.add_argument("--pipeline", type=int, default=1, help="pipeline stages P (the model is cut by layers)")
    par.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="none",
        help="pipeline schedule when P > 1: 1f1b, or dualpipe (P even, --micro-batches even and ≥ 2P)",
    )
    par.add_argument(
        "--expert-parallel",
        type=int,
        default=1,
        help="expert-parallel ranks E: each holds 1/E of the routed experts (E divides the data-parallel"
        " ranks and the experts)",
    )
    par.add_argument(
        "--zero",
        type=int,
        choices=ZERO_STAGES,
        default=0,
        help="1: shard the AdamW state over the data-parallel ranks (ZeRO-1); 0: every rank keeps all",
    )


def run(args: argparse.Namespace) -> int:
    config = TrainConfig.from_args(args)
    config.check_inputs()
    logging.basicConfig(level=logging.WARNING, format="fireflyer train: %(message)s")
    from fireflyer.workloads.train.launch import launch  # torch from here on

    return launch(config)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `train` subcommand of `fireflyer`."""
    p = sub.add_parser(
        "train",
        help="train a DeepSeek-V3 checkpoint on tokenized shards (pipeline and data parallel, resumable)",
        description="Train a Hugging Face DeepSeek-V3 checkpoint directory on tokenized shards over"
        " NNODES × NPROC_PER_NODE ranks (pipeline stages × data-parallel replicas, 1F1B or DualPipe),"
        " with checkpoints and resume (docs/training.md).",
    )
    add_arguments(p)
    p.set_defaults(handler=run)
