"""The official libraries through our entry points, against the torch references (skipped without a
CUDA device or where `fireflyer.kernels.official` finds the library unable to run)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8, mla, official  # noqa: E402


def _skip_reason(module: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    return official.unavailable(module, torch.device("cuda", 0))


pytestmark = [pytest.mark.gpu]
needs_deepgemm = pytest.mark.skipif(
    _skip_reason("deep_gemm") is not None, reason=str(_skip_reason("deep_gemm"))
)
needs_flashmla = pytest.mark.skipif(
    _skip_reason("flash_mla") is not None, reason=str(_skip_reason("flash_mla"))
)


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


@pytest.mark.parametrize(
    "op",
    [
        pytest.param("gemm", marks=needs_deepgemm, id="deepgemm"),
        pytest.param("mla", marks=needs_flashmla, id="flashmla"),
    ],
)
def test_autotune_measures_the_official_library_beside_the_others(
    op: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fireflyer.kernels import autotune

    monkeypatch.setenv("FIREFLYER_CACHE_DIR", str(tmp_path))
    table = autotune.table_for(torch.device("cuda", 0), force=True)
    for klass, entry in table["ops"][op].items():
        assert "official" in entry["microseconds"], (klass, entry)
        assert entry["microseconds"][entry["choice"]] == min(entry["microseconds"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flashmla_1_0_is_never_a_candidate_for_our_decode_unless_it_keeps_the_legacy_kernels() -> None:
    why = official.unavailable("flash_mla", torch.device("cuda", 0))
    version = official.installed_version("flash_mla")
    # The rule itself is unit-tested (tests/unit/test_kernels_official.py); here, that it applies.
    distribution = official.installed_distribution("flash_mla")
    if version is not None and official.version_failure("flash_mla", version, distribution) is not None:
        assert why is not None and "dense paged decode" in why


@needs_flashmla
@pytest.mark.parametrize(
    "b,s_q,h_q,seqlens",
    [
        (3, 1, 64, [700, 1, 4095]),
        (3, 2, 128, [63, 2000, 1]),  # the last sequence is shorter than s_q: one query sees nothing
        (8, 1, 128, [8192] * 8),  # DeepSeek-V3 decode shape
    ],
)
def test_flashmla_decode_matches_the_reference(b: int, s_q: int, h_q: int, seqlens: list[int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(b)
    pages = -(-max(seqlens) // mla.PAGE)
    q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(b * pages, device="cuda", generator=g).to(torch.int32).view(b, pages)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    scale = 192**-0.5
    out, lse = mla.mla_decode(q, kv, table, lens, scale, backend="official")
    ref_out, ref_lse = mla.mla_decode_reference(q, kv, table, lens, scale)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert fp8.calc_diff(out, ref_out) <= 5e-6
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)  # −inf where no key is visible


@needs_flashmla
def test_flashmla_schedule_shared_by_a_graphed_steps_layers_follows_new_lengths() -> None:
    """The engine's decode graph: the first layer makes FlashMLA's schedule, the others reuse it.
    Replayed over other lengths, every layer must attend the new ones."""
    b, s_q, h_q, layers, pages = 4, 1, 128, 3, 40
    g = torch.Generator(device="cuda").manual_seed(7)
    shape = (b, s_q, h_q, mla.D_QK)
    qs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(layers)]
    kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(b * pages, device="cuda", generator=g).to(torch.int32).view(b, pages)
    lens = torch.tensor([100, 2500, 64, 1], dtype=torch.int32, device="cuda")
    scale = 192**-0.5

    def step() -> list[torch.Tensor]:
        shared: dict[int, object] = {}
        return [
            mla.mla_decode(q, kv, table, lens, scale, backend="official", official_schedules=shared)[0]
            for q in qs
        ]

    step()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for new_lengths in ([2560, 7, 1300, 640], [1, 1, 2559, 90]):
        lens.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for q, out in zip(qs, outs, strict=True):
            ref, _ = mla.mla_decode_reference(q, kv, table, lens, scale)
            assert fp8.calc_diff(out, ref) <= 5e-6
