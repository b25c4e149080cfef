"""The training loop of one rank.

Per step: the LR for the step → M micro-batches of forward/backward (gradients accumulate) →
gradients averaged over ranks → clipping → AdamW on the FP32 weights → router biases nudged
towards balance → rank 0 logs the step → every K steps an asynchronous checkpoint. On start the
newest intact checkpoint, if any, is loaded, and the data loader continues at the sample count it
records, so a restarted run repeats the uninterrupted run's steps exactly.

With --pipeline P > 1 the rank holds one or two stages of the model (`pipeline.Pipeline`) and
runs the micro-batches' passes in the order of the schedule; data parallelism spans the P-rank
pipelines (world = P × data-parallel replicas).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from fireflyer.storage import checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.train import balance, experts, optim, parallel, pipeline_state, state
from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.data import Loader, TokenShards
from fireflyer.workloads.train.forward import losses
from fireflyer.workloads.train.layout import Layout
from fireflyer.workloads.train.metrics import StepLog, StepRecord, TimelineLog
from fireflyer.workloads.train.parallel import Rank
from fireflyer.workloads.train.pipeline import Pipeline
from fireflyer.workloads.train.status import Status
from fireflyer.workloads.train.stopping import StopRequest, signal_name
from fireflyer.workloads.train.zero import ShardedAdamW

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self, config: TrainConfig, rank: Rank, status: Status | None = None, stop: StopRequest | None = None
    ) -> None:
        self.config = config
        self.rank = rank
        self.status = status or Status()
        self.stop = stop
        self.stopped_by = 0
        """The signal the run stopped on before --steps (0: it ran to the end)."""
        self.status.update(phase="loading")
        config.check_inputs()  # the cheap checks first
        shards = TokenShards(config.data)
        self.layout = Layout(rank.world, config.pipeline, config.schedule, config.expert_parallel)
        self.dtype = optim.compute_dtype(config.dtype, rank.device)
        self.experts = experts.setup(self.layout, rank)
        model: DeepseekV3 = load_model(
            config.model, device=rank.device, dtype=torch.float32, parallel=self.experts.shard
        )
        experts.attach(model, self.experts, config.micro_batch_size * config.seq_len)
        self.vocab_size = model.config.vocab_size
        self.model: DeepseekV3 | None = None
        self.pipeline: Pipeline | None = None
        if config.pipeline > 1:
            # The chunks keep the layers they run; the rest of the loaded model is dropped.
            self.pipeline = Pipeline(
                self.layout, rank, model, config.micro_batches, config.seq_aux_alpha, self.dtype
            )
            modules: list[torch.nn.Module] = list(self.pipeline.chunks)
        else:
            self.model = model
            modules = [model]
        del model
        self.named = [pair for module in modules for pair in optim.trainable_parameters(module)]
        self.params = [p for _, p in self.named]
        # Replicated weights, and this rank's share of the routed experts (none without EP).
        self.replicated, self.sharded = experts.split(self.experts, self.named)
        hyper: dict[str, Any] = {
            "lr": config.lr,
            "betas": (config.beta1, config.beta2),
            "eps": config.eps,
            "weight_decay": config.weight_decay,
        }
        self.zero = ShardedAdamW(self.named, rank, **hyper) if config.zero else None
        self.optimizer: torch.optim.Optimizer | ShardedAdamW = self.zero or optim.build_optimizer(
            self.named, **hyper
        )
        self.schedule = optim.LRSchedule(config.lr, config.warmup, config.steps, config.min_lr_ratio)
        position = state.Position()
        if config.checkpoint_dir is not None:
            if self.pipeline is not None:
                assert isinstance(self.optimizer, torch.optim.Optimizer)  # --zero is refused with P > 1
                position, meta = pipeline_state.resume(
                    config.checkpoint_dir, self.layout, rank, self.pipeline.chunks, self.optimizer, self.named
                )
            else:
                assert self.model is not None
                position, meta = state.resume(
                    config.checkpoint_dir,
                    rank,
                    self.model,
                    self._load_optimizer,
                    self.experts.checkpoint_rank,
                    self.experts.rows,
                )
            self._warn_changed(meta)
            if position.step and rank.is_leader:
                log.warning(
                    "resumed from the checkpoint of step %d in %s", position.step, config.checkpoint_dir
                )
        self.position = position
        replicas = self.layout.data
        global_batch = config.micro_batch_size * config.micro_batches * replicas
        self.loader = Loader(
            shards,
            config.seq_len,
            config.micro_batch_size,
            config.micro_batches,
            self.layout.replica(rank.rank),
            replicas,
            config.seed,
            # Continue at the checkpoint's sample count even when the global batch size changed.
            sample_offset=position.samples - position.step * global_batch,
        )
        self.pending: checkpoint.PendingSave | None = None
        self.saved_step = position.step  # the newest checkpoint saved or being saved
        self.status.update(step=position.step, lastCheckpointStep=position.step or None)
        self.log = StepLog(config.log_jsonl if rank.is_leader else None, position.step)
        self.timelines = TimelineLog(
            config.timeline_jsonl if rank.is_leader else None,
            position.step,
            enabled=config.timeline_jsonl is not None,
        )

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        if self.zero is not None:
            self.zero.load(saved)
            return
        if "zero" in saved:
            raise TrainError(
                f"--checkpoint-dir {self.config.checkpoint_dir}: written with --zero 1; resume it with"
                " --zero 1"
            )
        assert isinstance(self.optimizer, torch.optim.Optimizer)
        optim.load_optimizer_state(self.optimizer, self.named, saved)

    def _optimizer_state(self) -> tuple[dict[str, Any], dict[str, int]]:
        """(optim/ subtree of this rank's checkpoint, its sharded paths → dim)."""
        if self.zero is not None:
            return self.zero.state(), self.zero.shard_dims()
        assert isinstance(self.optimizer, torch.optim.Optimizer)
        saved = optim.optimizer_state(self.optimizer, self.named)
        split = {name for name in saved if experts.is_expert_weight(name)} if self.experts.enabled else set()
        dims = {f"model/{name}": 0 for name in split}
        dims |= {f"optim/{name}/{key}": 0 for name in split for key in saved[name] if key != "step"}
        return saved, dims

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps."""
        if self.zero is not None:
            return self.zero.state_bytes()
        assert isinstance(self.optimizer, torch.optim.Optimizer)
        return sum(
            t.numel() * t.element_size()
            for per_param in self.optimizer.state.values()
            for t in per_param.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )

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
        batch = torch.from_numpy(self.loader.batch(step)).to(device)
        if int(batch.max()) >= self.vocab_size:
            raise TrainError(
                f"--data {cfg.data}: token id {int(batch.max())} is past the model's vocab_size"
                f" ({self.vocab_size})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is None:
            sums, grad_norm = self._one_stage(batch)
        else:
            sums, grad_norm = self._pipelined(self.pipeline, batch)
            self.timelines.write(self.rank, step + 1, self.pipeline)
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

    def _one_stage(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Every micro-batch through the whole model; → (mean [loss, balance loss], grad norm)."""
        cfg, device, model = self.config, self.rank.device, self.model
        assert model is not None
        balance.start_counting(model)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for micro in batch:
            with optim.autocast(device, self.dtype):
                result = losses(model, micro, cfg.seq_aux_alpha)
            (result.total / cfg.micro_batches).backward()
            sums += torch.stack([result.lm.detach(), result.balance.detach()]).double()
        if self.zero is not None:
            self.zero.reduce_gradients()
            grad_norm = self.zero.clip(cfg.grad_clip)
        elif self.experts.enabled:
            parallel.average_gradients(self.rank, self.replicated)
            experts.reduce_expert_gradients(self.experts, self.sharded)
            grad_norm = optim.clip_gradients(
                self.replicated, cfg.grad_clip, self.sharded, self.experts.all_reduce_over_group
            )
        else:
            parallel.average_gradients(self.rank, self.params)
            grad_norm = optim.clip_gradients(self.params, cfg.grad_clip)
        self.optimizer.step()
        balance.update_bias(model, cfg.bias_update_speed, lambda t: parallel.all_reduce_sum(self.rank, t))
        sums /= cfg.micro_batches
        parallel.all_reduce_mean(self.rank, sums)
        return sums, grad_norm

    def _pipelined(self, pipe: Pipeline, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The schedule's passes over this rank's stages; → (mean [loss, balance loss], grad norm)."""
        cfg = self.config
        pipe.start_counting()
        sums = pipe.step(batch)
        pipe.reduce_gradients()
        grad_norm = pipe.clip(cfg.grad_clip)
        self.optimizer.step()
        pipe.update_bias(cfg.bias_update_speed)
        # Each micro-batch's cross-entropy was counted on its last stage and each stage's balance
        # loss where it ran: the sum over the world counts every micro-batch once per replica.
        sums /= cfg.micro_batches
        parallel.all_reduce_sum(self.rank, sums)
        sums /= self.layout.data
        return sums, grad_norm

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
            "pipeline": self.config.pipeline,
            "expertParallel": self.config.expert_parallel,
            "zero": self.config.zero,
        }
        if self.pipeline is not None:
            assert isinstance(self.optimizer, torch.optim.Optimizer)
            pipeline_state.prune(
                self.config.checkpoint_dir,
                self.layout,
                self.rank,
                self.pipeline.chunks[0].stage,
                self.config.keep,
            )
            self.pending = pipeline_state.save(
                self.config.checkpoint_dir,
                self.layout,
                self.rank,
                self.pipeline.chunks,
                self.optimizer,
                self.named,
                self.position,
                meta,
            )
        elif self.experts.saves:  # with EP, expert group 0 holds every weight once
            assert self.model is not None
            optim_state, sharded = self._optimizer_state()
            tensors, shard_dims = state.state_dict(
                self.model, optim_state, self.position, meta, self.rank.device, sharded
            )
            ckpt_rank, ckpt_world = self.experts.checkpoint_rank
            self.pending = checkpoint.save_async(
                self.config.checkpoint_dir,
                tensors,
                self.position.step,
                rank=ckpt_rank,
                world=ckpt_world,
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
                signum = self.stop.agreed(self.rank) if self.stop is not None else 0
                if signum and record.step < cfg.steps:
                    self._stop_on_request(signum)
                    return records
            self.status.update(phase="finishing")
            if cfg.checkpoint_dir is not None and self.position.step != self.saved_step:
                self.save()
            self._collect_save(block=True)
            if cfg.checkpoint_dir is not None and self.pipeline is not None:
                pipeline_state.prune(
                    cfg.checkpoint_dir, self.layout, self.rank, self.pipeline.chunks[0].stage, cfg.keep
                )
            self.status.update(phase="done")
        except BaseException:
            self.status.update(phase="failed")
            raise
        finally:
            self.log.close()
            self.timelines.close()
        return records

    def _stop_on_request(self, signum: int) -> None:
        """Every rank agreed to stop after this step: checkpoint it (unless it is saved already)
        and wait until it is complete, so that a resumed run loses no step."""
        step, why = self.position.step, f"on request ({signal_name(signum)})"
        if self.config.checkpoint_dir is not None:
            if step != self.saved_step:
                self.save()
            self._collect_save(block=True)
            message = f"checkpointed at step {step} {why}"
        else:
            message = f"stopped at step {step} {why}; nothing saved (no --checkpoint-dir)"
        self.stopped_by = signum
        self.status.update(phase="stopped", message=message)
        if self.rank.is_leader:
            log.warning("%s", message)
