"""`fireflyer model init`: random DeepSeek-V3 checkpoints in Hugging Face's layout, their FP8 form,
the tokenizer, and the independent check that transformers' own DeepSeek-V3 loads them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fireflyer.workloads.model import tokenizer_files
from fireflyer.workloads.model.convert import dequantize_block, dequantize_checkpoint
from fireflyer.workloads.model.init import build_config, init_checkpoint, random_state_dict
from fireflyer.workloads.model.presets import get_preset

FP8 = torch.float8_e4m3fn
TINY_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(files):
        tensors |= load_file(path / file)
    return tensors


def file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-fp8") / "ckpt"
    return init_checkpoint(out, preset="tiny", dtype="fp8", seed=0, max_shard_bytes=3 << 20)


def expected_tiny_names() -> set[str]:
    """Hugging Face DeepseekV3ForCausalLM's names for the tiny preset, written out from the brief."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(3):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for attn in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm"):
            names.add(f"{p}self_attn.{attn}.weight")
        names |= {p + "self_attn.kv_b_proj.weight", p + "self_attn.o_proj.weight"}
        projs = ("gate_proj", "up_proj", "down_proj")
        if i == 0:
            names |= {f"{p}mlp.{proj}.weight" for proj in projs}
            continue
        names |= {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}
        names |= {f"{p}mlp.experts.{j}.{proj}.weight" for j in range(16) for proj in projs}
        names |= {f"{p}mlp.shared_experts.{proj}.weight" for proj in projs}
    return names


# --- presets ---------------------------------------------------------------------------------------


def test_presets_carry_deepseek_v3_fields() -> None:
    required = {
        *("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size"),
        *("moe_intermediate_size", "num_hidden_layers", "first_k_dense_replace", "num_attention_heads"),
        *("num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"),
        *(
            "v_head_dim",
            "n_routed_experts",
            "n_shared_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        ),
        *("routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method", "hidden_act"),
        *("max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings"),
        *("attention_bias", "bos_token_id", "eos_token_id", "torch_dtype", "initializer_range"),
        "num_nextn_predict_layers",
    }
    for name in ("tiny", "small", "v3"):
        config = get_preset(name)
        assert not required - set(config), name
        assert config["architectures"] == ["DeepseekV3ForCausalLM"]
        assert (config["model_type"], config["scoring_func"], config["topk_method"]) == (
            "deepseek_v3",
            "sigmoid",
            "noaux_tc",
        )
        assert config["rope_scaling"]["type"] == "yarn"
        assert (config["rope_scaling"]["beta_fast"], config["rope_scaling"]["beta_slow"]) == (32, 1)
        assert config["num_key_value_heads"] == config["num_attention_heads"]
        assert config["num_nextn_predict_layers"] == 0
        assert config["tie_word_embeddings"] is False
        build_config(name, "fp8")  # every preset is valid, FP8 included


def test_preset_shapes() -> None:
    tiny, small, v3 = get_preset("tiny"), get_preset("small"), get_preset("v3")
    vocab = tokenizer_files.tokenizer_vocab_size()
    assert tiny["vocab_size"] == small["vocab_size"] == math.ceil(vocab / 64) * 64
    assert (tiny["hidden_size"], tiny["num_hidden_layers"], tiny["n_routed_experts"], tiny["n_group"]) == (
        256,
        3,
        16,
        4,
    )
    assert tiny["max_position_embeddings"] == 4096
    yarn = tiny["rope_scaling"]
    assert (yarn["factor"], yarn["original_max_position_embeddings"]) == (4, 1024)
    assert (small["hidden_size"], small["n_routed_experts"], small["num_experts_per_tok"]) == (1024, 64, 6)
    yarn = small["rope_scaling"]
    assert (yarn["factor"], yarn["original_max_position_embeddings"]) == (4, 2048)
    assert (v3["hidden_size"], v3["q_lora_rank"], v3["n_routed_experts"], v3["vocab_size"]) == (
        7168,
        1536,
        256,
        129280,
    )
    assert (v3["rope_scaling"]["factor"], v3["max_position_embeddings"]) == (40, 163840)


# --- layout ----------------------------------------------------------------------------------------


def test_tiny_layout_names_and_shapes(tiny: Path) -> None:
    assert {p.name for p in tiny.iterdir()} == TINY_FILES
    config = json.loads((tiny / "config.json").read_text())
    assert config == get_preset("tiny")
    assert "quantization_config" not in config
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)

    tensors = load_checkpoint(tiny)
    assert set(tensors) == expected_tiny_names()
    shapes = {
        "model.embed_tokens.weight": (1024, 256),
        "lm_head.weight": (1024, 256),
        "model.layers.0.self_attn.q_a_proj.weight": (128, 256),
        "model.layers.0.self_attn.q_b_proj.weight": (4 * 128, 128),
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (512 + 64, 256),
        "model.layers.0.self_attn.kv_a_layernorm.weight": (512,),
        "model.layers.0.self_attn.kv_b_proj.weight": (4 * (64 + 64), 512),
        "model.layers.0.self_attn.o_proj.weight": (256, 4 * 64),
        "model.layers.0.mlp.gate_proj.weight": (512, 256),
        "model.layers.0.mlp.down_proj.weight": (256, 512),
        "model.layers.2.mlp.gate.weight": (16, 256),
        "model.layers.2.mlp.gate.e_score_correction_bias": (16,),
        "model.layers.2.mlp.experts.15.up_proj.weight": (128, 256),
        "model.layers.2.mlp.experts.15.down_proj.weight": (256, 128),
        "model.layers.2.mlp.shared_experts.gate_proj.weight": (128, 256),
    }
    for name, shape in shapes.items():
        assert tuple(tensors[name].shape) == shape, name
    for name, tensor in tensors.items():
        expected = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert tensor.dtype == expected, name


def test_norms_are_near_one_and_linears_scaled(tiny: Path) -> None:
    tensors = load_checkpoint(tiny)
    norm = tensors["model.layers.1.input_layernorm.weight"].float()
    assert 0.95 < norm.mean().item() < 1.05 and 0.05 < norm.std().item() < 0.2
    down = tensors["model.layers.0.mlp.down_proj.weight"].float()
    assert down.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert 0 < bias.abs().max().item() < 0.5


def test_overrides_q_proj_and_float32(tmp_path: Path) -> None:
    out = init_checkpoint(tmp_path / "c", overrides={"q_lora_rank": None, "torch_dtype": "float32"})
    config = json.loads((out / "config.json").read_text())
    assert config["q_lora_rank"] is None and config["torch_dtype"] == "float32"
    tensors = load_checkpoint(out)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 128, 256)
    assert not [n for n in tensors if "q_a_" in n or "q_b_" in n]
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_sharded_index(tmp_path: Path) -> None:
    lines: list[str] = []
    limit = 2 << 20
    out = init_checkpoint(tmp_path / "c", max_shard_bytes=limit, progress=lines.append)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(files)
    assert count > 2 and not (out / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert len(lines) == count and all(f in line for f, line in zip(files, lines, strict=True))
    total = 0
    for file in files:
        with safe_open(str(out / file), framework="pt") as f:
            names = set(f.keys())
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]
        assert {n for n, v in index["weight_map"].items() if v == file} == names
        assert sum(sizes) <= limit or len(names) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == expected_tiny_names()


def test_random_state_dict_matches_the_files(tiny: Path) -> None:
    generated = dict(random_state_dict(get_preset("tiny"), dtype="bf16", seed=0))
    stored = load_checkpoint(tiny)
    assert generated.keys() == stored.keys()
    assert all(torch.equal(generated[n], stored[n]) for n in stored)


# --- FP8 -------------------------------------------------------------------------------------------


def test_fp8_scales_and_config(tiny_fp8: Path) -> None:
    config = json.loads((tiny_fp8 / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert config["torch_dtype"] == "bfloat16"
    tensors = load_checkpoint(tiny_fp8)
    scales = {n for n in tensors if n.endswith("_scale_inv")}
    weights = set(tensors) - scales
    assert weights == expected_tiny_names()
    router = ("mlp.gate.weight", "e_score_correction_bias")
    unquantised = {n for n in weights if "norm" in n or n.endswith(router)}
    unquantised |= {"model.embed_tokens.weight", "lm_head.weight"}
    for name in weights - unquantised:
        n, k = tensors[name].shape
        assert tensors[name].dtype == FP8, name
        scale = tensors[name + "_scale_inv"]
        assert scale.dtype == torch.float32 and scale.shape == (math.ceil(n / 128), math.ceil(k / 128)), name
    for name in unquantised:
        assert tensors[name].dtype != FP8 and name + "_scale_inv" not in tensors, name
    # 576 rows: the last row block of kv_a's scales is partial.
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)


def test_fp8_dequantises_to_the_bf16_weights(tiny: Path, tiny_fp8: Path, tmp_path: Path) -> None:
    plain = load_checkpoint(tiny)
    quantised = load_checkpoint(tiny_fp8)
    # By hand: q · scale_inv per 128×128 block reproduces the same seed's BF16 weight.
    q = quantised["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    scale = quantised["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    by_hand = torch.empty(q.shape)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            block = (slice(r * 128, (r + 1) * 128), slice(c * 128, (c + 1) * 128))
            by_hand[block] = q[block].float() * scale[r, c]
    reference = plain["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].float()
    assert torch.equal(dequantize_block(q, scale, (128, 128)), by_hand)
    assert (by_hand - reference).norm() / reference.norm() < 0.05

    out = dequantize_checkpoint(tiny_fp8, tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config == get_preset("tiny")
    assert (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    converted = load_checkpoint(out)
    assert converted.keys() == plain.keys()
    for name, reference in plain.items():
        got = converted[name]
        assert got.dtype == reference.dtype and got.shape == reference.shape, name
        if quantised[name].dtype == FP8:
            error = (got.float() - reference.float()).norm() / reference.float().norm()
            assert 0 < error < 0.05, name
        else:
            assert torch.equal(got, reference), name


def test_fp8_rejects_inputs_off_the_block(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q_lora_rank"):
        build_config("tiny", "fp8", {"q_lora_rank": 96})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        build_config("tiny", "fp8", {"moe_intermediate_size": 96})
    build_config("tiny", "bf16", {"q_lora_rank": 96, "moe_intermediate_size": 96})


# --- determinism and atomic writes -----------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights(tiny: Path, tmp_path: Path) -> None:
    again = init_checkpoint(tmp_path / "again", seed=0)
    assert file_bytes(again) == file_bytes(tiny)
    other = init_checkpoint(tmp_path / "other", seed=1)
    assert (other / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    a, b = load_checkpoint(tiny), load_checkpoint(other)
    assert all(not torch.equal(a[n], b[n]) for n in a)


def test_existing_output_is_refused_or_replaced(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        init_checkpoint(out)
    assert {p.name for p in out.iterdir()} == {"keep.txt"}
    init_checkpoint(out, overwrite=True)
    assert file_bytes(out) == file_bytes(tiny)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_failure_midway_leaves_no_checkpoint(tmp_path: Path) -> None:
    def fail(line: str) -> None:
        raise KeyboardInterrupt(line)

    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(tmp_path / "c", max_shard_bytes=2 << 20, progress=fail)
    assert list(tmp_path.iterdir()) == []


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"n_routed_experts": 18}, "n_routed_experts"),
        ({"n_group": 16}, "n_routed_experts / n_group"),
        ({"topk_group": 5}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"vocab_size": 512}, "vocab_size"),
        ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
        ({"hidden_sise": 256}, "hidden_sise"),
        ({"quantization_config": {}}, "quantization_config"),
    ],
)
def test_invalid_overrides_name_the_field(overrides: dict[str, Any], field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=field.replace("/", "\\/")):
        init_checkpoint(tmp_path / "c", overrides=overrides)
    assert list(tmp_path.iterdir()) == []


def test_valid_routing_overrides_and_bad_arguments(tmp_path: Path) -> None:
    config = build_config("tiny", "bf16", {"n_group": 1, "topk_group": 1})
    assert (config["n_group"], config["topk_group"]) == (1, 1)
    with pytest.raises(ValueError, match="preset"):
        build_config("huge", "bf16")
    with pytest.raises(ValueError, match="dtype"):
        init_checkpoint(tmp_path / "c", dtype="fp16")


# --- tokenizer -------------------------------------------------------------------------------------

TEXTS = [
    "Hello world, the sea is grey.",
    "  leading spaces\nand\ttabs, then a newline\n",
    "Ünïcödé, 漢字 and emoji 🙂 survive byte-level BPE.",
    "<｜User｜>special tokens stay whole<｜Assistant｜>",
]


def test_tokenizer_round_trips_and_adds_bos_once(tiny: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == tokenizer_files.tokenizer_vocab_size() == 1000
    for name, expected in [(tokenizer_files.BOS, 0), (tokenizer_files.EOS, 1), (tokenizer_files.USER, 3)]:
        assert tokenizer.token_to_id(name) == expected
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert ids[0] == 0 and ids.count(0) == 1, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == tokenizer_files.BOS + text
    special = tokenizer.encode(TEXTS[-1]).ids
    assert special[1] == 3 and 4 in special
    text = "The harbour was quiet before dawn."
    assert len(tokenizer.encode(text).ids) < len(text) // 2  # trained merges, not bytes


def test_tokenizer_files_are_deterministic(tmp_path: Path) -> None:
    tokenizer_files._tokenizer_json.cache_clear()
    assert tokenizer_files.write_tokenizer(tmp_path / "a") == 1000
    tokenizer_files._tokenizer_json.cache_clear()
    tokenizer_files.write_tokenizer(tmp_path / "b")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<｜begin▁of▁sentence｜>" and config["eos_token"] == "<｜end▁of▁sentence｜>"
    assert config["add_bos_token"] is True and config["tokenizer_class"] == "LlamaTokenizerFast"


def test_transformers_tokenizer_and_chat_template(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer("Hello there").input_ids
    assert ids[0] == 0 and ids.count(0) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello there"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello.<｜end▁of▁sentence｜>"
        "<｜User｜>Bye<｜Assistant｜>"
    )
    no_prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    chat_ids = tokenizer(text, add_special_tokens=False).input_ids
    assert chat_ids[0] == 0 and chat_ids.count(0) == 1 and chat_ids[-1] == 4


# --- transformers' DeepSeek-V3 loads the checkpoints -----------------------------------------------


def load_hf(path: Path) -> Any:
    """transformers' DeepseekV3ForCausalLM, asserting every checkpoint tensor found its parameter."""
    from transformers import DeepseekV3ForCausalLM

    # transformers types from_pretrained as returning the model alone.
    loaded: Any = DeepseekV3ForCausalLM.from_pretrained(str(path), output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def test_transformers_loads_tiny_and_behaves_like_a_model(tiny: Path) -> None:
    model = load_hf(tiny)
    stored = load_checkpoint(tiny)
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj[5]
    assert torch.equal(gate_up[:128], stored["model.layers.1.mlp.experts.5.gate_proj.weight"])

    rms: list[float] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda _m, _i, out: rms.append(out.float().pow(2).mean().sqrt().item()))
    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert all(0.3 < r < 10 for r in rms), rms
    assert torch.isfinite(logits).all() and 1.0 < logits.std().item() < 5.0
    assert logits.argmax(-1).unique().numel() > 24  # distinct predictions for distinct contexts

    greedy = model.generate(torch.tensor([[0, 300, 400]]), max_new_tokens=24, do_sample=False)
    assert greedy[0, 3:].unique().numel() >= 8  # no collapse onto one repeated token


def test_routing_depends_on_the_token_and_the_bias(tiny: Path) -> None:
    model = load_hf(tiny)
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        hidden = model.model.layers[1].post_attention_layernorm(model.model.embed_tokens.weight[5:1000])
        _, weights, experts = router(hidden)
        router.e_score_correction_bias.zero_()
        _, _, unbiased = router(hidden)
    assert torch.bincount(experts.flatten(), minlength=16).min() > 0  # every expert gets tokens
    assert (weights.max(-1).values / weights.min(-1).values).mean() > 1.2  # weights are not uniform
    changed = (experts.sort(-1).values != unbiased.sort(-1).values).any(-1).float().mean().item()
    assert 0.05 < changed < 0.8  # the correction bias changes some selections, not all


@pytest.mark.parametrize("overrides", [{"q_lora_rank": None}, {"n_group": 1, "topk_group": 1}])
def test_transformers_loads_variants(overrides: dict[str, Any], tmp_path: Path) -> None:
    model = load_hf(init_checkpoint(tmp_path / "c", overrides=overrides | {"num_hidden_layers": 2}))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 10, 20, 30]])).logits).all()


def test_transformers_loads_the_dequantised_fp8_checkpoint(tiny_fp8: Path, tmp_path: Path) -> None:
    model = load_hf(dequantize_checkpoint(tiny_fp8, tmp_path / "plain", torch.float32))
    assert model.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 10, 20, 30]])).logits).all()


def test_checkpoint_directory_is_readable_by_other_users(tmp_path: Path) -> None:
    """Pods read a checkpoint under their own uid: the directory keeps the umask's permissions."""
    previous = os.umask(0o022)
    try:
        out = init_checkpoint(tmp_path / "shared", preset="tiny")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755
