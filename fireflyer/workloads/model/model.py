"""DeepSeek-V3: embedding, blocks of (MLA, dense MLP or MoE), final norm and LM head, over a
flat batch of tokens from many sequences and a paged latent cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fireflyer.kernels.backend import Backend
from fireflyer.workloads.model.attention import MLA
from fireflyer.workloads.model.batch import BatchMetadata
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.model.layers import RMSNorm, Rotary
from fireflyer.workloads.model.moe import MLP, MoE

# config.json's torch_dtype → torch
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Parallel:
    """Which routed experts this rank hosts: experts [rank·E/size, (rank+1)·E/size)."""

    expert_rank: int = 0
    expert_size: int = 1

    def hosted(self, num_experts: int) -> range:
        if num_experts % self.expert_size:
            raise ValueError(
                f"{num_experts} experts do not split over {self.expert_size} expert-parallel ranks"
            )
        per = num_experts // self.expert_size
        return range(self.expert_rank * per, (self.expert_rank + 1) * per)


@dataclass(frozen=True)
class Backends:
    attention: Backend = "auto"
    gemm: Backend = "auto"


class Block(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        parallel: Parallel,
        backends: Backends,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = MLA(
            config,
            dtype=dtype,
            device=device,
            gemm_backend=backends.gemm,
            attention_backend=backends.attention,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp: MLP | MoE
        if config.is_moe_layer(layer):
            self.mlp = MoE(
                config,
                dtype=dtype,
                device=device,
                experts=parallel.hosted(config.n_routed_experts),
                gemm_backend=backends.gemm,
            )
        else:
            self.mlp = MLP(
                config, config.intermediate_size, dtype=dtype, device=device, gemm_backend=backends.gemm
            )

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary,
        cache: torch.Tensor,
        meta: BatchMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rotary, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        parallel: Parallel | None = None,
        backends: Backends | None = None,
    ) -> None:
        super().__init__()
        parallel = parallel or Parallel()
        backends = backends or Backends()
        self.config = config
        self.dtype = dtype or TORCH_DTYPES.get(config.torch_dtype, torch.bfloat16)
        self.parallel = parallel
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=self.dtype, device=device
        )
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(config, i, dtype=self.dtype, device=device, parallel=parallel, backends=backends)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.dtype, device)
        self.lm_head = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=self.dtype, device=device),
            requires_grad=False,
        )
        self.rotary = Rotary(config, device)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def prepare(self) -> None:
        """Derived weights, once the checkpoint is loaded."""
        for block in self.blocks:
            block.self_attn.prepare()

    @property
    def blocks(self) -> list[Block]:
        return [block for block in self.layers if isinstance(block, Block)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        caches: list[torch.Tensor],
        meta: BatchMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] → final hidden states [T, hidden]; caches[layer] is written."""
        x = self.embed_tokens(input_ids)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, positions, self.rotary, cache, meta)
        return self.norm(x)

    @property
    def expert_parallel(self) -> bool:
        """Whether MoE layers dispatch to an expert-parallel group (every rank must then run
        every MoE layer in step with the others)."""
        return any(isinstance(b.mlp, MoE) and b.mlp.dispatcher is not None for b in self.blocks)

    def idle_pass(self) -> None:
        """A rank with no tokens this step still takes part in every expert-parallel MoE layer's
        dispatch and combine, so the ranks that have tokens are not left waiting."""
        empty = torch.zeros(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for block in self.blocks:
            if isinstance(block.mlp, MoE) and block.mlp.dispatcher is not None:
                block.mlp(empty)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
