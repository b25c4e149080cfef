"""The official libraries through our entry points, against the torch references (skipped without a
CUDA device or where `fireflyer.kernels.official` finds the library unable to run)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8, official  # noqa: E402


def _deepgemm_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    return official.unavailable("deep_gemm", torch.device("cuda", 0))


pytestmark = [pytest.mark.gpu]
needs_deepgemm = pytest.mark.skipif(_deepgemm_skip_reason() is not None, reason=str(_deepgemm_skip_reason()))


@needs_deepgemm
@pytest.mark.parametrize("m,n,k", [(1, 2112, 7168), (64, 24576, 1536), (301, 7168, 2048), (4096, 4096, 7168)])
def test_deepgemm_dense_matches_the_reference(m: int, n: int, k: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(m)
    a, a_scale = fp8.quantize_per_token_group(
        torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    )
    b, b_scale = fp8.quantize_per_block(torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g))
    out = fp8.gemm_fp8(a, a_scale, b, b_scale, backend="official")
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert fp8.calc_diff(out, fp8.gemm_fp8_reference(a, a_scale, b, b_scale)) <= 1e-4


@needs_deepgemm
def test_autotune_measures_deepgemm_beside_the_others(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fireflyer.kernels import autotune

    monkeypatch.setenv("FIREFLYER_CACHE_DIR", str(tmp_path))
    table = autotune.table_for(torch.device("cuda", 0), force=True)
    for klass, entry in table["ops"]["gemm"].items():
        assert "official" in entry["microseconds"], (klass, entry)
        assert entry["microseconds"][entry["choice"]] == min(entry["microseconds"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flashmla_1_0_is_never_a_candidate_for_our_decode() -> None:
    why = official.unavailable("flash_mla", torch.device("cuda", 0))
    version = official.installed_version("flash_mla")
    if version is not None and version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 1:
        assert why is not None and "dense paged decode" in why
