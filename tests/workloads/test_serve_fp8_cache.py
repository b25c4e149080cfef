"""`fireflyer serve --kv-cache-dtype fp8` on the tiny checkpoint: the cache holds 1.76× the blocks
in the same memory, the flag reaches the engine, and the model's output stays close to the BF16
cache's (docs/serving.md quotes the full measurement)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import Backends, DeepseekV3
from fireflyer.workloads.serve import server
from fireflyer.workloads.serve.engine import EngineConfig, EngineSetupError, LLMEngine
from fireflyer.workloads.serve.kv_accuracy import compare, random_prompts
from fireflyer.workloads.serve.runner import kv_cache_layout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> DeepseekV3:
    return load_model(checkpoint)


def test_the_same_memory_holds_1_76_times_the_blocks(
    model: DeepseekV3, caplog: pytest.LogCaptureFixture
) -> None:
    budget = 96 << 20
    bf16 = LLMEngine(model, set(), EngineConfig(kv_cache_memory=budget))
    with caplog.at_level(logging.INFO, logger="fireflyer.workloads.serve.engine"):
        fp8 = LLMEngine(model, set(), EngineConfig(kv_cache_memory=budget, kv_cache_dtype="fp8"))
    assert fp8.runner.caches[0].dtype == torch.uint8 and fp8.runner.caches[0].shape[-1] == 656
    ratio = fp8.runner.num_blocks / bf16.runner.num_blocks
    assert ratio == pytest.approx(1152 / 656, rel=0.01)
    assert fp8.block_manager.num_blocks > 1.7 * bf16.block_manager.num_blocks
    assert f"KV cache: {fp8.runner.num_blocks} blocks" in caplog.text and "fp8, 656 bytes" in caplog.text


def test_greedy_output_and_logits_stay_close_to_the_bf16_cache(model: DeepseekV3) -> None:
    prompts = random_prompts(4, model.config.vocab_size, seed=1)
    result = compare(model, "fp8", prompts, max_tokens=8)
    # Teacher-forced, the same next token nearly everywhere and logits within a fraction of their
    # scale; the tiny model's random weights make near-ties common, so greedy runs drift apart.
    assert result.forced_argmax_agreement >= 0.85
    assert result.logits_rms_error <= 0.2 * result.logits_rms
    assert result.token_agreement > 0.25
    # The BF16 cache against itself: the comparison sees no difference where there is none.
    same = compare(model, "bf16", prompts[:1], max_tokens=4)
    assert same.identical_sequences == 1 and same.logits_max_error == 0.0


def test_flag_reaches_the_engine_and_separates_the_prefix_cache(checkpoint: Path, model: DeepseekV3) -> None:
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    fp8 = server.engine_config(
        parser.parse_args(["--model", str(checkpoint), "--kv-cache-dtype", "fp8"]), model
    )
    default = server.engine_config(parser.parse_args(["--model", str(checkpoint)]), model)
    assert fp8.kv_cache_dtype == "fp8" and default.kv_cache_dtype == "auto"
    assert fp8.namespace != default.namespace  # FP8 blocks are never handed to a BF16 unit
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(checkpoint), "--kv-cache-dtype", "int8"])


def test_fp8_refuses_the_disk_tier_and_other_latent_widths(model: DeepseekV3, tmp_path: Path) -> None:
    with pytest.raises(EngineSetupError, match="kv-cache-dir"):
        LLMEngine(model, set(), EngineConfig(num_kv_blocks=16, kv_cache_dtype="fp8", kv_cache_dir=tmp_path))
    narrow = SimpleNamespace(config=SimpleNamespace(kv_lora_rank=256, latent_dim=320), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="512 \\+ 64"):
        kv_cache_layout(narrow, "fp8")  # type: ignore[arg-type]
    assert kv_cache_layout(narrow, "auto") == (320, torch.bfloat16)  # type: ignore[arg-type]


@pytest.mark.parametrize("attention", ["official", "gluon"])
def test_fp8_refuses_attention_backends_without_an_fp8_kernel_before_serving(
    checkpoint: Path, attention: str
) -> None:
    named = load_model(checkpoint, backends=Backends(attention=attention))  # type: ignore[arg-type]
    with pytest.raises(EngineSetupError, match=f"--attention-backend {attention}"):
        LLMEngine(named, set(), EngineConfig(num_kv_blocks=16, kv_cache_dtype="fp8"))
    LLMEngine(named, set(), EngineConfig(num_kv_blocks=16))  # the BF16 cache is theirs
