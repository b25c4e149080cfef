"""`fireflyer train` on one GPU: tokens/s and MFU for a model of DeepSeek-V3 widths with few layers,
against the same model stepped by a plain torch loop in the same run; then the resume: time from
process start to the first step after a restart (against a fresh start: the difference is the
checkpoint load) and the checkpoint load rate against the disk's raw read rate on the same files.

Usage: python bench/train/bench_trainer.py [--layers 2] [--experts 8] [--seq-len 4096]
           [--micro-batches 2] [--steps 6] [--workdir DIR] [--json FILE]

The model: hidden 7168, 128 MLA heads, MoE intermediate 2048, top-8, the first layer dense
(intermediate 18432), V3's vocabulary (129280), `--experts` routed experts (256 in V3; fewer, so
that the FP32 weights and AdamW state fit one GPU; two checkpoints of 2 layers with 8 experts (FP32 weights
and both AdamW moments, about 34 GB each) need more disk than a 64 GiB GPU host has: run the resume
part where they fit).
FLOPs per token = 6 × activated parameters (every non-expert weight, the shared expert and top-k
routed experts) + causal attention
3 · layers · heads · (192 + 128) · seq_len; MFU against 989 TFLOPS (H100/H200 dense BF16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fireflyer.workloads.model.init import build_config, init_checkpoint
from fireflyer.workloads.train.data import write_shards

PEAK_BF16_FLOPS = 989e12


def activated_parameters(config: dict[str, Any]) -> float:
    """Parameters a token passes through (embedding lookup excluded, output head included)."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    q = (
        h * config["q_lora_rank"] + config["q_lora_rank"] * heads * qk
        if config.get("q_lora_rank")
        else h * heads * qk
    )
    kv = h * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) + config["kv_lora_rank"] * heads * (
        config["qk_nope_head_dim"] + config["v_head_dim"]
    )
    attention = q + kv + heads * config["v_head_dim"] * h
    dense_mlp = 3 * h * config["intermediate_size"]
    expert = 3 * h * config["moe_intermediate_size"]
    moe_mlp = (
        expert * (config["num_experts_per_tok"] + config["n_shared_experts"]) + h * config["n_routed_experts"]
    )
    layers = config["num_hidden_layers"]
    dense = config["first_k_dense_replace"]
    return layers * attention + dense * dense_mlp + (layers - dense) * moe_mlp + h * config["vocab_size"]


def flops_per_token(config: dict[str, Any], seq_len: int) -> float:
    attention = (
        3
        * config["num_hidden_layers"]
        * config["num_attention_heads"]
        * (config["qk_nope_head_dim"] + config["qk_rope_head_dim"] + config["v_head_dim"])
        * seq_len
    )
    return 6 * activated_parameters(config) + attention


def run_trainer(
    model: Path, data: Path, ckpt: Path, log: Path, args: argparse.Namespace, steps: int
) -> float:
    """Runs `fireflyer train`; returns the seconds from process start to its first logged step."""
    log.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "fireflyer.workloads.train",
        "--model", str(model), "--data", str(data), "--steps", str(steps),
        "--micro-batches", str(args.micro_batches), "--seq-len", str(args.seq_len),
        "--log-jsonl", str(log), "--device", "cuda",
    ]  # fmt: skip
    if not args.skip_resume:
        command += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", str(args.steps), "--keep", "1"]
    started = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    output = []
    while proc.poll() is None:
        if first_step is None and log.exists() and log.read_text().strip():
            first_step = time.time() - started
        time.sleep(0.05)
    assert proc.stdout is not None
    output.append(proc.stdout.read())
    if proc.returncode:
        raise SystemExit(f"fireflyer train failed:\n{''.join(output)[-4000:]}")
    print("".join(output)[-1500:], flush=True)
    return first_step or float("nan")


def peer_loop(model_dir: Path, data: np.ndarray, args: argparse.Namespace) -> list[float]:
    """The same model stepped by a plain loop: autocast BF16 forward, cross-entropy, backward, fused
    AdamW on FP32 weights; no data loader, clipping, balancing, logging or checkpoints."""
    from fireflyer.workloads.model.loader import load_model
    from fireflyer.workloads.train.forward import losses
    from fireflyer.workloads.train.optim import trainable_parameters

    model = load_model(model_dir, device=torch.device("cuda"), dtype=torch.float32)
    params = [p for _, p in trainable_parameters(model)]  # the trainer's set of trained weights
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    window = torch.from_numpy(data[: args.seq_len + 1].astype(np.int64)).cuda()[None]
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.micro_batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = losses(model, window).total
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del model, optimizer
    torch.cuda.empty_cache()
    return times


def raw_read_rate(directory: Path) -> tuple[float, int]:
    """Bytes per second reading every file under `directory` with plain 16 MiB reads."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    total = 0
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start), total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workdir")
    parser.add_argument("--skip-resume", action="store_true", help="no checkpoints: throughput only")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trainer-"))
    overrides = {
        "num_hidden_layers": args.layers,
        "first_k_dense_replace": 1,
        "n_routed_experts": args.experts,
    }
    overrides["n_group"] = min(8, args.experts // 4)
    overrides["topk_group"] = min(4, overrides["n_group"])
    config = build_config("v3", "bf16", overrides)
    model = work / "model"
    if not (model / "config.json").exists():
        init_checkpoint(model, preset="v3", dtype="bf16", overrides=overrides, device="cuda", overwrite=True)
    tokens = np.random.default_rng(0).integers(
        0, config["vocab_size"], size=(args.steps + 2) * 4 * (args.seq_len + 1)
    )
    data = work / "data"
    if not (data / "index.json").exists():
        write_shards([tokens], data)
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)

    peer = peer_loop(model, tokens, args)
    ckpt, log = work / "ckpt", work / "log.jsonl"
    fresh_first_step = run_trainer(model, data, ckpt, log, args, args.steps)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    ours = [r["seconds"] for r in records[1:]]  # the first step compiles and warms up
    step_tokens = args.micro_batches * args.seq_len
    per_token = flops_per_token(config, args.seq_len)

    result: dict[str, Any] = {
        "device": props.name,
        "config": {
            k: config[k] for k in ("hidden_size", "num_hidden_layers", "n_routed_experts", "vocab_size")
        },
        "seq_len": args.seq_len,
        "step_tokens": step_tokens,
        "activated_parameters": activated_parameters(config),
        "trainer_step_s": statistics.median(ours),
        "peer_step_s": statistics.median(peer[1:]),
        "trainer_tokens_per_s": step_tokens / statistics.median(ours),
        "peer_tokens_per_s": step_tokens / statistics.median(peer[1:]),
        "trainer_mfu": step_tokens * per_token / statistics.median(ours) / PEAK_BF16_FLOPS,
        "peer_mfu": step_tokens * per_token / statistics.median(peer[1:]) / PEAK_BF16_FLOPS,
        "fresh_start_to_first_step_s": fresh_first_step,
    }
    if not args.skip_resume:
        read_rate, ckpt_bytes = raw_read_rate(ckpt)
        resume_first_step = run_trainer(model, data, ckpt, log, args, args.steps + 1)
        resumed = json.loads(log.read_text().splitlines()[-1])
        result |= {
            "checkpoint_bytes": ckpt_bytes,
            "raw_read_GBps": read_rate / 1e9,
            "resume_start_to_first_step_s": resume_first_step,
            # The resumed start differs from the fresh one by the checkpoint load (same model load,
            # same warm-up), so its rate is the checkpoint's bytes over that difference.
            "checkpoint_load_GBps": ckpt_bytes / max(resume_first_step - fresh_first_step, 1e-9) / 1e9,
            "resume_first_step_seconds": resumed["seconds"],
            "resumed_step": resumed["step"],
        }
    for key, value in result.items():
        print(f"{key}: {value}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.workdir:
        os.system(f"rm -rf {work}")


if __name__ == "__main__":
    main()
