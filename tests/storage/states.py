"""Deterministic state dicts and KV blocks that a test can rebuild from a step or a key alone."""

from __future__ import annotations

from typing import Any

import torch


def training_state(step: int, *, scale: int = 1) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)
    return {
        "model": {
            "embed.weight": torch.randn(256 * scale, 64, generator=generator).to(torch.bfloat16),
            "layers.0.experts.w1": torch.randn(8, 32, 64, generator=generator),
            "layers.0.norm": torch.rand(64, generator=generator).half(),
        },
        "optimizer": {
            "exp_avg": torch.randn(256 * scale, 64, generator=generator),
            "count": torch.tensor(step),
        },
        "fp8": torch.randn(128, 128, generator=generator).to(torch.float8_e4m3fn),
        "mask": torch.rand(100, generator=generator) > 0.5,
        "step": step,
        "lr": 1e-4 * step,
    }


def kv_block(key: str, shape: tuple[int, int, int], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(key[:15], 16))
    return torch.randn(shape, generator=generator).to(dtype)


def assert_same_state(actual: Any, expected: Any, path: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys differ"
        for key in expected:
            assert_same_state(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: not a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{path}: dtype/shape differ"
        )
        assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), (
            f"{path}: bytes differ"
        )
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
