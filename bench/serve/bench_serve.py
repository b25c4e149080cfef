"""The serving engine on one GPU, against peers measured in the same run.

A model of real DeepSeek-V3 widths with few layers (default 1 dense + 3 MoE, 256 experts, FP8
random weights), built in memory:
- decode at batch B, context C: step time against its memory roofline (weights read + KV read at
  the HBM rate a device copy reaches in this run), with and without CUDA graphs;
- decode over lengths log-uniform in 256-32K (graphed): uniform KV splits against length-balanced
  MLA runs;
- prefill of N × L tokens: the GEMM rate inside the model against the same GEMM shapes alone;
- tokens/s of the engine against Hugging Face transformers' DeepSeek-V3 on the same weights
  (dequantised to BF16, as transformers runs them) in the same process.

    python -m bench.serve.bench_serve [--layers 4] [--decode-batch 128] [--context 4096] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from typing import Any

import torch

from fireflyer.kernels import fp8
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.model.init import build_config, random_state_dict
from fireflyer.workloads.model.loader import load_tensors
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.serve.eplb_load import LoadWindow
from fireflyer.workloads.serve.runner import ModelRunner
from fireflyer.workloads.serve.types import SamplingParams, ScheduledChunk, SchedulerOutput, Sequence


def timed(fn: Any, iters: int, warmup: int = 2) -> float:
    """Mean seconds per call, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def copy_rate() -> float:
    """Bytes read + written per second by a 4 GiB device copy."""
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 10)
    return 2 * (4 << 30) / seconds


def build_model(layers: int, seed: int) -> tuple[DeepseekV3, dict[str, Any]]:
    raw = build_config("v3", "fp8", {"num_hidden_layers": layers, "first_k_dense_replace": 1})
    config = ModelConfig.from_dict(raw)
    with torch.device("cuda"):
        model = DeepseekV3(config, device="cuda")
    load_tensors(model, random_state_dict(raw, dtype="fp8", seed=seed, device="cuda"))
    model.prepare()
    return model, raw


def weight_bytes(model: DeepseekV3) -> int:
    """What one decode step reads: every weight but the embedding table (only rows are read)."""
    return sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_tokens")
    )


def blocks_for(context: int) -> int:
    """KV blocks of a sequence of `context` tokens with room to grow by one block."""
    return -(-(context + 64) // 64)


def fake_sequences(runner: ModelRunner, contexts: list[int], vocab: int) -> list[Sequence]:
    """One sequence per entry of `contexts`, whose first that many tokens are already in the cache
    (random latents)."""
    blocks = [blocks_for(n) for n in contexts]
    if sum(blocks) > runner.num_blocks - 1:
        raise ValueError("not enough KV blocks for the decode batch")
    seqs = []
    first = 0
    for n, blocks_each in zip(contexts, blocks, strict=True):
        ids = torch.randint(0, vocab, (n + 1,)).tolist()
        seq = Sequence(
            prompt_ids=ids, params=SamplingParams(max_tokens=1 << 20, temperature=0, ignore_eos=True)
        )
        seq.block_table = list(range(first, first + blocks_each))
        seq.num_computed_tokens = n
        seqs.append(seq)
        first += blocks_each
    for cache in runner.caches:
        cache.normal_(0, 0.5)
    return seqs


def bench_decode(
    model: DeepseekV3,
    batch: int,
    context: int | list[int],
    graphs: bool,
    hbm: float,
    count_load: bool = False,
    balance: bool = True,
) -> dict[str, Any]:
    """With `count_load`, the engine's expert load window counts every MoE layer (inside the
    graphs) and is ticked at every step boundary, as the engine does: its cost is what EPLB and the
    per-GPU expert metrics add to a decode step. `context`: one length for all, or one each;
    `balance` off: uniform KV splits whatever the lengths."""
    contexts = context if isinstance(context, list) else [context] * batch
    blocks = sum(blocks_for(n) for n in contexts) + 2
    window = LoadWindow.for_model(model, publish_seconds=0.0) if count_load else None
    runner = ModelRunner(model, blocks, cuda_graph_max_batch=batch if graphs else 0, balance_decode=balance)
    seqs = fake_sequences(runner, contexts, model.config.vocab_size)

    def step() -> None:
        out = SchedulerOutput([ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs])
        sampled = runner.step(out)
        for s in seqs:  # grow by one token; stay inside the reserved blocks
            s.token_ids.append(sampled[s.request_id])
            s.num_computed_tokens += 1
        if window is not None:
            window.tick()

    seconds = timed(step, 20, warmup=3)
    if window is not None:
        window.detach()
    kv = sum(s.num_tokens for s in seqs) * model.config.latent_dim * 2 * model.config.num_hidden_layers
    weights = weight_bytes(model)
    roofline = (weights + kv) / hbm
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "batch": batch,
        "context": context if isinstance(context, int) else f"{min(contexts)}-{max(contexts)}",
        "cuda_graphs": graphs,
        "balanced_decode": balance,
        "counting_expert_load": count_load,
        "step_ms": seconds * 1e3,
        "weights_gb": weights / 1e9,
        "kv_gb": kv / 1e9,
        "roofline_ms": roofline * 1e3,
        "step_over_roofline": seconds / roofline,
        "tokens_per_s": batch / seconds,
    }


def mixed_contexts(batch: int, seed: int = 0) -> list[int]:
    """Decode lengths log-uniform in [256, 32K]: a batch of conversations of every age."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.empty(batch).uniform_(math.log(256), math.log(32768), generator=g).exp()
    return [int(n) for n in spread]


def model_gemm_flops(model: DeepseekV3, tokens: int, per_seq: int) -> float:
    """FP8 GEMM FLOPs of one prefill of `tokens` (sequences of `per_seq`): projections, dense MLP,
    routed (top-k) and shared experts, kv_b over every key. Attention's QK/PV are not GEMMs here."""
    c = model.config
    h, heads = c.hidden_size, c.num_attention_heads
    per_token = (
        h * c.latent_dim
        + (
            h * c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim
            if c.q_lora_rank
            else h * heads * c.qk_head_dim
        )
        + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)
        + heads * c.v_head_dim * h
    ) * c.num_hidden_layers
    for layer in range(c.num_hidden_layers):
        if c.is_moe_layer(layer):
            per_token += 3 * h * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
        else:
            per_token += 3 * h * c.intermediate_size
    return 2.0 * per_token * tokens


def _time_linear(q: torch.Tensor, s: torch.Tensor, lin: Any) -> float:
    return timed(lambda: fp8.gemm_fp8(q, s, lin.weight, lin.weight_scale_inv), 3)


def gemms_alone(model: DeepseekV3, tokens: int) -> float:
    """Seconds for the prefill's GEMM shapes run alone through the same kernels (activations
    quantised beforehand, routing uniform over experts)."""
    c = model.config
    block = model.blocks[1] if len(model.blocks) > 1 else model.blocks[0]
    attn = block.self_attn
    linears = [attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj]
    linears += [attn.q_a_proj, attn.q_b_proj] if c.q_lora_rank else [attn.q_proj]
    calls = []
    for lin in linears:
        a = torch.randn(tokens, lin.in_features, device="cuda", dtype=torch.bfloat16)
        q, s = fp8.quantize_per_token_group(a)
        assert lin.weight_scale_inv is not None
        calls.append(lambda q=q, s=s, lin=lin: fp8.gemm_fp8(q, s, lin.weight, lin.weight_scale_inv))
    moe = block.mlp
    experts = getattr(moe, "experts", None)
    total = 0.0
    for call in calls:
        total += timed(call, 5) * c.num_hidden_layers
    if experts is not None:
        rows = tokens * c.num_experts_per_tok
        per = -(-rows // len(experts.experts) // 128) * 128
        m = per * len(experts.experts)
        m_indices = torch.arange(len(experts.experts), device="cuda").repeat_interleave(per)
        a = torch.randn(m, c.hidden_size, device="cuda", dtype=torch.bfloat16)
        q, s = fp8.quantize_per_token_group(a)
        up = timed(
            lambda: fp8.grouped_gemm_fp8_contiguous(q, s, experts.w13, experts.w13_scale, m_indices), 3
        )
        a2 = torch.randn(m, c.moe_intermediate_size, device="cuda", dtype=torch.bfloat16)
        q2, s2 = fp8.quantize_per_token_group(a2)
        down = timed(
            lambda: fp8.grouped_gemm_fp8_contiguous(q2, s2, experts.w2, experts.w2_scale, m_indices), 3
        )
        moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        total += (up + down) * moe_layers * (rows / m)
        shared = moe.shared_experts
        dense = [shared.gate_proj, shared.up_proj, shared.down_proj] if shared is not None else []
        for lin in dense:
            a = torch.randn(tokens, lin.in_features, device="cuda", dtype=torch.bfloat16)
            q, s = fp8.quantize_per_token_group(a)
            total += (
                timed(lambda q=q, s=s, lin=lin: fp8.gemm_fp8(q, s, lin.weight, lin.weight_scale_inv), 3)
                * moe_layers
            )
    dense_mlp = model.blocks[0].mlp
    if not hasattr(dense_mlp, "experts"):
        for lin in (dense_mlp.gate_proj, dense_mlp.up_proj, dense_mlp.down_proj):
            a = torch.randn(tokens, lin.in_features, device="cuda", dtype=torch.bfloat16)
            q, s = fp8.quantize_per_token_group(a)
            dense_layers = sum(not c.is_moe_layer(i) for i in range(c.num_hidden_layers))
            total += (
                timed(lambda q=q, s=s, lin=lin: fp8.gemm_fp8(q, s, lin.weight, lin.weight_scale_inv), 3)
                * dense_layers
            )
    return total


def bench_prefill(model: DeepseekV3, seqs: int, length: int) -> dict[str, Any]:
    tokens = seqs * length
    blocks = seqs * (-(-length // 64)) + 2
    runner = ModelRunner(model, blocks)
    vocab = model.config.vocab_size
    batch = []
    for i in range(seqs):
        seq = Sequence(
            prompt_ids=torch.randint(0, vocab, (length,)).tolist(), params=SamplingParams(temperature=0)
        )
        seq.block_table = list(range(i * (length // 64), (i + 1) * (length // 64)))
        batch.append(seq)
    out = SchedulerOutput([ScheduledChunk(s, 0, length) for s in batch])
    seconds = timed(lambda: runner.step(out), 3, warmup=2)
    flops = model_gemm_flops(model, tokens, length)
    alone = gemms_alone(model, tokens)
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "sequences": seqs,
        "length": length,
        "step_ms": seconds * 1e3,
        "gemm_tflops_in_model": flops / seconds / 1e12,
        "gemm_tflops_alone": flops / alone / 1e12,
        "in_model_over_alone": alone / seconds,
        "tokens_per_s": tokens / seconds,
    }


def profile_steps(model: DeepseekV3, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    blocks = (
        max(args.decode_batch * blocks_for(args.context), args.prefill_seqs * (args.prefill_len // 64)) + 2
    )
    runner = ModelRunner(model, blocks)
    seqs = fake_sequences(runner, [args.context] * args.decode_batch, model.config.vocab_size)
    decode = SchedulerOutput([ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs])
    prefill_seqs = []
    for i in range(args.prefill_seqs):
        seq = Sequence(
            prompt_ids=torch.randint(0, 1000, (args.prefill_len,)).tolist(),
            params=SamplingParams(temperature=0),
        )
        seq.block_table = list(range(i * (args.prefill_len // 64), (i + 1) * (args.prefill_len // 64)))
        prefill_seqs.append(seq)
    prefill = SchedulerOutput([ScheduledChunk(s, 0, args.prefill_len) for s in prefill_seqs])
    for name, out in (("decode", decode), ("prefill", prefill)):
        runner.step(out)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.step(out)
            torch.cuda.synchronize()
        print(f"--- {name} step: top by device time", flush=True)
        print(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60),
            flush=True,
        )
        print(f"--- {name} step: top by host time", flush=True)
        print(
            prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--decode-batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill-seqs", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--mixed-batch", type=int, default=64, help="decode batch of lengths 256-32K")
    parser.add_argument("--skip", default="", help="comma-separated: decode,eager,mixed,prefill,transformers")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one step of each")
    parser.add_argument(
        "--metrics-overhead",
        action="store_true",
        help="graphed decode with and without the expert load window (its counting and a tick per step)",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def record(key: str, value: Any) -> None:
        results[key] = value
        print(key, json.dumps(value), flush=True)
        if args.json:  # after every figure, so a later failure keeps the earlier ones
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)

    hbm = copy_rate()
    record("hbm_copy_tb_s", hbm / 1e12)
    if {"decode", "prefill"} - skip:
        model, _ = build_model(args.layers, seed=0)
        record("weights_gb", weight_bytes(model) / 1e9)
        if "decode" not in skip:
            for graphs in (True, False) if "eager" not in skip else (True,):
                key = "decode_graphs" if graphs else "decode_eager"
                record(key, bench_decode(model, args.decode_batch, args.context, graphs, hbm))
        if "mixed" not in skip:  # unequal lengths: uniform KV splits against balanced runs
            contexts = mixed_contexts(args.mixed_batch)
            for balance in (False, True):
                key = "decode_mixed_balanced" if balance else "decode_mixed_uniform"
                record(key, bench_decode(model, args.mixed_batch, contexts, True, hbm, balance=balance))
        if args.metrics_overhead:
            plain = bench_decode(model, args.decode_batch, args.context, True, hbm)
            counted = bench_decode(model, args.decode_batch, args.context, True, hbm, count_load=True)
            record(
                "expert_load_counting_overhead",
                {
                    "step_ms_without": plain["step_ms"],
                    "step_ms_with": counted["step_ms"],
                    "overhead": counted["step_ms"] / plain["step_ms"] - 1,
                },
            )
        if "prefill" not in skip:
            record("prefill", bench_prefill(model, args.prefill_seqs, args.prefill_len))
        if args.profile:
            profile_steps(model, args)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if "transformers" not in skip:
        from bench.serve.bench_transformers import bench_vs_transformers

        record(
            "vs_transformers",
            bench_vs_transformers(args.layers, 0, prompts=32, prompt_len=256, new=32, profile=args.profile),
        )


if __name__ == "__main__":
    main()
