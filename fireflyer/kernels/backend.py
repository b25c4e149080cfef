"""Backend choice shared by the kernels: auto | triton | torch | official."""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch", "official"]
OFFICIAL_MODULES = {"mla": "flash_mla", "gemm": "deep_gemm", "ep": "deep_ep"}


@functools.cache
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve(backend: Backend, kernel: str, device: torch.device) -> str:
    """The backend that will run: `auto` prefers the official library, then Triton on a CUDA
    device, then the torch reference."""
    if backend == "official":
        if not has_module(OFFICIAL_MODULES[kernel]):
            raise RuntimeError(f"backend 'official' needs the {OFFICIAL_MODULES[kernel]} package")
        return "official"
    if backend == "triton":
        if device.type != "cuda" or not has_module("triton"):
            raise RuntimeError("backend 'triton' needs a CUDA device and the triton package")
        return "triton"
    if backend == "torch":
        return "torch"
    if device.type == "cuda" and has_module(OFFICIAL_MODULES[kernel]):
        return "official"
    if device.type == "cuda" and has_module("triton"):
        return "triton"
    return "torch"
