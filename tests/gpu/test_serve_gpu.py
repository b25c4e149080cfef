"""The model and the engine on a CUDA device (Triton MLA decode and FP8 GEMMs, CUDA graphs)
against the CPU torch path on the same checkpoint (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels.backend import Backend, gluon_unavailable, has_module  # noqa: E402
from fireflyer.kernels.fp8 import calc_diff  # noqa: E402
from fireflyer.workloads.model.init import init_checkpoint  # noqa: E402
from fireflyer.workloads.model.loader import load_model  # noqa: E402
from fireflyer.workloads.model.model import Backends  # noqa: E402
from fireflyer.workloads.serve.batch_builder import StepInputs, build_step  # noqa: E402
from fireflyer.workloads.serve.engine import EngineConfig, LLMEngine  # noqa: E402
from fireflyer.workloads.serve.types import SamplingParams, ScheduledChunk, Sequence  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not has_module("triton"), reason="needs CUDA and Triton"
    ),
]


@pytest.fixture(scope="module", params=["bf16", "fp8"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(
        tmp_path_factory.mktemp(request.param) / "tiny", preset="tiny", dtype=request.param
    )


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 300, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]


def _last_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of each prompt's next token, from one prefill step over the engine's cache."""
    runner = engine.runner
    rows = []
    for i, prompt in enumerate(prompts):
        seq = Sequence(prompt_ids=prompt, params=SamplingParams(temperature=0))
        seq.block_table = list(range(i * 8, i * 8 + -(-len(prompt) // 64)))
        step = build_step([ScheduledChunk(seq, 0, len(prompt))], runner.device)
        with torch.inference_mode():
            hidden = runner.model(step.input_ids, step.positions, runner.caches, step.meta)
            rows.append(runner.model.logits(hidden[step.sample_rows])[0].float().cpu())
    return torch.stack(rows)


def test_gpu_logits_match_cpu(checkpoint: Path) -> None:
    prompts = _prompts(4, 900)
    gpu = LLMEngine(load_model(checkpoint, device="cuda"), set(), EngineConfig(num_kv_blocks=64))
    cpu = LLMEngine(
        load_model(checkpoint, device="cpu", dtype=torch.float32), set(), EngineConfig(num_kv_blocks=64)
    )
    diff = calc_diff(_last_logits(gpu, prompts), _last_logits(cpu, prompts))
    # FP8 activations are quantised from BF16 on the GPU and from FP32 on the CPU.
    assert diff < (6e-3 if "fp8" in str(checkpoint) else 1e-3), diff


@pytest.mark.parametrize("gemm", ["cublas", "gluon", "triton"])
def test_each_fp8_gemm_backend_serves_the_cpu_logits(checkpoint: Path, gemm: str) -> None:
    """The tiny model's linears are one to four 128-wide blocks deep in K: shapes unlike
    DeepSeek-V3's, where cuBLAS block-wise scaling once went wrong while the V3 shapes passed."""
    if "fp8" not in str(checkpoint):
        pytest.skip("BF16 weights take no FP8 GEMM")
    if gemm == "gluon" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper")
    prompts = _prompts(4, 900)
    model = load_model(checkpoint, device="cuda", backends=Backends(gemm=gemm))  # type: ignore[arg-type]
    gpu = LLMEngine(model, set(), EngineConfig(num_kv_blocks=64, cuda_graph_max_batch=0))
    cpu = LLMEngine(
        load_model(checkpoint, device="cpu", dtype=torch.float32), set(), EngineConfig(num_kv_blocks=64)
    )
    assert calc_diff(_last_logits(gpu, prompts), _last_logits(cpu, prompts)) < 6e-3


def _spy_on_sampled_logits(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """The logits each request's tokens were sampled from, in order, as the runner saw them (CUDA
    graph replays included); the real batch builder and sampler still run."""
    from fireflyer.workloads.serve import runner as runner_module

    seen: dict[str, list[torch.Tensor]] = {}
    steps: list[StepInputs] = []
    real_build, real_sample = runner_module.build_step, runner_module.sample

    def build(chunks: list[ScheduledChunk], device: torch.device, balance: bool = True) -> StepInputs:
        steps[:] = [real_build(chunks, device, balance=balance)]
        return steps[0]

    def sample(
        logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        for chunk, row in zip(steps[0].sampling, logits, strict=True):
            seen.setdefault(chunk.seq.request_id, []).append(row.float().cpu())
        return real_sample(logits, params, generators)

    monkeypatch.setattr(runner_module, "build_step", build)
    monkeypatch.setattr(runner_module, "sample", sample)
    return seen


def _alone_logits(engine: LLMEngine, prompt: list[int], outputs: list[int]) -> torch.Tensor:
    """The logits each of `outputs` is picked from when the request runs alone and eagerly: its
    prompt in one prefill, then one uniform-split decode step per token, fed `outputs`."""
    runner = engine.runner
    seq = Sequence(prompt_ids=list(prompt), params=SamplingParams(temperature=0))
    seq.block_table = list(range(-(-(len(prompt) + len(outputs)) // 64)))
    chunk = ScheduledChunk(seq, 0, len(prompt))
    rows = []
    for token in outputs:
        step = build_step([chunk], runner.device, balance=False)
        with torch.inference_mode():
            hidden = runner.model(step.input_ids, step.positions, runner.caches, step.meta)
            rows.append(runner.model.logits(hidden[step.sample_rows])[0].float().cpu())
        seq.token_ids.append(token)
        chunk = ScheduledChunk(seq, seq.num_tokens - 1, 1)
    return torch.stack(rows)


@pytest.mark.parametrize("balance", [True, False], ids=["balanced", "uniform"])
def test_batched_graph_decode_matches_each_request_alone(
    checkpoint: Path, balance: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """24 concurrent greedy requests of unequal lengths, decoded from CUDA graphs (length-balanced
    MLA runs or uniform splits): the logits every token was picked from agree with those of the
    request run alone and eagerly on the same tokens. Logits, not tokens: the tiny checkpoint's
    random weights give near-ties, which batch-dependent GEMM choices flip. Attention runs our
    kernels, whose length-balanced runs this checks: FlashMLA, which `auto` may pick when it is
    installed, schedules its own splits and is checked in test_kernels_official.py."""
    ours: Backend = "gluon" if gluon_unavailable("mla", torch.device("cuda")) is None else "triton"
    model = load_model(checkpoint, device="cuda", backends=Backends(attention=ours))
    prompts = _prompts(24, 900, seed=1)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seen = _spy_on_sampled_logits(monkeypatch)
    config = EngineConfig(num_kv_blocks=512, cuda_graph_max_batch=32, balance_decode=balance)
    batched = LLMEngine(model, set(), config)
    graphs = batched.runner.graphs
    assert graphs is not None
    replays: list[bool] = []
    real_run = graphs.run

    def counted_run(input_ids, positions, meta):  # type: ignore[no-untyped-def]
        replays.append(meta.decode_schedules is not None)
        return real_run(input_ids, positions, meta)

    graphs.run = counted_run  # type: ignore[method-assign]
    done = batched.generate(prompts, params)
    del batched
    assert len(replays) >= 20 and any(replays) == balance, replays
    reference = LLMEngine(
        model, set(), EngineConfig(num_kv_blocks=512, cuda_graph_max_batch=0, balance_decode=False)
    )
    rows = []
    for seq, prompt in zip(done, prompts, strict=True):
        assert len(seq.output_ids) == 24
        sampled = torch.stack(seen[seq.request_id])
        assert sampled.argmax(-1).tolist() == seq.output_ids
        alone = _alone_logits(reference, prompt, seq.output_ids)
        rows.append([calc_diff(x, y) for x, y in zip(sampled, alone, strict=True)])
    # A batch and a lone request are GEMMs of different M (FP8: `auto` may give them different
    # backends, each right to the reference, not bit-identical to one another). Rounding that
    # differs can flip a near-tie in the MoE router's top-k, which moves that token's logits and,
    # through its KV, a little of the ones after it. A wrong cache, schedule or graph input moves
    # whole requests: so nearly every token must agree closely and every request on the whole.
    tight = 6e-3 if "fp8" in str(checkpoint) else 1e-3
    flat = [d for request in rows for d in request]
    close = sum(d < tight for d in flat) / len(flat)
    medians = [sorted(request)[len(request) // 2] for request in rows]
    report = f"close {close:.3f}, worst rows {sorted(flat)[-8:]}, medians {medians}"
    assert close >= 0.95 and max(medians) < tight, report


def test_cuda_graph_decode_counts_the_expert_load(checkpoint: Path) -> None:
    """The EPLB load window counts decode steps replayed from CUDA graphs, their padding rows
    excluded: every MoE layer sees each computed token top-k times, and nothing of warm-up."""
    model = load_model(checkpoint, device="cuda")
    engine = LLMEngine(model, set(), EngineConfig(num_kv_blocks=256, cuda_graph_max_batch=8))
    graphs, window = engine.runner.graphs, engine.eplb_load
    assert graphs is not None and window is not None
    assert window.window().sum() == 0  # graph capture and warm-up runs are not load
    replays = []
    real_run = graphs.run

    def counted_run(input_ids, positions, meta):  # type: ignore[no-untyped-def]
        replays.append(int(input_ids.shape[0]))
        return real_run(input_ids, positions, meta)

    graphs.run = counted_run  # type: ignore[method-assign]
    prompts = _prompts(3, 900, seed=2)  # 3 sequences replay the graph of 4: one padding row
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)
    assert replays and 3 in replays, replays
    table = window.window()
    expected = sum(len(p) + 9 for p in prompts) * model.config.num_experts_per_tok
    assert table.sum(axis=1).tolist() == [expected] * table.shape[0]
