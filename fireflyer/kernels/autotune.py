"""What `backend="auto"` runs: per operation and shape class, the fastest backend that is correct on
this device, from a small table measured once and cached per device, torch and Triton version.

The table is measured the first time `auto` needs it on a CUDA device (a few seconds: every
candidate on two representative shapes per class, checked against the torch reference first; an
official library is a candidate only where `fireflyer.kernels.official` finds it installed, made
for this device and surviving a first call in a child process) and
written to `$FIREFLYER_CACHE_DIR/kernels/` (default `~/.cache/fireflyer/kernels/`). It is never
measured during CUDA graph capture; then, or with `FIREFLYER_KERNEL_AUTOTUNE=0`, `auto` falls back
to the fixed order official > triton > torch. `fireflyer kernels autotune` prints the table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fireflyer.kernels.backend import OFFICIAL_MODULES, gluon_unavailable, has_module

# v2: the Gluon candidates; v3: their two-step FP8 stages and direct MLA launch; v4: candidates
# checked on PROBE_SHAPES too (re-measure); v5: the Gluon GEMMs load scales ahead
TABLE_FORMAT = "fireflyer.kernel-autotune/v5"
MAX_DIFF = {"gemm": 1e-3, "mla": 1e-4}  # calc_diff against the torch reference; above it = wrong
# Shape classes: gemm by M (decode rows, small prefill, prefill), mla by query rows per KV head.
GEMM_CLASSES = (("m<=64", 64), ("m<=256", 256), ("m<=2048", 2048), ("m>2048", math.inf))
MLA_CLASSES = (("rows<=64", 64), ("rows>64", math.inf))
GEMM_SHAPES = {  # representative (M, N, K) of DeepSeek-V3's linears per class
    "m<=64": ((64, 24576, 1536), (64, 7168, 16384)),
    "m<=256": ((256, 24576, 1536), (256, 7168, 16384)),
    "m<=2048": ((2048, 24576, 1536), (2048, 7168, 16384)),
    "m>2048": ((4096, 24576, 1536), (4096, 7168, 16384)),
}
MLA_SHAPES = {  # (batch, s_q, h_q, s_k)
    "rows<=64": ((64, 1, 16, 4096), (64, 1, 64, 4096)),
    "rows>64": ((64, 1, 128, 4096), (64, 2, 128, 4096)),
}
# Checked, not timed: a candidate wrong on any of these is excluded from every class of its op.
# Small and ragged shapes (K of 1-3 weight blocks, a partial N block, M not a multiple of 4, few
# heads) where a library may take another path than on DeepSeek-V3's: cuBLAS block-wise scaling
# in torch 2.11 returned wrong results for K of 128 and 256 until K was padded to four blocks.
PROBE_SHAPES = {
    "gemm": ((5, 256, 256), (67, 576, 128), (130, 384, 384), (1, 2112, 7168)),
    "mla": ((3, 1, 4, 192), (5, 2, 16, 320)),
}
# Raised when what a candidate's timed call includes changes, so cached tables are measured again
# (2: FlashMLA's split schedule shared across calls, as a decode step's layers share it; 3: the
# best of ROUNDS interleaved rounds).
METHOD = 3
ROUNDS = 3
CANDIDATES = {"gemm": ("official", "cublas", "gluon", "triton"), "mla": ("official", "gluon", "triton")}
STATIC_ORDER = ("official", "triton", "torch")

_lock = threading.Lock()
_tables: dict[str, dict[str, Any]] = {}


@dataclass
class Measurement:
    """One candidate on one shape class: mean seconds over the class's shapes, or why it is out."""

    seconds: float | None = None
    error: str | None = None


@dataclass
class ClassResult:
    candidates: dict[str, Measurement] = field(default_factory=dict)

    @property
    def choice(self) -> str | None:
        return fastest({name: m.seconds for name, m in self.candidates.items() if m.error is None})


def fastest(times: dict[str, float | None]) -> str | None:
    """The candidate with the least time; None when none was measured."""
    measured = {name: t for name, t in times.items() if t is not None and math.isfinite(t)}
    return min(measured, key=lambda name: (measured[name], name)) if measured else None


def shape_class(op: str, rows: int) -> str:
    """The class a call falls in: gemm by M, mla by query rows (s_q × h_q)."""
    classes = GEMM_CLASSES if op == "gemm" else MLA_CLASSES
    return next(name for name, bound in classes if rows <= bound)


def cache_dir() -> Path:
    root = os.environ.get("FIREFLYER_CACHE_DIR") or os.path.join(Path.home(), ".cache", "fireflyer")
    return Path(root) / "kernels"


def device_key(device: torch.device) -> str:
    """Device name, compute capability, torch, Triton and official library versions and the
    measuring method: a table is valid for exactly these (installing DeepGEMM or FlashMLA, or a
    release that measures differently, measures it again)."""
    return _device_key(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_key(index: int) -> str:  # cached: `auto` asks on every kernel call
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    triton_version = "none"
    if has_module("triton"):
        import triton

        triton_version = triton.__version__
    from fireflyer.kernels.official import MODULES, installed_version

    libraries = "".join(f"-{m}{installed_version(m)}" for m in MODULES if installed_version(m))
    raw = f"{name}-sm{major}{minor}-torch{torch.__version__}-triton{triton_version}{libraries}-m{METHOD}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", raw)


def table_path(device: torch.device) -> Path:
    return cache_dir() / f"autotune-{device_key(device)}.json"


def enabled() -> bool:
    return os.environ.get("FIREFLYER_KERNEL_AUTOTUNE", "1") != "0"


def table_from_results(key: str, results: dict[str, dict[str, ClassResult]]) -> dict[str, Any]:
    """The JSON form of measured results, with the choice per op and class."""
    ops: dict[str, Any] = {}
    for op, classes in results.items():
        ops[op] = {
            name: {
                "choice": result.choice,
                "microseconds": {
                    cand: round(m.seconds * 1e6, 2) for cand, m in result.candidates.items() if m.seconds
                },
                "excluded": {cand: m.error for cand, m in result.candidates.items() if m.error},
            }
            for name, result in classes.items()
        }
    return {"format": TABLE_FORMAT, "device": key, "measuredAt": time.time(), "ops": ops}


def choice_from_table(table: dict[str, Any], op: str, klass: str) -> str | None:
    entry = table.get("ops", {}).get(op, {}).get(klass)
    return entry.get("choice") if isinstance(entry, dict) else None


def load_table(path: Path, key: str) -> dict[str, Any] | None:
    """The cached table when it is readable and for this device and versions; else None."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or table.get("device") != key:
        return None
    return table


def save_table(path: Path, table: dict[str, Any]) -> None:
    """Atomically (ranks of one host may measure at once; the last complete table wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    os.replace(tmp, path)


def table_for(device: torch.device, *, force: bool = False) -> dict[str, Any]:
    """This device's table: from memory, from the cache file, or measured now."""
    key = device_key(device)
    with _lock:
        if not force and key in _tables:
            return _tables[key]
        path = table_path(device)
        table = None if force else load_table(path, key)
        if table is None:
            table = table_from_results(key, measure(device))
            save_table(path, table)
        _tables[key] = table
        return table


def auto_choice(op: str, device: torch.device, rows: int | None) -> str | None:
    """The measured choice for `op` on this call's shape class, or None when `auto` must use the
    fixed order (no CUDA, autotuning off, a graph being captured, or nothing measured correct)."""
    if device.type != "cuda" or rows is None or not enabled():
        return None
    key = device_key(device)
    table = _tables.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        table = table_for(device)
    choice = choice_from_table(table, op, shape_class(op, rows))
    if choice == "official" and not has_module(OFFICIAL_MODULES[op]):
        return None
    return choice


# Measurement (CUDA only) ---------------------------------------------------------------------------


def _time(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20)) * 1e-3


def _available(op: str, candidate: str, device: torch.device) -> str | None:
    """Why a candidate cannot run here, or None."""
    if candidate == "official":
        from fireflyer.kernels.official import unavailable

        return unavailable(OFFICIAL_MODULES[op], device)
    if candidate == "triton" and not has_module("triton"):
        return "triton is not installed"
    if candidate == "gluon":
        return gluon_unavailable(op, device)
    return None


def _reason(exc: Exception) -> str:
    """What the table says of a candidate that failed: the first line of its error, shortened."""
    return str(exc).splitlines()[0][:200]


def _checked_call(
    op: str, shape: tuple[int, ...], candidate: str, device: torch.device
) -> Callable[[], torch.Tensor]:
    """`candidate`'s call on one case of `op`, after it matched the torch reference (ValueError if
    it did not)."""
    from fireflyer.kernels import fp8

    call, reference = (_gemm_case if op == "gemm" else _mla_case)(shape, candidate, device)
    diff = fp8.calc_diff(call(), reference)
    if not diff <= MAX_DIFF[op]:
        raise ValueError(f"wrong result on {shape}: diff {diff:.2e}")
    return call


def _wrong_on_probes(op: str, candidate: str, device: torch.device) -> str | None:
    """Why `candidate` is not correct on this op's PROBE_SHAPES, or None when it is."""
    try:
        for shape in PROBE_SHAPES[op]:
            _checked_call(op, shape, candidate, device)
    except Exception as exc:
        return _reason(exc)
    return None


def _measure_class(
    op: str, shapes: tuple[tuple[int, ...], ...], device: torch.device, excluded: dict[str, str]
) -> ClassResult:
    """`excluded`: candidates already known not to run or not to be correct here, with why.
    Each candidate's time is the geometric mean over the shapes of its best of ROUNDS rounds,
    the candidates taking turns within a round: one slow moment of the device (a clock
    change, another process) then costs a candidate one sample, not its place."""
    failed = dict(excluded)
    calls: dict[str, list[Callable[[], torch.Tensor]]] = {}
    for candidate in CANDIDATES[op]:
        if candidate in failed:
            continue
        try:
            calls[candidate] = [_checked_call(op, shape, candidate, device) for shape in shapes]
        except Exception as exc:  # a backend that fails here is simply not chosen
            failed[candidate] = _reason(exc)
    best = {candidate: [math.inf] * len(shapes) for candidate in calls}
    for _ in range(ROUNDS):
        for candidate, candidate_calls in calls.items():
            if candidate in failed:
                continue
            try:
                for i, call in enumerate(candidate_calls):
                    best[candidate][i] = min(best[candidate][i], _time(call))
            except Exception as exc:
                failed[candidate] = _reason(exc)
    result = ClassResult()
    for candidate in CANDIDATES[op]:
        result.candidates[candidate] = (
            Measurement(error=failed[candidate])
            if candidate in failed
            else Measurement(seconds=math.exp(sum(map(math.log, best[candidate])) / len(shapes)))
        )
    return result


def _gemm_case(
    shape: tuple[int, ...], candidate: str, device: torch.device
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    from fireflyer.kernels import fp8

    m, n, k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a, a_scale = fp8.quantize_per_token_group(
        torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=gen)
    )
    b, b_scale = fp8.quantize_per_block(torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen))
    reference = fp8.gemm_fp8_reference(a, a_scale, b, b_scale)
    return (lambda: fp8.gemm_fp8(a, a_scale, b, b_scale, backend=candidate)), reference  # type: ignore[arg-type]


def _mla_case(
    shape: tuple[int, ...], candidate: str, device: torch.device
) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    from fireflyer.kernels import mla

    batch, s_q, h_q, s_k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    pages = s_k // mla.PAGE
    q = torch.randn(batch, s_q, h_q, mla.D_QK, device=device, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(batch * pages, mla.PAGE, 1, mla.D_QK, device=device, dtype=torch.bfloat16, generator=gen)
    table = torch.randperm(batch * pages, device=device, generator=gen).to(torch.int32).view(batch, pages)
    lens = torch.full((batch,), s_k, dtype=torch.int32, device=device)
    scale = 192**-0.5
    reference = mla.mla_decode(q, kv, table, lens, scale, backend="torch")[0]
    # FlashMLA's split schedule is made once per decode step and shared by its layers (the
    # engine's BatchMetadata): the first call (the correctness check) makes it, the timed ones
    # reuse it, as a step's later layers do.
    shared: dict[int, Any] = {}

    def call() -> torch.Tensor:
        return mla.mla_decode(q, kv, table, lens, scale, backend=candidate, official_schedules=shared)[0]  # type: ignore[arg-type]

    return call, reference


def measure(device: torch.device) -> dict[str, dict[str, ClassResult]]:
    """Every op, class and candidate on this device (CUDA)."""
    with torch.cuda.device(device):
        results: dict[str, dict[str, ClassResult]] = {}
        for op, classes, shapes in (("gemm", GEMM_CLASSES, GEMM_SHAPES), ("mla", MLA_CLASSES, MLA_SHAPES)):
            excluded = {}
            for candidate in CANDIDATES[op]:
                why = _available(op, candidate, device) or _wrong_on_probes(op, candidate, device)
                if why:
                    excluded[candidate] = why
            results[op] = {name: _measure_class(op, shapes[name], device, excluded) for name, _ in classes}
        return results
