"""The engine core: one step = schedule → run the model → sample → update. Synchronous; the
server drives it from its own thread (`async_engine`), tests and benchmarks call it directly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fireflyer.errors import FireflyerError
from fireflyer.storage.kvcache import KVBlockStore, KVStoreError
from fireflyer.workloads.model.attention import MLA
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.model.moe import MoE
from fireflyer.workloads.serve.block_manager import BlockManager, KVTier
from fireflyer.workloads.serve.eplb_load import LoadWindow
from fireflyer.workloads.serve.handoff import PrefillSends
from fireflyer.workloads.serve.kv_tier import StoreTier
from fireflyer.workloads.serve.kv_transfer import ReceivedTier, make_transport
from fireflyer.workloads.serve.runner import ModelRunner, kv_block_bytes, kv_cache_layout
from fireflyer.workloads.serve.scheduler import Scheduler
from fireflyer.workloads.serve.types import (
    BLOCK_TOKENS,
    SamplingParams,
    ScheduledChunk,
    SchedulerOutput,
    Sequence,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    max_waiting: int = 1024
    num_kv_blocks: int | None = None  # default: from kv_cache_memory or the free GPU memory
    kv_cache_memory: int = 1 << 30  # bytes of KV cache when not on a GPU
    gpu_memory_utilization: float = 0.9
    cuda_graph_max_batch: int = 128  # 0: no CUDA graphs
    balance_decode: bool = True  # decode steps of unequal lengths attend length-balanced MLA runs
    kv_cache_dir: Path | None = None
    kv_cache_dir_bytes: int = 64 << 30
    namespace: str = ""  # prefix-cache keys: requests of different models never share blocks
    warmup: bool = True  # on a GPU: compile and tune every kernel shape bucket before serving
    eplb_window_seconds: float = 600.0  # the expert load window (GET /v1/eplb/load)
    eplb_bucket_seconds: float = 10.0  # its granularity: counts leave the window a bucket at a time
    receive_kv: bool = False  # decode role: admit requests with KV blocks a prefill unit sent
    kv_transfer: str = "auto"  # the hand-off transport: auto, tcp or nixl
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), bf16, or fp8 (runner.kv_cache_layout)


@dataclass(frozen=True)
class StepEvent:
    seq: Sequence
    token: int | None  # the token this step appended, if any
    finished: bool


def plan_kv_blocks(model: DeepseekV3, config: EngineConfig) -> int:
    if config.num_kv_blocks:
        return config.num_kv_blocks
    per_block = kv_block_bytes(model, config.kv_cache_dtype)
    if model.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model.device)
        budget = free - (1 - config.gpu_memory_utilization) * total
        # Room for activations: a prefill step's largest intermediate tensors.
        budget -= 4 * config.max_num_batched_tokens * model.config.hidden_size * 4
        return max(16, int(budget // per_block))
    return max(16, config.kv_cache_memory // per_block)


class EngineSetupError(FireflyerError, ValueError):
    """Flags that cannot work together (the message says which)."""


def _open_store(root: Path, **kwargs: Any) -> KVBlockStore:
    try:
        return KVBlockStore(root, **kwargs)
    except (KVStoreError, OSError) as error:
        raise EngineSetupError(f"--kv-cache-dir {root}: {error}") from error


class LLMEngine:
    def __init__(
        self, model: DeepseekV3, eos_token_ids: set[int], config: EngineConfig | None = None
    ) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        try:
            kv_cache_layout(model, config.kv_cache_dtype)
        except ValueError as error:
            raise EngineSetupError(f"--kv-cache-dtype: {error}") from error
        num_blocks = plan_kv_blocks(model, config)
        graphs = config.cuda_graph_max_batch if model.device.type == "cuda" else 0
        # A sequence can never hold more tokens than the cache has rows (the last block may be the
        # CUDA graphs' scratch block): clients are told the smaller limit up front.
        cache_tokens = (num_blocks - (1 if graphs else 0)) * BLOCK_TOKENS
        self.max_model_len = min(
            config.max_model_len or model.config.max_position_embeddings,
            model.config.max_position_embeddings,
            cache_tokens,
        )
        if config.max_model_len and self.max_model_len < config.max_model_len:
            log.warning(
                "max_model_len %d lowered to %d: the KV cache holds %d blocks of %d tokens",
                config.max_model_len,
                self.max_model_len,
                num_blocks,
                BLOCK_TOKENS,
            )
        # Tokens per expert of every MoE layer (None for a dense model). Made before the runner:
        # its CUDA graphs capture the counting into these very counters.
        try:
            self.eplb_load = LoadWindow.for_model(
                model,
                window_seconds=config.eplb_window_seconds,
                bucket_seconds=config.eplb_bucket_seconds,
            )
        except ValueError as error:
            raise EngineSetupError(f"--eplb-window-seconds: {error}") from error
        if config.kv_cache_dir is not None and config.kv_cache_dtype == "fp8":
            raise EngineSetupError("--kv-cache-dir stores BF16 blocks; it does not take --kv-cache-dtype fp8")
        named = {m.attention_backend for m in model.modules() if isinstance(m, MLA)}
        if config.kv_cache_dtype == "fp8" and named & {"official", "gluon"}:
            # FlashMLA's dense decode and our Gluon kernel take no FP8 cache (kernels/mla_fp8.py).
            raise EngineSetupError(
                f"--attention-backend {sorted(named & {'official', 'gluon'})[0]} does not decode the FP8"
                " cache; use --attention-backend auto, triton or torch with --kv-cache-dtype fp8"
            )
        self.runner = ModelRunner(
            model,
            num_blocks,
            cuda_graph_max_batch=graphs,
            max_model_len=self.max_model_len,
            kv_cache_dtype=config.kv_cache_dtype,
            balance_decode=config.balance_decode,
        )
        self.store: KVBlockStore | None = None
        tier: KVTier | None = None
        if config.kv_cache_dir is not None:
            if self.runner.kv_dtype != torch.bfloat16:
                raise EngineSetupError(
                    f"--kv-cache-dir stores BF16 blocks; this engine's cache is {self.runner.kv_dtype}"
                    " (use --dtype bfloat16 or --kv-cache-dtype bf16)"
                )
            self.store = _open_store(
                config.kv_cache_dir,
                layers=model.config.num_hidden_layers,
                latent_dim=model.config.latent_dim,
                dtype=model.dtype,
                capacity_bytes=config.kv_cache_dir_bytes,
                namespace=config.namespace,
            )
            tier = StoreTier(self.store, self.runner)
        self.received: ReceivedTier | None = None
        if config.receive_kv:  # handed-over blocks are found first, then the store's
            self.received = ReceivedTier(self.runner, inner=tier)
            tier = self.received
        self.prefill_sends = PrefillSends(lambda: make_transport(config.kv_transfer).sender())
        # With CUDA graphs the last block is the padding rows' scratch space.
        usable = num_blocks - (1 if self.runner.graphs is not None else 0)
        self.block_manager = BlockManager(usable, namespace=config.namespace, tier=tier)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            max_waiting=config.max_waiting,
        )
        if config.warmup and model.device.type == "cuda":
            self.warmup()
        if self.eplb_load is not None:
            self.eplb_load.reset()  # the CUDA graphs' warm-up runs are no load
        block_bytes = kv_block_bytes(model, config.kv_cache_dtype)
        log.info(
            "KV cache: %d blocks of 64 tokens (%.1f MiB; %s, %d bytes per token and layer)",
            num_blocks,
            num_blocks * block_bytes / 2**20,
            "fp8" if config.kv_cache_dtype == "fp8" else str(self.runner.kv_dtype).removeprefix("torch."),
            block_bytes // (BLOCK_TOKENS * model.config.num_hidden_layers),
        )

    def warmup(self) -> None:
        """Run one prefill of every power-of-two token count up to the step budget, so Triton
        compiles and autotunes each GEMM's M bucket now rather than stalling a live request.
        The blocks it writes are free blocks; nothing keys them."""
        tokens = 16
        vocab = self.model.config.vocab_size
        generator = torch.Generator().manual_seed(0)
        while tokens <= self.config.max_num_batched_tokens:
            blocks = -(-tokens // BLOCK_TOKENS)
            if blocks > self.block_manager.num_blocks:
                break
            ids = torch.randint(0, vocab, (tokens,), generator=generator).tolist()
            seq = Sequence(prompt_ids=ids, params=SamplingParams(temperature=0))
            seq.block_table = list(range(blocks))
            self.runner.step(SchedulerOutput([ScheduledChunk(seq, 0, tokens)]))
            tokens *= 2
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        if self.eplb_load is not None:
            self.eplb_load.reset()  # warm-up tokens are no load
        for block in self.model.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.dispatched_entries = 0

    def validate(self, seq: Sequence) -> None:
        """ValueError (saying why) for a request this engine can never run."""
        self._check_vocabulary(seq)
        self.scheduler.validate(seq)

    def _check_vocabulary(self, seq: Sequence) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in seq.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")

    def add(self, seq: Sequence) -> None:
        self._check_vocabulary(seq)
        if seq.handoff is not None and self.received is None:
            raise ValueError("this engine does not take KV hand-offs (it is not a decode unit)")
        self.scheduler.add(seq)  # validates the rest
        if seq.handoff is not None:
            assert self.received is not None
            self.received.put(seq.handoff.keys, seq.handoff.blocks)
        self.runner.seed(seq.request_id, seq.params.seed)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> tuple[list[StepEvent], int]:
        """One step; returns what happened to each sequence, and how many were preempted."""
        output = self.scheduler.schedule()
        sampled = self.runner.step(output)
        sending = self.prefill_sends.before_update([c.seq for c in output.chunks])
        finished = self.scheduler.update(output, sampled)
        if sending:
            self.prefill_sends.after_update(sending, self.runner.read_blocks)
        done = {seq.request_id for seq in finished}
        events = [
            StepEvent(c.seq, c.seq.token_ids[-1], c.seq.request_id in done)
            for c in output.chunks
            if c.seq.request_id in sampled
        ]
        reported = {e.seq.request_id for e in events}
        events += [StepEvent(seq, None, True) for seq in finished if seq.request_id not in reported]
        for seq in finished:
            self.runner.forget(seq.request_id)
            if seq.kv_target is not None:  # aborted before its blocks were all sent
                self.prefill_sends.abort(seq, "the prefill request was cancelled")
            if seq.handoff is not None and self.received is not None:
                self.received.discard(seq.handoff.keys)  # blocks it was preempted past, if any
                seq.handoff = None
        if self.eplb_load is not None:  # a step boundary; an engine going idle publishes at once
            self.eplb_load.tick(stepped=bool(output.chunks), flush=not self.has_work)
        return events, len(output.preempted)

    def idle(self) -> None:
        """Between steps while there is no work: the load window's buckets still close on time."""
        if self.eplb_load is not None:
            self.eplb_load.tick(stepped=False)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Offline: run prompts to completion; sequences in prompt order."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [Sequence(prompt_ids=list(p), params=q) for p, q in zip(prompts, each, strict=True)]
        for seq in seqs:
            self.add(seq)
        while self.has_work:
            self.step()
        return seqs

    def close(self) -> None:
        self.prefill_sends.close()
        if self.eplb_load is not None:
            self.eplb_load.detach()
        if self.store is not None:
            self.store.close()


__all__ = ["EngineConfig", "EngineSetupError", "LLMEngine", "StepEvent", "plan_kv_blocks"]
