"""The FlashMLA adapter (`backend="official"` for MLA decode) against both FlashMLA interfaces.

FlashMLA runs only on a GPU; here a stand-in module follows each interface's contract as the
releases define it (what the calls take and return), and the GPU test
(tests/gpu/test_kernels_official.py) runs the real library against the torch reference."""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import mla  # noqa: E402
from fireflyer.kernels.mla_official import decode_with, new_schedule  # noqa: E402

B, S_Q, H_Q = 2, 2, 16


def _inputs() -> tuple[torch.Tensor, ...]:
    q = torch.randn(B, S_Q, H_Q, mla.D_QK, dtype=torch.bfloat16)
    kv = torch.randn(2, mla.PAGE, 1, mla.D_QK, dtype=torch.bfloat16)
    table = torch.arange(2, dtype=torch.int32).view(B, 1)
    lens = torch.tensor([1, 40], dtype=torch.int32)  # the first sequence is shorter than s_q
    return q, kv, table, lens


def _flashmla_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What FlashMLA returns: out [b, s_q, h_q, 512] and lse [b, h_q, s_q], +inf for a query
    that sees no key (here the first sequence's first query)."""
    out = torch.zeros(B, S_Q, H_Q, mla.D_V, dtype=q.dtype)
    lse = torch.full((B, H_Q, S_Q), 2.5)
    lse[0, :, 0] = float("inf")
    return out, lse


def test_the_sglang_fork_is_called_with_its_legacy_dense_decode() -> None:
    calls: list[dict[str, Any]] = []

    class SchedMeta:  # the fork's FlashMLASchedMeta: empty until the first call fills it
        pass

    def flash_mla_with_kvcache(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append({"args": args, "kwargs": kwargs})
        return _flashmla_result(args[0])

    fork = SimpleNamespace(
        has_legacy=lambda: True,
        get_mla_metadata=lambda *a, **k: (SchedMeta(), None),
        flash_mla_with_kvcache=flash_mla_with_kvcache,
    )
    q, kv, table, lens = _inputs()
    out, lse = decode_with(fork, q, kv, table, lens, 0.125)  # type: ignore[arg-type]
    (call,) = calls
    assert call["args"][:5] == (q, kv, table, lens, mla.D_V)
    assert isinstance(call["args"][5], SchedMeta)
    assert call["kwargs"] == {"softmax_scale": 0.125, "causal": True, "use_legacy": True}
    assert out.shape == (B, S_Q, H_Q, mla.D_V)
    # Our contract for a query with no visible key: lse −inf; the others pass through.
    assert bool(torch.isneginf(lse[0, :, 0]).all())
    assert bool((lse[0, :, 1] == 2.5).all()) and bool((lse[1] == 2.5).all())


def test_a_release_before_1_0_takes_its_split_schedule() -> None:
    schedule = (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(B + 1, dtype=torch.int32))
    seen: dict[str, Any] = {}

    def get_mla_metadata(seqlens: torch.Tensor, q_per_k: int, h_k: int) -> tuple[torch.Tensor, ...]:
        seen["metadata"] = (seqlens, q_per_k, h_k)
        return schedule

    def flash_mla_with_kvcache(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen["decode"] = (args, kwargs)
        return _flashmla_result(args[0])

    release = SimpleNamespace(
        get_mla_metadata=get_mla_metadata, flash_mla_with_kvcache=flash_mla_with_kvcache
    )
    q, kv, table, lens = _inputs()
    _, lse = decode_with(release, q, kv, table, lens, 0.125)  # type: ignore[arg-type]
    assert seen["metadata"] == (lens, S_Q * H_Q, 1)
    args, kwargs = seen["decode"]
    assert args[5] is schedule[0] and args[6] is schedule[1]
    assert kwargs == {"softmax_scale": 0.125, "causal": True}
    assert bool(torch.isneginf(lse[0, :, 0]).all())


def _recording_fork() -> tuple[ModuleType, list[object], list[object]]:
    """A stand-in `flash_mla` (the fork's interface) that records the schedules it makes and the
    schedule each decode call is passed."""
    made: list[object] = []
    passed: list[object] = []

    def get_mla_metadata(*args: Any, **kwargs: Any) -> tuple[object, None]:
        made.append(object())
        return made[-1], None

    def flash_mla_with_kvcache(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        passed.append(args[5])
        return _flashmla_result(args[0])

    fork = ModuleType("flash_mla")
    fork.__spec__ = ModuleSpec("flash_mla", None)
    fork.has_legacy = lambda: True  # type: ignore[attr-defined]
    fork.get_mla_metadata = get_mla_metadata  # type: ignore[attr-defined]
    fork.flash_mla_with_kvcache = flash_mla_with_kvcache  # type: ignore[attr-defined]
    return fork, made, passed


def test_a_shared_schedule_is_used_instead_of_a_new_one() -> None:
    fork, made, passed = _recording_fork()
    q, kv, table, lens = _inputs()
    shared = new_schedule(fork, lens, S_Q * H_Q)  # type: ignore[arg-type]
    for _ in range(3):  # the layers of one decode step
        decode_with(fork, q, kv, table, lens, 0.125, schedule=shared)  # type: ignore[arg-type]
    assert made == [shared] and passed == [shared] * 3


def test_the_layers_of_one_decode_step_share_flashmlas_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mla.mla_decode(backend="official")` with a step's `official_schedules`: the first layer
    makes FlashMLA's schedule, the others reuse it; the next step (a new dict) makes its own."""
    fork, made, passed = _recording_fork()
    monkeypatch.setitem(sys.modules, "flash_mla", fork)
    q, kv, table, lens = _inputs()
    for step in range(2):
        shared: dict[int, Any] = {}
        for _layer in range(3):
            _, lse = mla.mla_decode(q, kv, table, lens, 0.125, backend="official", official_schedules=shared)
            assert bool(torch.isneginf(lse[0, :, 0]).all())
        assert len(made) == step + 1 and list(shared.values()) == [made[-1]]
    assert passed == [made[0]] * 3 + [made[1]] * 3
    # Without a step's dict (a lone call) every call makes its own.
    mla.mla_decode(q, kv, table, lens, 0.125, backend="official")
    assert len(made) == 3 and passed[-1] is made[2]
