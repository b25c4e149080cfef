"""A small MoE layer's config shared by the MoE tests: 8 experts in 4 groups, top-3 of the best 2
groups, widths that FP8 blocks allow."""

from __future__ import annotations

from fireflyer.workloads.model.config import ModelConfig

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    kv_lora_rank=512,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    first_k_dense_replace=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.0,
)
