"""Our DeepSeek-V3 against an independent implementation: Hugging Face transformers'
DeepseekV3ForCausalLM on the same random `model init` checkpoint (DESIGN §8).

- FP32 checkpoints in several configurations: prefill logits (chunked over the paged cache) and the
  logits of 64 decode steps within 1e-4 relative error; the engine's greedy tokens identical.
- BF16: cosine similarity of prefill and decode logits.
- FP8 (e4m3 weights, activations quantised per 1×128 through the torch reference kernels) against
  transformers on the dequantised checkpoint, and against transformers running the same FP8 recipe.
- The paged cache: a scrambled block table over a cache full of stale values gives bit-identical
  logits to a contiguous table over a zeroed cache.

Our side is driven by hand (build_step over ScheduledChunks, as the runner does) where logits are
compared, and through LLMEngine.generate where greedy tokens are. The reference decodes greedily
with its own KV cache (`generate(output_logits=True)`); its tokens are fed to our decode steps, so
each step compares the logits of the same context even where a near-tie could flip a token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fireflyer.workloads.model.convert import dequantize_checkpoint
from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.model.tokenizer_files import PAD_ID
from fireflyer.workloads.serve.batch_builder import build_step
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine
from fireflyer.workloads.serve.types import BLOCK_TOKENS, SamplingParams, ScheduledChunk, Sequence
from fireflyer.workloads.threads import single_intra_op_thread

PROMPT_LEN = 100
CHUNKS = (70, 30)  # chunked prefill: the second chunk attends to the first through the paged cache
DECODE_STEPS = 64
BF16_DECODE_STEPS = 8
# Our hand-driven runs use a shuffled, non-contiguous block table (the layout test checks that this
# changes nothing; here it only keeps the comparisons from depending on block 0 being first).
BLOCK_TABLE = [5, 1, 6, 3]
NUM_BLOCKS = 8
FP32_RTOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These tensors are tiny: one intra-op thread (a decode step took 7 ms with one, 250 ms with
    two on a busy host)."""
    with single_intra_op_thread():
        yield


# --- helpers -------------------------------------------------------------------------------------


def make_prompt(seed: int) -> list[int]:
    """Ordinary tokens (no BOS/EOS/PAD), the same for a given seed."""
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(5, 1000, (PROMPT_LEN,), generator=generator).tolist()


def load_reference(path: Path, dtype: torch.dtype) -> Any:
    """transformers' DeepseekV3ForCausalLM; every checkpoint tensor must find its parameter. Its
    generation config's EOS is dropped so that generate() always runs the full length, as our
    engine does with ignore_eos."""
    from transformers import DeepseekV3ForCausalLM

    loaded: Any = DeepseekV3ForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.generation_config.eos_token_id = None
    return model.eval()


def reference_greedy(hf: Any, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy continuation and, per generated token, the fp32 logits it came from."""
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD_ID,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    assert len(tokens) == new_tokens, f"transformers stopped after {len(tokens)} of {new_tokens} tokens"
    return tokens, [step[0].float() for step in out.logits]


def reference_prefill(hf: Any, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([prompt])).logits[0].float()


class PagedRun:
    """One sequence through our model by hand: prefill chunks, then one-token decode steps, over a
    paged latent cache of NUM_BLOCKS blocks with the given block table."""

    def __init__(
        self,
        model: DeepseekV3,
        prompt: list[int],
        block_table: list[int],
        *,
        stale: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.seq = Sequence(prompt_ids=list(prompt), params=SamplingParams())
        self.seq.block_table = list(block_table)
        shape = (NUM_BLOCKS, BLOCK_TOKENS, model.config.latent_dim)
        if stale is None:
            self.caches = [torch.zeros(shape, dtype=model.dtype) for _ in model.blocks]
        else:  # what earlier sequences left behind: must never be read
            self.caches = [(10 * torch.randn(shape, generator=stale)).to(model.dtype) for _ in model.blocks]

    def _run(self, start: int, length: int) -> torch.Tensor:
        step = build_step([ScheduledChunk(self.seq, start, length)], CPU)
        with torch.inference_mode():
            hidden = self.model(step.input_ids, step.positions, self.caches, step.meta)
            return self.model.logits(hidden)

    def prefill(self, chunks: tuple[int, ...] = CHUNKS) -> torch.Tensor:
        assert sum(chunks) == self.seq.num_tokens
        starts = [sum(chunks[:i]) for i in range(len(chunks))]
        return torch.cat([self._run(s, n) for s, n in zip(starts, chunks, strict=True)])

    def decode(self, token: int) -> torch.Tensor:
        self.seq.token_ids.append(token)
        return self._run(self.seq.num_tokens - 1, 1)[0]


def ours_teacher_forced(
    model: DeepseekV3, prompt: list[int], tokens: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Our prefill logits [P, V] and the logits each of `tokens` is chosen from: the prefill's last
    row, then a decode step after feeding each token but the last (len(tokens) - 1 steps)."""
    run = PagedRun(model, prompt, BLOCK_TABLE)
    prefill = run.prefill()
    steps = [prefill[-1]] + [run.decode(t) for t in tokens[:-1]]
    return prefill, steps


def engine_greedy(model: DeepseekV3, prompt: list[int], new_tokens: int) -> list[int]:
    """Our engine's greedy tokens; a 64-token step budget prefills the prompt as 64 + 36."""
    engine = LLMEngine(
        model,
        set(model.config.eos_token_ids),
        EngineConfig(num_kv_blocks=NUM_BLOCKS, max_num_batched_tokens=64),
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    (seq,) = engine.generate([prompt], params)
    return seq.output_ids


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref).abs().max() / ref.abs().max())


def cosine(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(ours.double().flatten(), ref.double().flatten(), dim=0))


@dataclass
class Comparison:
    model: DeepseekV3
    prompt: list[int]
    ours_prefill: torch.Tensor  # [P, V]
    ref_prefill: torch.Tensor
    ours_steps: list[torch.Tensor]  # the logits of each generated token (teacher-forced)
    ref_steps: list[torch.Tensor]
    ref_tokens: list[int]


def compare(model: DeepseekV3, hf: Any, prompt: list[int], new_tokens: int) -> Comparison:
    ref_tokens, ref_steps = reference_greedy(hf, prompt, new_tokens)
    ours_prefill, ours_steps = ours_teacher_forced(model, prompt, ref_tokens)
    return Comparison(
        model, prompt, ours_prefill, reference_prefill(hf, prompt), ours_steps, ref_steps, ref_tokens
    )


# --- FP32: our model is transformers' up to rounding ---------------------------------------------

# Measured max relative errors (seed 0, prompt 0): prefill 5.4e-7 to 6.0e-7, decode steps 5.7e-7 to
# 8.6e-7 over the five configurations; all 65 greedy tokens identical in each (52-64 distinct).
FP32_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # q_lora_rank 128, 4 expert groups with topk_group 2, YaRN ×4
    "no-q-lora": {"q_lora_rank": None},  # V2-Lite style: a plain q_proj
    "one-group": {"n_group": 1, "topk_group": 1},
    "no-yarn": {"rope_scaling": None},
    "unnormalised-topk": {"norm_topk_prob": False},
}


@dataclass
class Fp32Run(Comparison):
    engine_tokens: list[int]


@pytest.fixture(scope="module", params=list(FP32_CONFIGS), ids=list(FP32_CONFIGS))
def fp32(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fp32Run:
    overrides = {"torch_dtype": "float32"} | FP32_CONFIGS[request.param]
    path = init_checkpoint(
        tmp_path_factory.mktemp(f"fp32-{request.param}") / "ckpt", seed=0, overrides=overrides
    )
    model = load_model(path)
    assert model.dtype == torch.float32
    hf = load_reference(path, torch.float32)
    prompt = make_prompt(0)
    run = compare(model, hf, prompt, DECODE_STEPS + 1)
    return Fp32Run(**vars(run), engine_tokens=engine_greedy(model, prompt, DECODE_STEPS + 1))


def test_fp32_chunked_prefill_logits(fp32: Fp32Run) -> None:
    assert fp32.ours_prefill.shape == fp32.ref_prefill.shape == (PROMPT_LEN, fp32.model.config.vocab_size)
    assert rel_err(fp32.ours_prefill, fp32.ref_prefill) <= FP32_RTOL


def test_fp32_decode_logits(fp32: Fp32Run) -> None:
    assert len(fp32.ours_steps) == len(fp32.ref_steps) == DECODE_STEPS + 1
    errors = [rel_err(o, r) for o, r in zip(fp32.ours_steps, fp32.ref_steps, strict=True)]
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] <= FP32_RTOL, f"step {worst}: relative error {errors[worst]:.2e}"


def test_fp32_greedy_tokens(fp32: Fp32Run) -> None:
    # A degenerate continuation (one token repeated) would make the comparison weak.
    assert len(set(fp32.ref_tokens)) >= 16
    assert fp32.engine_tokens == fp32.ref_tokens


# --- BF16 ----------------------------------------------------------------------------------------

# Measured, prompt 0, checkpoint seeds 0 / 1 / 2: prefill cosine 0.99998 / 0.99968 / 0.99827; the
# first 8 decode steps (and the prefill's last row) ≥ 0.99992 for all three. Hence seed 0: the
# drops come from near-tied experts that one side's BF16 rounding flips, mostly transformers' own —
# at seed 2's three worst prefill positions our BF16 is ≥ 0.9997 from transformers' FP32 while its
# BF16 is 0.92-0.97 (flattened: ours 0.9992, theirs 0.9975 from FP32). Over 64 decode steps single
# steps reach 0.975 / 0.973 (seeds 1, 2) the same way, so only the first few steps are held.
BF16_MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    path = init_checkpoint(tmp_path_factory.mktemp("bf16") / "ckpt", seed=0)
    model = load_model(path)
    assert model.dtype == torch.bfloat16
    return compare(model, load_reference(path, torch.bfloat16), make_prompt(0), BF16_DECODE_STEPS + 1)


def test_bf16_prefill_logits(bf16: Comparison) -> None:
    assert cosine(bf16.ours_prefill, bf16.ref_prefill) >= BF16_MIN_COSINE


def test_bf16_decode_logits(bf16: Comparison) -> None:
    cosines = [cosine(o, r) for o, r in zip(bf16.ours_steps, bf16.ref_steps, strict=True)]
    assert len(cosines) == BF16_DECODE_STEPS + 1
    assert min(cosines) >= BF16_MIN_COSINE, cosines


# --- FP8 -----------------------------------------------------------------------------------------

# Against transformers in fp32 on the dequantised weights (our activations BF16, quantised to e4m3
# per 1×128 before every GEMM). Measured over checkpoint seeds 0, 1, 2 × prompts 0, 1: prefill
# cosine 0.981-0.992; argmax agreeing on 74-82 % of positions (prefill and teacher-forced decode);
# transformers' argmax in our top 5 on 95-98 % of prefill positions. The top of these random models'
# logits is flat (median top-1 − top-2 margin 0.4) and a quantisation-sized nudge flips near-tied
# experts, so free-running greedy tokens part early: agreeing prefixes 0-8 tokens over those six
# runs (0 twice), too fragile to assert. This noise is the recipe's, not ours: transformers itself
# with the recipe emulated (`fp8_recipe`) is 0.984-0.990 from its fp32 self, and our FP8 model with
# fp32 activations is 0.9993-1.00000 from that emulation (same argmax on 98-100 % of positions).
FP8_MIN_COSINE = 0.97
FP8_MIN_ARGMAX_AGREEMENT = 0.65
FP8_MIN_TOP5 = 0.9
FP8_RECIPE_MIN_COSINE = 0.998


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """x through e4m3 with one scale per 1×128 group of its last dim (amax → 448), back to x's dtype."""
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // 128, 128)
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    q = (groups / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(x.shape).to(x.dtype)


@contextlib.contextmanager
def fp8_recipe(hf: Any) -> Iterator[None]:
    """transformers' model on dequantised weights made to compute like DeepSeek's FP8 inference:
    every quantised linear's input goes through e4m3 per 1×128 group and its output is rounded to
    BF16 (the GEMM's output type); the router and the LM head are not quantised."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    def quantised_experts(self: Any, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Any:
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            token, k = torch.where(ids == e)
            if token.numel():
                h = F.linear(fake_quant(hidden[token]), self.gate_up_proj[e]).bfloat16().float()
                gate, up = h.chunk(2, dim=-1)
                y = F.linear(fake_quant(F.silu(gate) * up), self.down_proj[e]).bfloat16().float()
                out.index_add_(0, token, y * weights[token, k, None])
        return out

    handles = []
    patched = []
    for module in hf.modules():
        if isinstance(module, torch.nn.Linear) and module is not hf.lm_head:
            # The pre-hook's tuple replaces the input; the hook's return value the output.
            handles.append(module.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0]),)))
            handles.append(module.register_forward_hook(lambda _m, _a, out: out.bfloat16().to(out.dtype)))
        elif isinstance(module, DeepseekV3Experts):
            module.forward = quantised_experts.__get__(module)
            patched.append(module)
    assert handles and patched
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


@dataclass
class Fp8Run(Comparison):
    recipe_prefill: torch.Tensor  # transformers with the FP8 recipe emulated
    ours_fp32_prefill: torch.Tensor  # our FP8 model with fp32 activations


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> Fp8Run:
    root = tmp_path_factory.mktemp("fp8")
    path = init_checkpoint(root / "ckpt", dtype="fp8", seed=0)
    plain = dequantize_checkpoint(path, root / "plain", torch.float32)
    model = load_model(path)
    assert model.config.fp8_weights and model.dtype == torch.bfloat16
    hf = load_reference(plain, torch.float32)
    prompt = make_prompt(0)
    run = compare(model, hf, prompt, DECODE_STEPS + 1)
    with fp8_recipe(hf):
        recipe_prefill = reference_prefill(hf, prompt)
    ours_fp32 = load_model(path, dtype=torch.float32)
    return Fp8Run(
        **vars(run),
        recipe_prefill=recipe_prefill,
        ours_fp32_prefill=PagedRun(ours_fp32, prompt, BLOCK_TABLE).prefill(),
    )


def test_fp8_prefill_logits_against_dequantised(fp8: Fp8Run) -> None:
    assert cosine(fp8.ours_prefill, fp8.ref_prefill) >= FP8_MIN_COSINE


def test_fp8_argmax_against_dequantised(fp8: Fp8Run) -> None:
    """The prefill positions and the 64 teacher-forced decode steps."""
    ours = torch.cat([fp8.ours_prefill, torch.stack(fp8.ours_steps[1:])])
    ref = torch.cat([fp8.ref_prefill, torch.stack(fp8.ref_steps[1:])])
    assert ours.shape[0] == PROMPT_LEN + DECODE_STEPS
    best = ref.argmax(-1, keepdim=True)
    assert float((ours.argmax(-1, keepdim=True) == best).float().mean()) >= FP8_MIN_ARGMAX_AGREEMENT
    assert float((ours.topk(5, -1).indices == best).any(-1).float().mean()) >= FP8_MIN_TOP5


def test_fp8_matches_the_recipe_on_transformers(fp8: Fp8Run) -> None:
    """Tight: a missing or misplaced activation quantisation (or scale) costs far more than the
    0.002 allowed, since plain fp32 is itself only 0.984-0.990 from the recipe. Prefill only: the
    absorbed decode multiplies the unquantised latent by the dequantised kv_b_proj (as DeepSeek's own
    inference does), where the recipe's expanded form quantises the latent first."""
    assert cosine(fp8.ours_fp32_prefill, fp8.recipe_prefill) >= FP8_RECIPE_MIN_COSINE
    assert cosine(fp8.ref_prefill, fp8.recipe_prefill) < FP8_RECIPE_MIN_COSINE  # the recipe matters


# --- the paged cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_block_table_layout_does_not_change_logits(name: str, request: pytest.FixtureRequest) -> None:
    """Prefill in two chunks and decode across a block boundary (positions 0..139, three blocks),
    once over blocks [0, 1, 2] of a zeroed cache and once over shuffled, non-adjacent blocks of a
    cache full of stale values: every logit identical, bit for bit."""
    model: DeepseekV3 = request.getfixturevalue(name).model
    prompt = make_prompt(1)
    contiguous = PagedRun(model, prompt, [0, 1, 2])
    scrambled = PagedRun(model, prompt, [6, 2, 4], stale=torch.Generator().manual_seed(0))
    first, second = contiguous.prefill(), scrambled.prefill()
    assert torch.equal(first, second)
    token = int(first[-1].argmax())
    for step in range(40):
        a, b = contiguous.decode(token), scrambled.decode(token)
        assert torch.equal(a, b), f"decode step {step}"
        token = int(a.argmax())
    assert contiguous.seq.num_tokens > 2 * BLOCK_TOKENS
