"""A Hugging Face DeepSeek-V3 config.json as one dataclass of model arguments."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fireflyer.errors import FireflyerError

FP8_BLOCK = 128


class ConfigError(FireflyerError, ValueError):
    """A config.json this model cannot run, with the field to fix in the message."""


@dataclass(frozen=True)
class RopeScaling:
    """YaRN as DeepSeek-V3 uses it; `factor` 1 means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def is_yarn(self) -> bool:
        return self.factor > 1.0


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    if factor <= 1 or not mscale:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    fp8_weights: bool = False  # DeepSeek's e4m3 weights with 128×128 `weight_scale_inv` blocks
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one token's cache entry per layer: the compressed KV and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/√d_qk, corrected by YaRN's mscale² (DeepSeek-V3: ×(0.1·ln 40 + 1)²)."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope_scaling
        if rope.is_yarn and rope.mscale_all_dim:
            m = yarn_mscale(rope.factor, rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config.json: `{key}` is required for a DeepSeek-V3 model")
            return raw[key]

        quant = raw.get("quantization_config") or {}
        fp8 = quant.get("quant_method") == "fp8"
        if fp8 and list(quant.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])) != [FP8_BLOCK, FP8_BLOCK]:
            raise ConfigError("config.json: quantization_config.weight_block_size must be [128, 128]")
        if quant and not fp8:
            raise ConfigError(
                f"config.json: quantization_config.quant_method {quant.get('quant_method')!r} is not"
                " supported (only DeepSeek's 'fp8' block format)"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        config = cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            moe_intermediate_size=raw.get("moe_intermediate_size") or need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=need("num_attention_heads"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            q_lora_rank=raw.get("q_lora_rank"),
            first_k_dense_replace=raw.get("first_k_dense_replace", 0),
            n_routed_experts=raw.get("n_routed_experts") or 0,
            n_shared_experts=raw.get("n_shared_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            n_group=raw.get("n_group") or 1,
            topk_group=raw.get("topk_group") or 1,
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rope_theta=float(
                raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0
            ),
            rope_scaling=_rope_scaling(raw),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            fp8_weights=fp8,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        config.validate(raw)
        return config

    def validate(self, raw: dict[str, Any]) -> None:
        scoring = raw.get("scoring_func", "sigmoid")
        if self.n_routed_experts and scoring != "sigmoid":
            raise ConfigError(
                f"config.json: scoring_func {scoring!r} is not supported (DeepSeek-V3: sigmoid)"
            )
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"config.json: n_routed_experts ({self.n_routed_experts}) must divide by n_group"
                    f" ({self.n_group})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"config.json: topk_group must be in 1..n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
                raise ConfigError(
                    "config.json: num_experts_per_tok must be ≥ 1 and fit in topk_group × experts per group"
                )
        if self.qk_rope_head_dim % 2:
            raise ConfigError("config.json: qk_rope_head_dim must be even")
        heads_kv = raw.get("num_key_value_heads", self.num_attention_heads)
        if heads_kv != self.num_attention_heads:
            raise ConfigError("config.json: MLA needs num_key_value_heads == num_attention_heads")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (a Hugging Face checkpoint directory has config.json)")
        return cls.from_dict(json.loads(path.read_text()))


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    kind = rope.get("type") or rope.get("rope_type") or "default"
    if kind == "default" or not rope:
        return RopeScaling()
    if kind != "yarn":
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (DeepSeek-V3: yarn)")
    original = rope.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 4096)
    factor = rope.get("factor") or raw.get("max_position_embeddings", original) / original
    return RopeScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        mscale=rope.get("mscale"),
        mscale_all_dim=rope.get("mscale_all_dim"),
        attention_factor=rope.get("attention_factor"),
        truncate=bool(rope.get("truncate", True)),
    )
