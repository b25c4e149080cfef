"""Whether DeepSeek's official kernel libraries can run here, asked without risking this process.

`backend="auto"` measures an official library (DeepGEMM for the FP8 GEMMs, FlashMLA for MLA
decode) only where `unavailable(library, device)` is None. An installed library is first probed in
a child process (`PROBES`): DeepGEMM is imported and makes one call into its extension, FlashMLA is
imported (which loads its extension). A build that crashes there (seen: a DeepGEMM extension that
segfaults at its first call) is excluded with the reason instead of killing the process that
measures. The probe's answer is cached per library, and `unavailable`'s per library and device,
for the process's life: `backend.resolve` asks on every kernel call where no measured choice
applies.

- DeepGEMM (`deep_gemm`): kernels for SM90 and SM100 only.
- FlashMLA (`flash_mla`): releases from 1.0 on (PyPI `deepinfer-flashmla`) have dropped Hopper
  and the dense paged decode of DeepSeek-V3 that `fireflyer.kernels.mla` calls (they keep sparse
  decode with V4.1's cache on SM100), so they never run our op. The SGLang fork
  (`sgl-flash-mla`, also numbered 1.0) keeps those kernels in a second, "legacy" extension, which
  `fireflyer.kernels.mla_official` calls; its probe checks that the wheel was built with it.

docs/kernels.md says how to build them and what was seen when they were built on an H200.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import signal
import subprocess
import sys

import torch

MODULES = ("deep_gemm", "flash_mla")
ARCHS = {"deep_gemm": (9, 10), "flash_mla": (9, 10)}  # compute capability majors with kernels
PROBE_SECONDS = 120.0
# What the child runs: DeepGEMM's makes one call into its native code; FlashMLA's imports it,
# which loads the extension (every call of its own needs CUDA tensors of a decode).
PROBES = {
    "deep_gemm": "import deep_gemm\ndeep_gemm.get_num_sms()\nprint(deep_gemm.__version__)",
    "flash_mla": (
        "import flash_mla\n"
        "assert getattr(flash_mla, 'has_legacy', lambda: True)(), "
        "'flash_mla was built without its legacy extension (the Hopper dense decode)'\n"
        "print(flash_mla.__version__)"
    ),
}
# FlashMLA forks that keep the Hopper dense decode, dropped upstream in 1.0, beside 1.x kernels.
FLASH_MLA_WITH_LEGACY = frozenset({"sgl-flash-mla"})


@functools.cache
def installed_distribution(module: str) -> str | None:
    """The name of the distribution that provides `module` (without importing it), or None."""
    found = importlib.metadata.packages_distributions().get(module, [])
    return found[0] if found else None


@functools.cache
def installed_version(module: str) -> str | None:
    """The version of the distribution that provides `module` (without importing it), or None
    when none is installed. Used in the autotune table's key, so that installing or upgrading a
    library measures the table again (in a new process: the answer is cached, because reading
    every distribution's metadata takes hundreds of milliseconds)."""
    for dist in importlib.metadata.packages_distributions().get(module, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def probe_failure(code: str, env: dict[str, str] | None = None, timeout: float = PROBE_SECONDS) -> str | None:
    """Run `code` in a child Python; None when it exits 0, else why it failed (its last line of
    output, the signal that killed it, or the timeout)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"did not finish its first call in {timeout:.0f} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"crashed at its first call ({signal.Signals(-done.returncode).name})"
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return lines[-1][:200] if lines else f"exited with status {done.returncode}"


def version_failure(module: str, version: str, distribution: str | None = None) -> str | None:
    """A release known not to run our ops, or None."""
    major = version.split(".")[0]
    if module == "flash_mla" and major.isdigit() and int(major) >= 1:
        if distribution is not None and distribution.lower().replace("_", "-") in FLASH_MLA_WITH_LEGACY:
            return None
        return (
            f"flash_mla {version} has no Hopper kernels and no dense paged decode "
            "(both dropped in 1.0); fireflyer's MLA decode needs an earlier release "
            "or the sgl-flash-mla wheel, which keeps them"
        )
    return None


@functools.cache
def _probe(module: str) -> str | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return probe_failure(PROBES[module], env=env)


def unavailable(module: str, device: torch.device) -> str | None:
    """Why `module` cannot run our ops on `device`, or None when it may be measured."""
    if device.type != "cuda":
        return f"{module} needs a CUDA device"
    return _unavailable_on_cuda(module, torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _unavailable_on_cuda(module: str, index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major not in ARCHS[module]:
        return f"{module} has no kernels for sm{major}{minor}"
    version = installed_version(module)
    if version is None:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        version = "unknown"  # importable from a source tree without package metadata
    # Only FlashMLA's rule depends on which distribution provides the module.
    distribution = installed_distribution(module) if module == "flash_mla" else None
    return version_failure(module, version, distribution) or _probe(module)
