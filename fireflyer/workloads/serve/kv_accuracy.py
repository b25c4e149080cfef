"""How far a KV cache dtype moves the model's output from the BF16 cache: greedy continuations
compared token by token, and the logits of the same tokens teacher-forced through both caches
(prefill, then one decode step per token: the decode attention reads the cache under test).

    python -m fireflyer.workloads.serve.kv_accuracy --prompts 16 --max-tokens 32

builds the tiny preset checkpoint (seeded) unless --model names one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.serve.batch_builder import build_step
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.runner import ModelRunner
from fireflyer.workloads.serve.types import BLOCK_TOKENS, SamplingParams, ScheduledChunk, Sequence


@dataclass(frozen=True)
class CacheAccuracy:
    prompts: int
    generated_tokens: int  # per prompt, greedy
    identical_sequences: int  # greedy continuations equal to the BF16 cache's
    token_agreement: float  # greedy tokens equal to the BF16 cache's, before the first difference too
    forced_argmax_agreement: float  # teacher-forced: the same next-token argmax
    logits_max_error: float  # teacher-forced: max |Δlogit| over every position and vocabulary entry
    logits_rms_error: float
    logits_rms: float  # the BF16 cache's logits RMS, for scale


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 120, (n,), generator=g).tolist()
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in lengths]


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits [len(tokens) - prompt_len + 1, vocab]: after the prompt's prefill, then after each
    further token, decoded one at a time from the runner's cache."""
    model = runner.model
    seq = Sequence(prompt_ids=tokens[:prompt_len], params=SamplingParams(temperature=0))
    seq.block_table = list(range(-(-len(tokens) // BLOCK_TOKENS)))
    rows = []
    chunk = ScheduledChunk(seq, 0, prompt_len)
    for token in [None, *tokens[prompt_len:]]:
        if token is not None:
            seq.token_ids.append(token)
            chunk = ScheduledChunk(seq, seq.num_tokens - 1, 1)
        inputs = build_step([chunk], runner.device)
        hidden = model(inputs.input_ids, inputs.positions, runner.caches, inputs.meta)
        rows.append(model.logits(hidden[inputs.sample_rows]).float())
    return torch.cat(rows)


def compare(
    model: DeepseekV3, kv_cache_dtype: str, prompts: list[list[int]], max_tokens: int
) -> CacheAccuracy:
    """`kv_cache_dtype` against the BF16 cache on `prompts` (greedy, `max_tokens` each)."""
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    blocks = sum(-(-(len(p) + max_tokens) // BLOCK_TOKENS) for p in prompts) + 1
    outputs = {}
    for dtype in ("bf16", kv_cache_dtype):
        engine = LLMEngine(
            model, set(), EngineConfig(num_kv_blocks=blocks, kv_cache_dtype=dtype, warmup=False)
        )
        outputs[dtype] = [seq.token_ids[len(seq.prompt_ids) :] for seq in engine.generate(prompts, greedy)]
        engine.close()
    agree = sum(
        a == b
        for ref, got in zip(outputs["bf16"], outputs[kv_cache_dtype], strict=True)
        for a, b in zip(ref, got, strict=True)
    )
    identical = sum(ref == got for ref, got in zip(outputs["bf16"], outputs[kv_cache_dtype], strict=True))
    per_seq = max(-(-(len(p) + max_tokens) // BLOCK_TOKENS) for p in prompts)
    runners = {d: ModelRunner(model, per_seq, kv_cache_dtype=d) for d in ("bf16", kv_cache_dtype)}
    errors, argmax_same, positions, square_ref = [], 0, 0, 0.0
    for prompt, continuation in zip(prompts, outputs["bf16"], strict=True):
        tokens = prompt + continuation[:-1]
        ref = teacher_forced_logits(runners["bf16"], tokens, len(prompt))
        got = teacher_forced_logits(runners[kv_cache_dtype], tokens, len(prompt))
        errors.append((got - ref).flatten())
        argmax_same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        positions += ref.shape[0]
        square_ref += float((ref * ref).sum())
    error = torch.cat(errors)
    return CacheAccuracy(
        prompts=len(prompts),
        generated_tokens=max_tokens,
        identical_sequences=identical,
        token_agreement=agree / (len(prompts) * max_tokens),
        forced_argmax_agreement=argmax_same / positions,
        logits_max_error=float(error.abs().max()),
        logits_rms_error=float(error.pow(2).mean().sqrt()),
        logits_rms=(square_ref / error.numel()) ** 0.5,
    )


def main(argv: list[str] | None = None) -> None:
    from fireflyer.workloads.model.init import init_checkpoint
    from fireflyer.workloads.model.loader import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the tiny preset)")
    parser.add_argument("--kv-cache-dtype", default="fp8", choices=("auto", "bf16", "fp8"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = (
            Path(args.model)
            if args.model
            else init_checkpoint(Path(scratch) / "tiny", preset="tiny", seed=args.seed)
        )
        model = load_model(path)
        prompts = random_prompts(args.prompts, model.config.vocab_size, seed=args.seed)
        print(json.dumps(asdict(compare(model, args.kv_cache_dtype, prompts, args.max_tokens)), indent=2))


if __name__ == "__main__":
    main()
