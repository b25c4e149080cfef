"""The training loop of one data-parallel rank.

Per step: the LR for the step → M micro-batches of forward/backward (gradients accumulate) →
gradients averaged over ranks → clipping → AdamW on the FP32 weights → router biases nudged
towards balance → rank 0 logs the step → every K steps an asynchronous checkpoint. On start the
newest intact checkpoint, if any, is loaded, and the data loader continues at the sample count it
records, so a restarted run repeats the uninterrupted run's steps exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from fireflyer.storage import checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.train import balance, optim, parallel, state
from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.data import Loader, TokenShards
from fireflyer.workloads.train.forward import losses
from fireflyer.workloads.train.metrics import StepLog, StepRecord
from fireflyer.workloads.train.parallel import Rank
from fireflyer.workloads.train.status import Status

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: TrainConfig, rank: Rank, status: Status | None = None) -> None:
        self.config = config
        self.rank = rank
        self.status = status or Status()
        self.status.update(phase="loading")
        config.check_inputs()  # the cheap checks first
        shards = TokenShards(config.data)
        self.model: DeepseekV3 = load_model(config.model, device=rank.device, dtype=torch.float32)
        self.named = optim.trainable_parameters(self.model)
        self.params = [p for _, p in self.named]
        self.optimizer = optim.build_optimizer(
            self.named,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
        self.schedule = optim.LRSchedule(config.lr, config.warmup, config.steps, config.min_lr_ratio)
        self.dtype = optim.compute_dtype(config.dtype, rank.device)
        position = state.Position()
        if config.checkpoint_dir is not None:
            position, meta = state.resume(config.checkpoint_dir, rank, self.model, self.optimizer, self.named)
            self._warn_changed(meta)
            if position.step and rank.is_leader:
                log.warning(
                    "resumed from the checkpoint of step %d in %s", position.step, config.checkpoint_dir
                )
        self.position = position
        global_batch = config.micro_batch_size * config.micro_batches * rank.world
        self.loader = Loader(
            shards,
            config.seq_len,
            config.micro_batch_size,
            config.micro_batches,
            rank.rank,
            rank.world,
            config.seed,
            # Continue at the checkpoint's sample count even when the global batch size changed.
            sample_offset=position.samples - position.step * global_batch,
        )
        self.pending: checkpoint.PendingSave | None = None
        self.saved_step = position.step  # the newest checkpoint saved or being saved
        self.status.update(step=position.step, lastCheckpointStep=position.step or None)
        self.log = StepLog(config.log_jsonl if rank.is_leader else None, position.step)

    def _warn_changed(self, meta: dict[str, Any]) -> None:
        now = {"seed": self.config.seed, "seqLen": self.config.seq_len}
        for key, value in now.items():
            if key in meta and meta[key] != value:
                log.warning(
                    "resuming with %s %s (checkpoint: %s): the data order changes", key, value, meta[key]
                )

    # --- one step ------------------------------------------------------------------------------

    def step(self, step: int) -> StepRecord:
        """Train step `step` (0-based); → its record (the same on every rank)."""
        started = time.perf_counter()
        cfg, device = self.config, self.rank.device
        lr = self.schedule(step)
        optim.set_lr(self.optimizer, lr)
        balance.start_counting(self.model)
        batch = torch.from_numpy(self.loader.batch(step)).to(device)
        if int(batch.max()) >= self.model.config.vocab_size:
            raise TrainError(
                f"--data {cfg.data}: token id {int(batch.max())} is past the model's vocab_size"
                f" ({self.model.config.vocab_size})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for micro in batch:
            with optim.autocast(device, self.dtype):
                result = losses(self.model, micro, cfg.seq_aux_alpha)
            (result.total / cfg.micro_batches).backward()
            sums += torch.stack([result.lm.detach(), result.balance.detach()]).double()
        parallel.average_gradients(self.rank, self.params)
        grad_norm = optim.clip_gradients(self.params, cfg.grad_clip)
        self.optimizer.step()
        balance.update_bias(
            self.model, cfg.bias_update_speed, lambda t: parallel.all_reduce_sum(self.rank, t)
        )
        sums /= cfg.micro_batches
        parallel.all_reduce_mean(self.rank, sums)
        done = step + 1
        self.position = state.Position(done, self.loader.first_sample(done))
        step_tokens = self.loader.global_batch * cfg.seq_len
        return StepRecord(
            step=done,
            loss=float(sums[0]),
            lr=lr,
            grad_norm=grad_norm,
            tokens=done * step_tokens,
            seconds=time.perf_counter() - started,
            balance_loss=float(sums[1]),
            step_tokens=step_tokens,
        )

    # --- checkpoints ---------------------------------------------------------------------------

    def _collect_save(self, block: bool) -> None:
        """Surface the previous save's outcome (errors included) once it is done."""
        if self.pending is None or not (block or self.pending.done()):
            return
        self.pending.wait()
        self.pending = None
        self.status.update(lastCheckpointStep=self.saved_step)

    def save(self) -> None:
        """Snapshot the state now, write it in the background (one save in flight at a time)."""
        assert self.config.checkpoint_dir is not None
        self._collect_save(block=True)
        meta = {
            "seed": self.config.seed,
            "seqLen": self.config.seq_len,
            "globalBatch": self.loader.global_batch,
            "world": self.rank.world,
        }
        tensors, shard_dims = state.state_dict(
            self.model, self.optimizer, self.named, self.position, meta, self.rank.device
        )
        self.pending = checkpoint.save_async(
            self.config.checkpoint_dir,
            tensors,
            self.position.step,
            rank=self.rank.rank,
            world=self.rank.world,
            shard_dims=shard_dims,
            keep_last=self.config.keep or None,
        )
        self.saved_step = self.position.step

    # --- the loop ------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> list[StepRecord]:
        """Train from the resumed position to --steps; → the records of the steps run here.
        `stop_after` ends the loop after that step as a crash would (no final checkpoint): tests."""
        cfg = self.config
        records = []
        self.status.update(phase="training")
        try:
            for step in range(self.position.step, cfg.steps):
                record = self.step(step)
                records.append(record)
                if self.rank.is_leader:
                    self.log.write(record)
                self.status.update(
                    step=record.step, loss=record.loss, tokensPerSecond=record.tokens_per_second
                )
                if stop_after is not None and record.step >= stop_after:
                    self._collect_save(block=True)
                    return records
                every = cfg.checkpoint_every
                if cfg.checkpoint_dir is not None and every and record.step % every == 0:
                    self.save()
                self._collect_save(block=False)
            self.status.update(phase="finishing")
            if cfg.checkpoint_dir is not None and self.position.step != self.saved_step:
                self.save()
            self._collect_save(block=True)
            self.status.update(phase="done")
        except BaseException:
            self.status.update(phase="failed")
            raise
        finally:
            self.log.close()
        return records
