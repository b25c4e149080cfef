"""The trainer's settings (one dataclass built from the flags) and their checks. No torch here:
the CLI validates flags before any rank process starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fireflyer.errors import FireflyerError

SCHEDULES = ("none", "1f1b", "dualpipe")
DTYPES = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
ZERO_STAGES = (0, 1)


class TrainError(FireflyerError):
    """Bad trainer input (flags, directories, environment); the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    model: Path
    data: Path
    steps: int
    micro_batches: int = 1
    micro_batch_size: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: min(100, steps // 10)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    cpu_threads: int = 0
    bias_update_speed: float = 0.001
    seq_aux_alpha: float = 1e-4
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100
    keep: int = 3
    pipeline: int = 1
    schedule: str = "none"
    expert_parallel: int = 1
    zero: int = 0
    log_jsonl: Path | None = None
    timeline_jsonl: Path | None = None
    status_port: int = 0
    status_host: str = "0.0.0.0"

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        def path(value: str | None) -> Path | None:
            return Path(value) if value else None

        config = cls(
            model=Path(args.model),
            data=Path(args.data),
            steps=args.steps,
            micro_batches=args.micro_batches,
            micro_batch_size=args.micro_batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            beta1=args.adam_beta1,
            beta2=args.adam_beta2,
            eps=args.adam_eps,
            grad_clip=args.grad_clip,
            seed=args.seed,
            dtype=args.dtype,
            device=args.device,
            cpu_threads=args.cpu_threads,
            bias_update_speed=args.bias_update_speed,
            seq_aux_alpha=args.seq_aux_alpha,
            checkpoint_dir=path(args.checkpoint_dir),
            checkpoint_every=args.checkpoint_every,
            keep=args.keep,
            pipeline=args.pipeline,
            schedule=args.schedule,
            expert_parallel=args.expert_parallel,
            zero=args.zero,
            log_jsonl=path(args.log_jsonl),
            timeline_jsonl=path(args.timeline_jsonl),
            status_port=args.status_port,
            status_host=args.status_host,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Flag values the trainer cannot run; inputs on disk are checked by `check_inputs`."""
        positive = {
            "--steps": self.steps,
            "--micro-batches": self.micro_batches,
            "--micro-batch-size": self.micro_batch_size,
            "--seq-len": self.seq_len,
            "--pipeline": self.pipeline,
            "--expert-parallel": self.expert_parallel,
        }
        for flag, value in positive.items():
            if value < 1:
                raise TrainError(f"{flag} must be ≥ 1, not {value}")
        non_negative = {
            "--checkpoint-every": self.checkpoint_every,
            "--keep": self.keep,
            "--grad-clip": self.grad_clip,
            "--weight-decay": self.weight_decay,
            "--bias-update-speed": self.bias_update_speed,
            "--seq-aux-alpha": self.seq_aux_alpha,
            "--warmup-steps": self.warmup,
        }
        for flag, number in non_negative.items():
            if number < 0:
                raise TrainError(f"{flag} must be ≥ 0, not {number}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be > 0, not {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"--min-lr-ratio must be in [0, 1], not {self.min_lr_ratio}")
        if not 0 <= self.status_port < 65536:
            raise TrainError(f"--status-port must be a port number (0: off), not {self.status_port}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.zero not in ZERO_STAGES:
            raise TrainError(f"--zero must be 0 (off) or 1 (optimizer state sharded), not {self.zero}")
        if self.pipeline > 1:
            self._validate_pipeline()
        if self.expert_parallel > 1 and self.zero:
            raise TrainError(
                "--zero 1 with --expert-parallel is not supported yet: the experts' AdamW state is"
                " already split over the expert-parallel ranks; drop --zero or --expert-parallel"
            )

    def _validate_pipeline(self) -> None:
        p, m = self.pipeline, self.micro_batches
        unsupported = {"--expert-parallel": self.expert_parallel > 1, "--zero": self.zero > 0}
        for flag, given in unsupported.items():
            if given:
                raise TrainError(
                    f"{flag} with --pipeline {p} is not supported yet: use one of them (the stages of a"
                    " pipeline already split the weights and their AdamW state)"
                )
        if self.schedule == "none":
            raise TrainError(f"--pipeline {p} needs a --schedule: 1f1b or dualpipe")
        if self.schedule == "dualpipe":
            if p % 2:
                raise TrainError(f"--schedule dualpipe needs an even --pipeline, not {p}")
            if m % 2 or m < 2 * p:
                raise TrainError(
                    f"--schedule dualpipe with --pipeline {p} needs an even --micro-batches ≥ {2 * p},"
                    f" not {m} (half the micro-batches enter at each end of the pipeline)"
                )

    def check_inputs(self) -> None:
        """Fail fast, once and before rank processes start, on inputs that cannot work (the ranks
        check again what only they can: weights, token ids). Reads config.json and the data index
        only (numpy, no torch)."""
        from fireflyer.workloads.model.config import ModelConfig
        from fireflyer.workloads.train.data import Loader, TokenShards

        if not (self.model / "config.json").is_file():
            raise TrainError(f"--model {self.model}: no config.json (a Hugging Face checkpoint directory)")
        if not (self.data / "index.json").is_file():
            raise TrainError(f"--data {self.data}: no index.json (a directory of tokenized shards)")
        model = ModelConfig.from_pretrained(self.model)
        positions = model.max_position_embeddings
        if self.pipeline > model.num_hidden_layers:
            raise TrainError(
                f"--pipeline {self.pipeline}: the model has {model.num_hidden_layers} layers, fewer than"
                " one per stage"
            )
        experts = model.n_routed_experts or 0
        if self.expert_parallel > 1 and (not experts or experts % self.expert_parallel):
            raise TrainError(
                f"--expert-parallel {self.expert_parallel} does not divide the model's {experts} routed"
                " experts"
            )
        if self.seq_len > positions:
            raise TrainError(f"--seq-len {self.seq_len} exceeds the model's {positions} positions")
        Loader(TokenShards(self.data), self.seq_len, self.micro_batch_size, self.micro_batches)
        ckpt = self.checkpoint_dir
        if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
            raise TrainError(f"--checkpoint-dir {self.checkpoint_dir}: not a directory")
        if ckpt is not None:
            from fireflyer.workloads.train.layout import check_checkpoint_layout

            check_checkpoint_layout(ckpt, self.pipeline)
