"""The serving engine against Hugging Face transformers' DeepSeek-V3 on the same weights
(dequantised to BF16, as transformers runs them), one after the other in one process: tokens/s of
each over the same prompts. Part of `bench.serve.bench_serve` (its `transformers` row)."""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from bench.serve.bench_serve import build_model
from fireflyer.kernels import fp8
from fireflyer.workloads.model.init import random_state_dict
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.types import SamplingParams


def hf_reference(raw: dict[str, Any], seed: int, device: str = "cuda") -> Any:
    """transformers' DeepseekV3ForCausalLM holding the same weights, dequantised to BF16."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    plain = {k: v for k, v in raw.items() if k != "quantization_config"}
    config = DeepseekV3Config(**plain)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in BF16 directly: FP32 experts would not fit
    try:
        with torch.device(device):
            hf = DeepseekV3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    params = dict(hf.named_parameters())
    buffers = dict(hf.named_buffers())
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in random_state_dict(raw, dtype="fp8", seed=seed, device=device):
        pending[name] = tensor
        base = name.removesuffix("_scale_inv")
        weight, scale = pending.get(base), pending.get(base + "_scale_inv")
        if weight is None or (weight.dtype == fp8.FP8 and scale is None):
            continue
        pending.pop(base)
        pending.pop(base + "_scale_inv", None)
        value = fp8.dequantize_per_block(weight, scale) if weight.dtype == fp8.FP8 else weight
        _assign_hf(params, buffers, base, value.to(torch.bfloat16), raw)
    return hf


def _assign_hf(
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    name: str,
    value: torch.Tensor,
    raw: dict[str, Any],
) -> None:
    parts = name.split(".")
    if (
        ".mlp.experts." in name
    ):  # transformers keeps routed experts stacked: gate_up [E, 2I, H], down [E, H, I]
        layer, expert, proj = parts[2], int(parts[5]), parts[6]
        prefix = f"model.layers.{layer}.mlp.experts."
        inter = raw["moe_intermediate_size"]
        if proj == "down_proj":
            params[prefix + "down_proj"].data[expert].copy_(value)
        else:
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
            params[prefix + "gate_up_proj"].data[expert, rows].copy_(value)
        return
    target = params.get(name) if name in params else buffers.get(name)
    if target is None:
        raise KeyError(f"transformers' model has no {name}")
    target.data.copy_(value.to(target.dtype))


def bench_vs_transformers(
    layers: int, seed: int, prompts: int, prompt_len: int, new: int, profile: bool = False
) -> dict[str, Any]:
    """Both engines on the same weights, one after the other (both at once do not fit)."""
    model, raw = build_model(layers, seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (prompts, prompt_len), generator=g)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine = LLMEngine(
        model,
        set(),
        EngineConfig(
            num_kv_blocks=prompts * (-(-(prompt_len + new) // 64)) + 64,
            max_num_seqs=prompts,
            max_num_batched_tokens=8192,
            cuda_graph_max_batch=prompts,
        ),
    )
    # Warm on other prompts of the same shape: Triton compiles and tunes each GEMM shape once, and
    # the timed prompts find nothing in the prefix cache.
    engine.generate(torch.randint(0, vocab, (prompts, prompt_len), generator=g).tolist(), params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(ids.tolist(), params)
    torch.cuda.synchronize()
    ours = time.perf_counter() - start
    if profile:  # where the host time of the engine goes
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        engine.generate(ids.tolist(), params)
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    hf = hf_reference(raw, seed)
    with torch.no_grad():
        hf.generate(
            ids[:2, :64].cuda(),
            attention_mask=torch.ones_like(ids[:2, :64]).cuda(),
            max_new_tokens=2,
            do_sample=False,
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf.generate(
            ids.cuda(),
            attention_mask=torch.ones_like(ids).cuda(),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
        torch.cuda.synchronize()
        theirs = time.perf_counter() - start
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    generated = prompts * new
    return {
        "prompts": prompts,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "ours_tokens_per_s": generated / ours,
        "transformers_tokens_per_s": generated / theirs,
        "speedup": theirs / ours,
    }
