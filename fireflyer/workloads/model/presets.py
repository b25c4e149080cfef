"""config.json dicts for random-weight DeepSeek-V3 checkpoints (`fireflyer model init --preset`).

- tiny: CPU tests; a forward pass takes milliseconds.
- small: the CPU demo.
- v3: DeepSeek-V3's real widths with 4 layers (set num_hidden_layers by override), for GPU
  benchmarks; its vocabulary is the real 129280, far beyond our small tokenizer.

Every field of Hugging Face's DeepseekV3Config is present, plus the fields DeepSeek's own
config.json carries. num_nextn_predict_layers is 0: these checkpoints have no MTP layers.
"""

from __future__ import annotations

import copy
from typing import Any

from fireflyer.workloads.model.tokenizer_files import BOS_ID, EOS_ID, tokenizer_vocab_size

PRESETS = ("tiny", "small", "v3")
# Cheap enough to offer on the command line; v3 is for GPU benchmarks through the API.
CLI_PRESETS = ("tiny", "small")

_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "num_key_value_heads": None,  # filled with num_attention_heads (MLA has no KV head sharing)
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "hidden_act": "silu",
    "rope_theta": 10000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": None,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
    "use_cache": True,
    "pretraining_tp": 1,
    "moe_layer_freq": 1,
    "ep_size": 1,
    "num_nextn_predict_layers": 0,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
}

_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "q_lora_rank": 128,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 64,
        "v_head_dim": 64,
        "n_routed_experts": 16,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "max_position_embeddings": 4096,
        "rope_scaling": {"factor": 4, "original_max_position_embeddings": 1024},
    },
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "q_lora_rank": 512,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 1,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 4,
        "max_position_embeddings": 8192,
        "rope_scaling": {"factor": 4, "original_max_position_embeddings": 2048},
    },
    "v3": {
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "max_position_embeddings": 163840,
        "rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096},
    },
}


def padded_vocab_size(multiple: int = 64) -> int:
    """The tokenizer's size rounded up, as real checkpoints pad the embedding table."""
    return -(-tokenizer_vocab_size() // multiple) * multiple


def _yarn(factor: int, original_max_position_embeddings: int) -> dict[str, Any]:
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original_max_position_embeddings,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }


def get_preset(name: str) -> dict[str, Any]:
    """A fresh config.json dict for the preset (the caller may change it)."""
    if name not in _SHAPES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    shape = copy.deepcopy(_SHAPES[name])
    config = copy.deepcopy(_COMMON) | shape
    config["num_key_value_heads"] = config["num_attention_heads"]
    config["rope_scaling"] = _yarn(**shape["rope_scaling"])
    config.setdefault("vocab_size", padded_vocab_size())
    return dict(sorted(config.items()))
