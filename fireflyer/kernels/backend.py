"""Backend choice shared by the kernels: auto | triton | gluon | torch | official | cublas (FP8 GEMM
only: cuBLAS block-wise scaling through `torch._scaled_mm`). `gluon`: our warp-specialised Hopper
kernels, written in Triton's Gluon (sm_90 only; `auto` takes them where they measure fastest)."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Literal, TypeVar

import torch

Backend = Literal["auto", "triton", "gluon", "torch", "official", "cublas"]
GLUON_KERNELS = ("mla", "gemm", "grouped_gemm")  # operations that have a Gluon kernel
T = TypeVar("T")
OFFICIAL_MODULES = {"mla": "flash_mla", "gemm": "deep_gemm", "grouped_gemm": "deep_gemm", "ep": "deep_ep"}


@functools.cache
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve(backend: Backend, kernel: str, device: torch.device, rows: int | None = None) -> str:
    """The backend that will run. `auto` on a CUDA device takes the measured choice for this call's
    shape class (`rows`: M of a GEMM, s_q × h_q of MLA; see fireflyer.kernels.autotune); without
    one it prefers the official library where it can run here, then Triton, then the torch reference."""
    if backend == "cublas":
        if kernel != "gemm" or device.type != "cuda":
            raise RuntimeError("backend 'cublas' is the dense FP8 GEMM on a CUDA device")
        return "cublas"
    if backend == "official":
        if not has_module(OFFICIAL_MODULES[kernel]):
            raise RuntimeError(f"backend 'official' needs the {OFFICIAL_MODULES[kernel]} package")
        return "official"
    if backend == "gluon":
        why = gluon_unavailable(kernel, device)
        if why is not None:
            raise RuntimeError(f"backend 'gluon': {why}")
        return "gluon"
    if backend == "triton":
        if device.type != "cuda" or not has_module("triton"):
            raise RuntimeError("backend 'triton' needs a CUDA device and the triton package")
        return "triton"
    if backend == "torch":
        return "torch"
    if device.type == "cuda" and kernel in ("gemm", "mla"):
        from fireflyer.kernels.autotune import auto_choice

        measured = auto_choice(kernel, device, rows)
        if measured is not None:
            return measured
    if device.type == "cuda" and has_module(OFFICIAL_MODULES[kernel]):
        from fireflyer.kernels.official import unavailable

        # Installed is not enough: a release without our op, or a build that crashes, is skipped.
        if unavailable(OFFICIAL_MODULES[kernel], device) is None:
            return "official"
    if device.type == "cuda" and has_module("triton"):
        return "triton"
    return "torch"


def gluon_unavailable(kernel: str, device: torch.device) -> str | None:
    """Why our Gluon kernel for `kernel` cannot run on `device`, or None."""
    if kernel not in GLUON_KERNELS:
        return f"no Gluon kernel for {kernel}"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a Hopper (sm_90) GPU"
    if kernel == "mla":
        from fireflyer.kernels.mla_gluon import HAVE_GLUON
    else:
        from fireflyer.kernels.fp8_gluon_kernel import HAVE_GLUON
    if not HAVE_GLUON:
        from fireflyer.kernels.gluon_release import missing_gluon_reason

        return missing_gluon_reason()
    return None


def gluon_or_fallback(backend: Backend, run: Callable[[], T]) -> T | None:
    """The Gluon kernel's result; None where `auto` chose it but it refuses these inputs (the
    caller runs its Triton kernel). Asked for by name, the refusal reaches the caller."""
    try:
        return run()
    except ValueError:
        if backend == "gluon":
            raise
        return None
