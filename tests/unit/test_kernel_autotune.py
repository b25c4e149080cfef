"""`backend="auto"`: the pure choice from a measured table, the table's cache, and resolve()."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import autotune, backend, fp8  # noqa: E402
from fireflyer.kernels.cli import render_table  # noqa: E402


def _results(times: dict[str, dict[str, float | str]]) -> dict[str, dict[str, autotune.ClassResult]]:
    """gemm classes from {class: {candidate: seconds or error text}}."""
    out: dict[str, autotune.ClassResult] = {}
    for klass, candidates in times.items():
        result = autotune.ClassResult()
        for name, value in candidates.items():
            result.candidates[name] = (
                autotune.Measurement(error=value)
                if isinstance(value, str)
                else autotune.Measurement(seconds=value)
            )
        out[klass] = result
    return {"gemm": out}


def test_the_fastest_correct_candidate_is_chosen_and_a_wrong_one_never() -> None:
    results = _results(
        {
            "m<=64": {"triton": 20e-6, "cublas": 30e-6},
            "m>2048": {"triton": 2e-3, "cublas": 1e-3},
            "m<=256": {"cublas": "wrong result on (256, 24576, 1536): diff 3.1e-01", "triton": 9e-5},
        }
    )
    table = autotune.table_from_results("dev", results)
    assert autotune.choice_from_table(table, "gemm", "m<=64") == "triton"
    assert autotune.choice_from_table(table, "gemm", "m>2048") == "cublas"
    assert autotune.choice_from_table(table, "gemm", "m<=256") == "triton"  # cublas was wrong there
    assert "wrong result" in table["ops"]["gemm"]["m<=256"]["excluded"]["cublas"]
    assert autotune.choice_from_table(table, "mla", "rows<=64") is None


def test_no_measured_candidate_means_no_choice() -> None:
    assert autotune.fastest({}) is None
    assert autotune.fastest({"a": None, "b": float("nan")}) is None
    assert autotune.fastest({"a": 2.0, "b": 1.0}) == "b"
    assert autotune.fastest({"b": 1.0, "a": 1.0}) == "a"  # ties break by name, so choices are stable


@pytest.mark.parametrize(
    "op,rows,klass",
    [
        ("gemm", 1, "m<=64"),
        ("gemm", 64, "m<=64"),
        ("gemm", 65, "m<=256"),
        ("gemm", 2048, "m<=2048"),
        ("gemm", 2049, "m>2048"),
        ("mla", 64, "rows<=64"),
        ("mla", 128, "rows>64"),
    ],
)
def test_shape_classes(op: str, rows: int, klass: str) -> None:
    assert autotune.shape_class(op, rows) == klass


def test_a_cached_table_is_used_only_for_its_own_device_and_versions(tmp_path: Path) -> None:
    table = autotune.table_from_results(
        "H200-sm90-torch2.11-triton3.6", _results({"m<=64": {"cublas": 1e-5}})
    )
    path = tmp_path / "kernels" / "autotune-x.json"
    autotune.save_table(path, table)
    assert autotune.load_table(path, "H200-sm90-torch2.11-triton3.6") == json.loads(path.read_text())
    assert autotune.load_table(path, "H200-sm90-torch2.12-triton3.6") is None  # torch upgraded
    path.write_text("{not json")
    assert autotune.load_table(path, "H200-sm90-torch2.11-triton3.6") is None
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_the_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FIREFLYER_CACHE_DIR", str(tmp_path))
    assert autotune.cache_dir() == tmp_path / "kernels"


def test_resolve_auto_takes_the_measured_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve() on a CUDA device consults the table by shape class (no GPU needed to check the
    plumbing: the table is given and the device key fixed)."""
    table = autotune.table_from_results(
        "fake",
        _results({"m<=64": {"triton": 1e-5, "cublas": 2e-5}, "m>2048": {"triton": 2e-3, "cublas": 1e-3}}),
    )
    monkeypatch.setattr(autotune, "device_key", lambda device: "fake")
    monkeypatch.setitem(autotune._tables, "fake", table)
    cuda = torch.device("cuda", 0)
    assert backend.resolve("auto", "gemm", cuda, rows=4096) == "cublas"
    assert backend.resolve("auto", "gemm", cuda, rows=8) == "triton"
    assert backend.resolve("torch", "gemm", cuda, rows=4096) == "torch"  # an explicit backend wins
    monkeypatch.setenv("FIREFLYER_KERNEL_AUTOTUNE", "0")
    assert backend.resolve("auto", "gemm", cuda, rows=4096) != "cublas"  # the fixed order


def test_an_official_choice_without_its_package_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    table = autotune.table_from_results("fake", _results({"m>2048": {"official": 1e-4, "cublas": 1e-3}}))
    monkeypatch.setattr(autotune, "device_key", lambda device: "fake")
    monkeypatch.setitem(autotune._tables, "fake", table)
    if backend.has_module("deep_gemm"):
        pytest.skip("deep_gemm is installed here")
    assert autotune.auto_choice("gemm", torch.device("cuda", 0), 4096) is None


def test_on_the_cpu_auto_is_the_reference_and_cublas_is_refused() -> None:
    a, a_scale = fp8.quantize_per_token_group(torch.randn(4, 256))
    b, b_scale = fp8.quantize_per_block(torch.randn(130, 256))
    out = fp8.gemm_fp8(a, a_scale, b, b_scale)
    assert torch.equal(out, fp8.gemm_fp8_reference(a, a_scale, b, b_scale))
    with pytest.raises(RuntimeError, match="cublas"):
        fp8.gemm_fp8(a, a_scale, b, b_scale, backend="cublas")


def test_the_printed_table_names_choices_times_and_exclusions() -> None:
    table = autotune.table_from_results(
        "H200",
        _results({"m<=64": {"triton": 12.5e-6, "cublas": 30e-6, "official": "deep_gemm is not installed"}}),
    )
    text = render_table(table)
    assert "device: H200" in text
    row = next(line for line in text.splitlines() if "m<=64" in line)
    assert row.split()[2] == "triton"
    assert "triton 12.5 µs; cublas 30.0 µs; official: deep_gemm is not installed" in row


def test_gluon_is_refused_by_name_where_it_cannot_run() -> None:
    from fireflyer.kernels import mla, mla_fp8

    with pytest.raises(RuntimeError, match="backend 'gluon': needs a Hopper"):
        backend.resolve("gluon", "mla", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no Gluon kernel for ep"):
        backend.resolve("gluon", "ep", torch.device("cpu"))
    q = torch.zeros(1, 1, 16, mla.D_QK, dtype=torch.bfloat16)
    cache = torch.zeros(1, mla.PAGE, 1, 656, dtype=torch.uint8)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(
        ValueError, match="FP8 KV cache decodes with the triton or torch backend, not 'gluon'"
    ):
        mla_fp8.mla_decode_fp8(q, cache, table, lens, 0.1, backend="gluon")


def test_gluon_runs_only_on_the_triton_release_it_is_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    from fireflyer.kernels import fp8_gluon_kernel, gluon_release, mla_gluon

    assert gluon_release.gluon_release_supported("3.6.0")
    assert gluon_release.gluon_release_supported("3.6.1+git1a2b3c")
    for other in ("3.5.1", "3.9.0", "4.6.0", "nightly"):
        assert not gluon_release.gluon_release_supported(other)
    # The installed Triton's Gluon kernels are on exactly when it is that release.
    if fp8_gluon_kernel.HAVE_GLUON or mla_gluon.HAVE_GLUON:
        assert gluon_release.gluon_release_supported(triton.__version__)
    # On a Hopper GPU with another release, `auto` and the grouped GEMMs run Triton, and asking for
    # Gluon by name says why.
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(fp8_gluon_kernel, "HAVE_GLUON", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    why = backend.gluon_unavailable("gemm", torch.device("cuda", 0))
    assert why == "the Gluon kernels are written for Triton 3.6's Gluon API; this is Triton 3.9.0"
    with pytest.raises(RuntimeError, match=re.escape("Triton 3.6's Gluon API; this is Triton 3.9.0")):
        backend.resolve("gluon", "grouped_gemm", torch.device("cuda", 0))


def test_an_auto_gluon_choice_falls_back_to_triton_for_inputs_it_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`auto` picks per shape class; a call in that class that the Gluon kernel refuses (say, a
    cache that is not contiguous) runs on Triton. Named explicitly, the refusal reaches the caller."""
    from fireflyer.kernels import mla, mla_gluon, mla_triton

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("mla_decode_gluon: needs a contiguous cache")

    ran: list[str] = []
    monkeypatch.setattr(mla, "resolve", lambda *args, **kwargs: "gluon")
    monkeypatch.setattr(mla_gluon, "mla_decode_gluon", refuse)
    monkeypatch.setattr(
        mla_triton, "mla_decode_triton", lambda *args, **kwargs: ran.append("triton") or ("out", "lse")
    )
    q = torch.zeros(1, 1, 16, mla.D_QK, dtype=torch.bfloat16)
    cache = torch.zeros(1, mla.PAGE, 1, mla.D_QK, dtype=torch.bfloat16)
    table, lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    assert mla.mla_decode(q, cache, table, lens, 0.1) == ("out", "lse")
    assert ran == ["triton"]
    with pytest.raises(ValueError, match="contiguous"):
        mla.mla_decode(q, cache, table, lens, 0.1, backend="gluon")


def test_a_backend_wrong_only_on_small_shapes_is_excluded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library right on DeepSeek-V3's shapes but wrong where K is one or two weight blocks (as
    cuBLAS block-wise was with torch 2.11 before K was padded) is kept out of `auto`."""
    real = fp8.gemm_fp8

    def flawed(
        a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, backend: str = "auto"
    ) -> torch.Tensor:
        out = real(a, a_scale, b, b_scale, backend="torch")
        return out.flip(1) if backend == "cublas" and a.shape[1] <= 256 else out

    monkeypatch.setattr(fp8, "gemm_fp8", flawed)
    cpu = torch.device("cpu")
    assert autotune._wrong_on_probes("gemm", "triton", cpu) is None
    why = autotune._wrong_on_probes("gemm", "cublas", cpu)
    assert why is not None and "(5, 256, 256)" in why


def test_cublas_operands_are_padded_to_four_k_blocks_without_changing_the_product() -> None:
    g = torch.Generator().manual_seed(0)
    a, a_scale = fp8.quantize_per_token_group(torch.randn(5, 256, generator=g))
    b, b_scale = fp8.quantize_per_block(torch.randn(384, 256, generator=g))
    padded = fp8.pad_k_to_four_blocks(a, a_scale, b, b_scale)
    assert [tuple(t.shape) for t in padded] == [(5, 512), (5, 4), (384, 512), (3, 4)]
    assert all(t.is_contiguous() for t in padded)
    torch.testing.assert_close(
        fp8.gemm_fp8_reference(*padded), fp8.gemm_fp8_reference(a, a_scale, b, b_scale)
    )
    deep = fp8.quantize_per_token_group(torch.randn(2, 512, generator=g))
    weight = fp8.quantize_per_block(torch.randn(128, 512, generator=g))
    assert fp8.pad_k_to_four_blocks(*deep, *weight)[0] is deep[0]  # four blocks already


def test_a_candidate_slowed_once_is_still_chosen_and_one_that_fails_later_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rounds of turns, best of each: the fast backend measured once at a slow moment still wins;
    a backend that fails in a later round is out with its reason."""
    timings = {"gluon": iter([9e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]), "triton": iter([2e-3] * 6)}
    calls: list[str] = []

    def checked_call(op: str, shape: tuple[int, ...], candidate: str, device: torch.device) -> object:
        if candidate == "official":
            raise ValueError("wrong result on (1, 2): diff 1.0e+00")
        return candidate

    def time(call: object) -> float:
        calls.append(str(call))
        if call == "cublas" and len([c for c in calls if c == "cublas"]) > 2:
            raise RuntimeError("device lost\nmore lines")
        return next(timings[str(call)]) if str(call) in timings else 5e-4

    monkeypatch.setattr(autotune, "_checked_call", checked_call)
    monkeypatch.setattr(autotune, "_time", time)
    result = autotune._measure_class("gemm", ((1, 2), (3, 4)), torch.device("cpu"), {})
    measured = {name: m.seconds for name, m in result.candidates.items() if m.error is None}
    assert measured == {"gluon": pytest.approx(1e-3), "triton": pytest.approx(2e-3)}
    assert result.candidates["cublas"].error == "device lost"
    assert result.candidates["official"].error == "wrong result on (1, 2): diff 1.0e+00"
    assert list(result.candidates) == list(autotune.CANDIDATES["gemm"])  # the table's order
    # The candidates take turns within each round.
    assert calls[:6] == ["cublas", "cublas", "gluon", "gluon", "triton", "triton"]
