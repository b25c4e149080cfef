"""`fireflyer model init`: a random-weight DeepSeek-V3 checkpoint in Hugging Face's layout.

Tests, the demo and users without the real weights get a model that every loader of
DeepSeek-V3 checkpoints reads: config.json, safetensors shards (with an index when there is more
than one), generation_config.json and a tokenizer. Weights are either in the config's torch_dtype
or in DeepSeek's FP8 format (e4m3 with a float32 `_scale_inv` per 128×128 block).

Each tensor is drawn from its own generator, seeded from (seed, tensor name): the same seed gives
the same bytes, the BF16 and FP8 checkpoints of one seed hold the same underlying weights, and a
tensor never needs the others in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fireflyer.kernels.fp8 import quantize_per_block
from fireflyer.workloads.model.checkpoint_writer import (
    StoredTensor,
    plan_shards,
    shard_file_names,
    staged_directory,
    write_index,
    write_json,
    write_safetensors,
)
from fireflyer.workloads.model.model import TORCH_DTYPES
from fireflyer.workloads.model.presets import get_preset
from fireflyer.workloads.model.tokenizer_files import tokenizer_vocab_size, write_tokenizer
from fireflyer.workloads.threads import single_intra_op_thread

DTYPES = ("bf16", "fp8")
BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
QUANTIZATION_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}

# Scales of the random weights. Linears are drawn with std 1/sqrt(fan_in) so each keeps its input's
# magnitude and the residual stream stays O(1) through the layers. The gains below make the random
# model behave like a model: logits spread enough that greedy decoding wanders over the vocabulary,
# router scores far enough apart that routing depends on the token, a correction bias large enough
# to change some selections (so an engine that ignores it is caught) and norm weights that differ
# from 1 (so an engine that skips them is caught).
EMBED_STD = 1.0
LOGIT_GAIN = 2.0
ROUTER_GAIN = 1.5
CORRECTION_BIAS_STD = 0.05
NORM_NOISE_STD = 0.1

Kind = Literal["embed", "head", "linear", "router", "bias", "norm"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: Kind

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --- config --------------------------------------------------------------------------------------

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
)
_NON_NEGATIVE_INTS = ("n_shared_experts", "first_k_dense_replace")


def build_config(preset: str, dtype: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's config.json dict with `overrides` merged in, validated, with FP8's
    quantization_config when dtype is "fp8"."""
    _check_dtype(dtype)
    config = get_preset(preset)
    for key, value in (overrides or {}).items():
        if key == "quantization_config":
            raise ValueError("quantization_config is set by dtype='fp8', not by an override")
        if key not in config:
            raise ValueError(f"unknown config field {key!r} in overrides")
        config[key] = value
    if dtype == "fp8":
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    validate_config(config, dtype)
    return config


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(config: dict[str, Any]) -> None:
    for field in _POSITIVE_INTS:
        if not _is_int(config.get(field)) or config[field] <= 0:
            raise ValueError(f"{field} must be a positive integer, not {config.get(field)!r}")
    for field in _NON_NEGATIVE_INTS:
        if not _is_int(config.get(field)) or config[field] < 0:
            raise ValueError(f"{field} must be a non-negative integer, not {config.get(field)!r}")
    q_lora_rank = config.get("q_lora_rank")
    if q_lora_rank is not None and (not _is_int(q_lora_rank) or q_lora_rank <= 0):
        raise ValueError(f"q_lora_rank must be a positive integer or None, not {q_lora_rank!r}")


def _check_attention(config: dict[str, Any]) -> None:
    if config["num_key_value_heads"] != config["num_attention_heads"]:
        raise ValueError(
            f"num_key_value_heads ({config['num_key_value_heads']}) must equal num_attention_heads "
            f"({config['num_attention_heads']}): MLA shares one latent, not groups of heads"
        )
    if config["qk_rope_head_dim"] % 2:
        raise ValueError(f"qk_rope_head_dim ({config['qk_rope_head_dim']}) must be even (RoPE rotates pairs)")


def _check_moe(config: dict[str, Any]) -> None:
    experts, groups, topk_group = config["n_routed_experts"], config["n_group"], config["topk_group"]
    if experts % groups:
        raise ValueError(f"n_routed_experts ({experts}) must be divisible by n_group ({groups})")
    per_group = experts // groups
    if per_group < 2:
        raise ValueError(
            f"n_routed_experts / n_group ({per_group}) must be at least 2: a group scores by its top two"
        )
    if topk_group > groups:
        raise ValueError(f"topk_group ({topk_group}) must be at most n_group ({groups})")
    reachable = topk_group * per_group
    if config["num_experts_per_tok"] > reachable:
        raise ValueError(
            f"num_experts_per_tok ({config['num_experts_per_tok']}) exceeds the {reachable} experts "
            f"in topk_group ({topk_group}) groups of {per_group}"
        )
    if config["first_k_dense_replace"] > config["num_hidden_layers"]:
        raise ValueError(
            f"first_k_dense_replace ({config['first_k_dense_replace']}) exceeds num_hidden_layers "
            f"({config['num_hidden_layers']})"
        )


def _check_fp8_dims(config: dict[str, Any]) -> None:
    """Every quantised linear's input dim must fill whole 128-wide scale blocks."""
    inputs = {
        "hidden_size": config["hidden_size"],
        "q_lora_rank": config["q_lora_rank"],
        "kv_lora_rank": config["kv_lora_rank"],
        "num_attention_heads × v_head_dim": config["num_attention_heads"] * config["v_head_dim"],
        "intermediate_size": config["intermediate_size"],
        "moe_intermediate_size": config["moe_intermediate_size"],
    }
    for field, dim in inputs.items():
        if dim is not None and dim % BLOCK:
            raise ValueError(f"fp8 needs {field} ({dim}) to be a multiple of {BLOCK} (a linear's input dim)")


def validate_config(config: dict[str, Any], dtype: str = "bf16") -> None:
    """Raises ValueError naming the field when the config cannot describe a DeepSeek-V3 model."""
    _check_dtype(dtype)
    _check_ints(config)
    _check_attention(config)
    _check_moe(config)
    if config.get("torch_dtype") not in TORCH_DTYPES:
        allowed = ", ".join(TORCH_DTYPES)
        raise ValueError(f"torch_dtype must be one of {allowed}, not {config.get('torch_dtype')!r}")
    if config.get("num_nextn_predict_layers", 0) != 0:
        raise ValueError("num_nextn_predict_layers must be 0: random checkpoints have no MTP layers")
    if config["vocab_size"] < (tokens := tokenizer_vocab_size()):
        raise ValueError(f"vocab_size ({config['vocab_size']}) is smaller than the tokenizer's ({tokens})")
    if dtype == "fp8":
        _check_fp8_dims(config)


# --- tensor names and shapes ---------------------------------------------------------------------


def _mlp_specs(prefix: str, hidden: int, intermediate: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}gate_proj.weight", (intermediate, hidden), "linear"),
        TensorSpec(f"{prefix}up_proj.weight", (intermediate, hidden), "linear"),
        TensorSpec(f"{prefix}down_proj.weight", (hidden, intermediate), "linear"),
    ]


def _attention_specs(prefix: str, config: dict[str, Any]) -> list[TensorSpec]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_lora, kv_lora = config["q_lora_rank"], config["kv_lora_rank"]
    q_out = heads * (nope + rope)
    if q_lora is None:
        specs = [TensorSpec(f"{prefix}q_proj.weight", (q_out, hidden), "linear")]
    else:
        specs = [
            TensorSpec(f"{prefix}q_a_proj.weight", (q_lora, hidden), "linear"),
            TensorSpec(f"{prefix}q_a_layernorm.weight", (q_lora,), "norm"),
            TensorSpec(f"{prefix}q_b_proj.weight", (q_out, q_lora), "linear"),
        ]
    return [
        *specs,
        TensorSpec(f"{prefix}kv_a_proj_with_mqa.weight", (kv_lora + rope, hidden), "linear"),
        TensorSpec(f"{prefix}kv_a_layernorm.weight", (kv_lora,), "norm"),
        TensorSpec(f"{prefix}kv_b_proj.weight", (heads * (nope + v), kv_lora), "linear"),
        TensorSpec(f"{prefix}o_proj.weight", (hidden, heads * v), "linear"),
    ]


def _moe_specs(prefix: str, config: dict[str, Any]) -> list[TensorSpec]:
    hidden, experts = config["hidden_size"], config["n_routed_experts"]
    moe_inter = config["moe_intermediate_size"]
    specs = [
        TensorSpec(f"{prefix}gate.weight", (experts, hidden), "router"),
        TensorSpec(f"{prefix}gate.e_score_correction_bias", (experts,), "bias"),
    ]
    for j in range(experts):
        specs += _mlp_specs(f"{prefix}experts.{j}.", hidden, moe_inter)
    if config["n_shared_experts"]:
        specs += _mlp_specs(f"{prefix}shared_experts.", hidden, moe_inter * config["n_shared_experts"])
    return specs


def _layer_specs(i: int, config: dict[str, Any]) -> list[TensorSpec]:
    prefix, hidden = f"model.layers.{i}.", config["hidden_size"]
    if i < config["first_k_dense_replace"]:
        mlp = _mlp_specs(f"{prefix}mlp.", hidden, config["intermediate_size"])
    else:
        mlp = _moe_specs(f"{prefix}mlp.", config)
    return [
        TensorSpec(f"{prefix}input_layernorm.weight", (hidden,), "norm"),
        *_attention_specs(f"{prefix}self_attn.", config),
        TensorSpec(f"{prefix}post_attention_layernorm.weight", (hidden,), "norm"),
        *mlp,
    ]


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the checkpoint (before FP8 adds scales), in file order."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), "embed")]
    for i in range(config["num_hidden_layers"]):
        specs += _layer_specs(i, config)
    specs.append(TensorSpec("model.norm.weight", (hidden,), "norm"))
    specs.append(TensorSpec("lm_head.weight", (vocab, hidden), "head"))
    return specs


# --- random values -------------------------------------------------------------------------------


def _generator(seed: int, name: str, device: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def _random_float32(spec: TensorSpec, seed: int, device: str) -> torch.Tensor:
    generator = _generator(seed, spec.name, device)
    if spec.kind == "norm":
        return torch.empty(spec.shape, device=device).normal_(1.0, NORM_NOISE_STD, generator=generator)
    fan_in = spec.shape[-1]
    std = {
        "embed": EMBED_STD,
        "head": LOGIT_GAIN / math.sqrt(fan_in),
        "linear": 1.0 / math.sqrt(fan_in),
        "router": ROUTER_GAIN / math.sqrt(fan_in),
        "bias": CORRECTION_BIAS_STD,
    }[spec.kind]
    return torch.empty(spec.shape, device=device).normal_(0.0, std, generator=generator)


def _quantised(spec: TensorSpec, dtype: str) -> bool:
    return dtype == "fp8" and spec.kind == "linear"


def _storage_dtype(spec: TensorSpec, config: dict[str, Any]) -> torch.dtype:
    # The router's correction bias is float32 in DeepSeek's checkpoints whatever the weights are.
    return torch.float32 if spec.kind == "bias" else TORCH_DTYPES[config["torch_dtype"]]


def _spec_tensors(
    spec: TensorSpec, config: dict[str, Any], dtype: str, seed: int, device: str
) -> list[tuple[str, torch.Tensor]]:
    weight = _random_float32(spec, seed, device)
    if not _quantised(spec, dtype):
        return [(spec.name, weight.to(_storage_dtype(spec, config)))]
    q, scale_inv = quantize_per_block(weight, BLOCK)
    return [(spec.name, q), (f"{spec.name}_scale_inv", scale_inv)]


def _cpu_threads(device: str) -> contextlib.AbstractContextManager[None]:
    """Generating on CPU: each op is one small tensor, so one thread (see single_intra_op_thread)."""
    return single_intra_op_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext()


def random_state_dict(
    config: dict[str, Any], *, dtype: str, seed: int, device: str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, one at a time, made on `device`. CPU and
    CUDA generators differ, so the same seed gives different weights on different devices."""
    validate_config(config, dtype)
    for spec in tensor_specs(config):
        with torch.no_grad(), _cpu_threads(device):
            pairs = _spec_tensors(spec, config, dtype, seed, device)
        yield from pairs


# --- writing -------------------------------------------------------------------------------------


def stored_tensors(spec: TensorSpec, config: dict[str, Any], dtype: str) -> list[StoredTensor]:
    """What `_spec_tensors` makes of `spec`, known before it is generated."""
    if not _quantised(spec, dtype):
        return [StoredTensor(spec.name, _storage_dtype(spec, config), spec.shape)]
    n, k = spec.shape
    scale_shape = (math.ceil(n / BLOCK), math.ceil(k / BLOCK))
    return [
        StoredTensor(spec.name, FP8_DTYPE, spec.shape),
        StoredTensor(f"{spec.name}_scale_inv", torch.float32, scale_shape),
    ]


def _write_metadata(staging: Path, config: dict[str, Any]) -> None:
    write_json(staging / "config.json", config)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    write_json(staging / "generation_config.json", generation)
    write_tokenizer(staging, model_max_length=config["max_position_embeddings"])


def _write_weights(
    staging: Path,
    config: dict[str, Any],
    *,
    dtype: str,
    seed: int,
    device: str,
    max_shard_bytes: int,
    progress: Callable[[str], None] | None,
) -> None:
    def spec_bytes(spec: TensorSpec) -> int:  # a weight and its scale go into one shard
        return sum(t.nbytes for t in stored_tensors(spec, config, dtype))

    shards = plan_shards(tensor_specs(config), spec_bytes, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (shard, file_name) in enumerate(zip(shards, names, strict=True), start=1):
        entries = [t for spec in shard for t in stored_tensors(spec, config, dtype)]
        tensors = (pair for spec in shard for pair in _spec_tensors(spec, config, dtype, seed, device))
        write_safetensors(staging / file_name, entries, tensors)
        nbytes = sum(t.nbytes for t in entries)
        weight_map |= {t.name: file_name for t in entries}
        total += nbytes
        if progress is not None:
            size = f"{len(entries)} tensors, {nbytes / 2**20:.1f} MiB"
            progress(f"wrote {file_name} ({i}/{len(shards)}: {size})")
    if len(shards) > 1:
        write_index(staging, weight_map, total)


def init_checkpoint(
    out: Path,
    *,
    preset: str = "tiny",
    dtype: str = "bf16",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    max_shard_bytes: int = 1 << 30,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Writes a random-weight checkpoint of `preset` into `out` (which must be absent or empty
    unless overwrite) and returns `out`. Memory holds one tensor at a time."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
    config = build_config(preset, dtype, overrides)
    with torch.no_grad(), _cpu_threads(device), staged_directory(Path(out), overwrite=overwrite) as staging:
        _write_metadata(staging, config)
        _write_weights(
            staging,
            config,
            dtype=dtype,
            seed=seed,
            device=device,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
        )
    return Path(out)
