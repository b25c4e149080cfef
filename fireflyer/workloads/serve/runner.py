"""Runs the model over one step's chunks: the paged latent cache, inputs, sampling, and CUDA
graphs for decode-only steps on GPU."""

from __future__ import annotations

from typing import Any

import torch

from fireflyer.kernels import mla, mla_fp8
from fireflyer.kernels.mla_schedule import StepSchedules
from fireflyer.workloads.model.batch import BatchMetadata
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.model.moe import MoE
from fireflyer.workloads.serve.batch_builder import build_step
from fireflyer.workloads.serve.sampling import sample
from fireflyer.workloads.serve.types import BLOCK_TOKENS, SamplingParams, SchedulerOutput

KV_CACHE_DTYPES = ("auto", "bf16", "fp8")


def kv_cache_layout(model: DeepseekV3, kv_cache_dtype: str = "auto") -> tuple[int, torch.dtype]:
    """A cache row's width and element dtype: the latent in the model's dtype (auto) or BF16, or
    fp8: FlashMLA's FP8 layout, 656 bytes per token (fireflyer.kernels.mla_fp8)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    config = model.config
    if kv_cache_dtype == "fp8":
        if config.kv_lora_rank != mla.D_V or config.latent_dim != mla.D_QK:
            raise ValueError(
                f"the FP8 KV cache holds a {mla.D_V} + {mla.D_QK - mla.D_V} latent; this model's is"
                f" {config.kv_lora_rank} + {config.latent_dim - config.kv_lora_rank}"
            )
        return mla_fp8.TOKEN_BYTES, torch.uint8
    return config.latent_dim, torch.bfloat16 if kv_cache_dtype == "bf16" else model.dtype


def kv_block_bytes(model: DeepseekV3, kv_cache_dtype: str = "auto") -> int:
    """Bytes of one block (64 tokens, every layer)."""
    width, dtype = kv_cache_layout(model, kv_cache_dtype)
    return BLOCK_TOKENS * width * model.config.num_hidden_layers * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: DeepseekV3,
        num_blocks: int,
        *,
        cuda_graph_max_batch: int = 0,
        max_model_len: int | None = None,
        kv_cache_dtype: str = "auto",
        balance_decode: bool = True,
    ) -> None:
        """`balance_decode`: decode steps of unequal lengths attend length-balanced runs
        (mla_schedule) instead of uniform KV splits (docs/kernels.md, "Unequal lengths"), on a
        CUDA device with a BF16 cache and attention backends that take a schedule."""
        self.model = model
        self.device = model.device
        width, self.kv_dtype = kv_cache_layout(model, kv_cache_dtype)
        # Only our Gluon and Triton kernels (under auto too) attend balanced runs; the FP8 cache's
        # kernels, FlashMLA and the torch reference take uniform splits, so the schedules and the
        # second set of decode graphs would be made for nothing.
        schedulable = {"auto", "gluon", "triton"}
        self.balance_decode = (
            balance_decode
            and self.device.type == "cuda"
            and self.kv_dtype == torch.bfloat16
            and all(block.self_attn.attention_backend in schedulable for block in model.blocks)
        )
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        shape = (num_blocks, BLOCK_TOKENS, width)
        self.caches = [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            for _ in range(model.config.num_hidden_layers)
        ]
        self.generators: dict[str, torch.Generator] = {}
        self.expert_parallel = model.expert_parallel
        self.graphs: DecodeGraphs | None = None
        # Graphs need a decode without host synchronisation: the absorbed MLA in every layer.
        absorbed = all(block.self_attn.absorbed_decode for block in model.blocks)
        if cuda_graph_max_batch and self.device.type == "cuda" and absorbed:
            self.graphs = DecodeGraphs(self, cuda_graph_max_batch)

    def seed(self, request_id: str, seed: int | None) -> None:
        if seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            self.generators[request_id] = generator

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    @torch.inference_mode()
    def step(self, output: SchedulerOutput) -> dict[str, int]:
        """Compute the chunks; returns the sampled token of every chunk that reached its end."""
        if not output.chunks:
            if self.expert_parallel:
                self.model.idle_pass()  # the unit steps together: this rank joins with no tokens
            return {}
        inputs = build_step(output.chunks, self.device, balance=self.balance_decode)
        rows = inputs.sample_rows
        logits = None
        if self.graphs is not None and inputs.meta.num_decode == len(output.chunks):
            graphed = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
            # Every row's logits; a one-token chunk need not sample (a prompt chunk cut to one token).
            logits = None if graphed is None else graphed[rows]
        if logits is None:
            hidden = self.model(inputs.input_ids, inputs.positions, self.caches, inputs.meta)
            logits = self.model.logits(hidden[rows])
        params: list[SamplingParams] = [c.seq.params for c in inputs.sampling]
        generators = [self.generators.get(c.seq.request_id) for c in inputs.sampling]
        tokens = sample(logits, params, generators)
        return {c.seq.request_id: t for c, t in zip(inputs.sampling, tokens, strict=True)}

    # -- the KV tier moves whole blocks: [tokens, layers, latent] (the FP8 layout's bytes as uint8)

    def read_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        stacked = torch.stack([cache[index] for cache in self.caches], dim=2)  # [n, 64, layers, D]
        return list(stacked.to("cpu").unbind(0))

    def write_blocks(self, block_ids: list[int], blocks: list[torch.Tensor]) -> None:
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        stacked = torch.stack(blocks).to(self.device, self.kv_dtype)  # [n, 64, layers, D]
        for layer, cache in enumerate(self.caches):
            cache[index] = stacked[:, :, layer]


class DecodeGraphs:
    """One CUDA graph per padded decode batch size. Padding rows decode a dummy sequence of one
    token whose latent is written to the last cache block's first row: the scheduler never hands
    that block out (the engine reserves it).

    The expert load counters (`MoE.load`, the EPLB window) are captured with the graphs: they must
    be set before the runner is built and never reallocated. Padding rows are not counted: the
    graphs count each row by `count_rows` (1 for the batch's rows, 0 for padding).

    Each size has two graphs (one where the runner does not balance): uniform KV splits, and
    length-balanced runs whose schedule the graph makes from the lengths, for steps whose lengths
    are unequal (BatchMetadata.decode_schedules)."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.sizes = [b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 256) if b <= max_batch]
        self.max_batch = self.sizes[-1]
        device = runner.device
        self.max_blocks = -(-runner.max_model_len // BLOCK_TOKENS)
        self.scratch_row = (runner.num_blocks - 1) * BLOCK_TOKENS
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slots = torch.full((b,), self.scratch_row, dtype=torch.long, device=device)
        self.table = torch.full((b, self.max_blocks), runner.num_blocks - 1, dtype=torch.int32, device=device)
        self.seqlens = torch.ones(b, dtype=torch.int32, device=device)
        self.count_rows = torch.zeros(b, dtype=torch.long, device=device)
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        for size in reversed(self.sizes):
            for balanced in (False, True) if runner.balance_decode else (False,):
                self._capture(size, balanced)

    def _meta(self, size: int, balanced: bool) -> BatchMetadata:
        seqlens = self.seqlens[:size]
        return BatchMetadata(
            slot_mapping=self.slots[:size],
            num_decode=size,
            decode_block_table=self.table[:size],
            decode_seqlens=seqlens,
            decode_schedules=StepSchedules(seqlens) if balanced else None,
        )

    def _forward(self, size: int, balanced: bool) -> torch.Tensor:
        model = self.runner.model
        meta = self._meta(size, balanced)
        hidden = model(self.input_ids[:size], self.positions[:size], self.runner.caches, meta)
        return model.logits(hidden)

    def _capture(self, size: int, balanced: bool) -> None:
        moes = [block.mlp for block in self.runner.model.blocks if isinstance(block.mlp, MoE)]
        for moe in moes:
            moe.load_mask = self.count_rows
        try:
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its algorithms
                self._forward(size, balanced)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[size, balanced] = self._forward(size, balanced)
        finally:
            for moe in moes:  # eager steps have no padding rows
                moe.load_mask = None
        self.pool = graph.pool()
        self.graphs[size, balanced] = graph

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: BatchMetadata
    ) -> torch.Tensor | None:
        n = int(input_ids.shape[0])
        size = next((s for s in self.sizes if s >= n), None)
        table = meta.decode_block_table
        if size is None or table is None or meta.decode_seqlens is None or table.shape[1] > self.max_blocks:
            return None
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slots[:n] = meta.slot_mapping
        self.slots[n:size] = self.scratch_row
        self.table[:n, : table.shape[1]] = table
        self.seqlens[:n] = meta.decode_seqlens
        self.seqlens[n:size] = 1
        self.count_rows[:n] = 1
        self.count_rows[n:size] = 0
        # The padding rows' one-token lengths do not change which graph suits the batch's own.
        balanced = meta.decode_schedules is not None
        self.graphs[size, balanced].replay()
        return self.logits[size, balanced][:n]
