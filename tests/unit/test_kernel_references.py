"""The torch references that define the kernels' correctness, on CPU."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import fp8, mla  # noqa: E402
from fireflyer.kernels.backend import resolve  # noqa: E402


def _paged(b: int, s_q: int, h_q: int, seqlens: list[int], seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    pages = max(math.ceil(n / mla.PAGE) for n in seqlens)
    q = torch.randn(b, s_q, h_q, mla.D_QK, generator=g).to(torch.bfloat16)
    kv = torch.randn(b * pages, mla.PAGE, 1, mla.D_QK, generator=g).to(torch.bfloat16)
    table = torch.randperm(b * pages, generator=g).to(torch.int32).view(b, pages)
    return q, kv, table, torch.tensor(seqlens, dtype=torch.int32)


def test_mla_reference_equals_dense_attention_over_the_gathered_sequence() -> None:
    q, kv, table, lens = _paged(3, 2, 4, [70, 1, 129])
    scale = 192**-0.5
    out, lse = mla.mla_decode(q, kv, table, lens, scale, backend="torch")
    assert out.shape == (3, 2, 4, 512) and out.dtype == torch.bfloat16 and lse.shape == (3, 4, 2)
    for i, n in enumerate(lens.tolist()):
        tokens = torch.cat([kv[int(p), :, 0] for p in table[i]])[:n].float()  # [n, 576]
        for s in range(2):
            visible = n - 2 + s + 1  # causal: the query at position n-2+s sees keys 0..n-2+s
            if visible <= 0:  # nothing to attend to
                assert out[i, s].abs().max().item() == 0 and lse[i, :, s].isinf().all()
                continue
            for h in range(4):
                scores = tokens[:visible] @ q[i, s, h].float() * scale
                weights = torch.softmax(scores, 0)
                want = weights @ tokens[:visible, :512]
                assert torch.allclose(out[i, s, h].float(), want, atol=2e-2)
                assert lse[i, h, s].item() == pytest.approx(torch.logsumexp(scores, 0).item(), abs=1e-3)


def test_mla_rejects_bad_shapes() -> None:
    q, kv, table, lens = _paged(2, 1, 4, [10, 20])
    with pytest.raises(ValueError, match="int32"):
        mla.mla_decode(q, kv, table.long(), lens, 0.1, backend="torch")
    with pytest.raises(ValueError, match="576"):
        mla.mla_decode(q[..., :512], kv, table, lens, 0.1, backend="torch")


def test_split_count_fills_the_gpu_and_never_exceeds_pages() -> None:
    assert mla.num_splits(batch=128, head_blocks=2, max_pages=64, num_sms=132, waves=1.0) == 1
    assert mla.num_splits(batch=1, head_blocks=2, max_pages=512, num_sms=132) == 64
    assert mla.num_splits(batch=1, head_blocks=1, max_pages=3, num_sms=132) == 3


def test_quantisation_round_trips_within_e4m3_precision() -> None:
    x = torch.randn(16, 512) * torch.logspace(-2, 2, 16)[:, None]
    q, s = fp8.quantize_per_token_group(x)
    assert q.dtype == fp8.FP8 and s.shape == (16, 4)
    back = fp8.dequantize_per_token_group(q, s)
    assert ((back - x).abs() <= x.abs() * 0.0625 + s.repeat_interleave(128, 1) * 2**-9).all()
    w = torch.randn(2112, 256)  # N not a multiple of 128, as in DeepSeek-V3
    wq, ws = fp8.quantize_per_block(w)
    assert wq.shape == (2112, 256) and ws.shape == (17, 2)
    assert fp8.calc_diff(fp8.dequantize_per_block(wq, ws), w) < 1e-3


def test_gemm_reference_is_close_to_the_unquantised_product() -> None:
    a = torch.randn(64, 1024)
    b = torch.randn(384, 1024)
    aq, a_s = fp8.quantize_per_token_group(a)
    bq, b_s = fp8.quantize_per_block(b)
    out = fp8.gemm_fp8(aq, a_s, bq, b_s, backend="torch")
    assert out.dtype == torch.bfloat16 and out.shape == (64, 384)
    assert fp8.calc_diff(out, a @ b.T) < 1e-3


def test_grouped_references_route_rows_to_their_expert() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(384, 256, generator=g)
    w = torch.randn(3, 128, 256, generator=g)
    idx = torch.tensor([2] * 128 + [0] * 128 + [-1] * 128, dtype=torch.int32)
    aq, a_s = fp8.quantize_per_token_group(a)
    wq, w_s = fp8.quantize_per_block(w)
    out = fp8.grouped_gemm_fp8_contiguous(aq, a_s, wq, w_s, idx, backend="torch")
    assert fp8.calc_diff(out[:128], a[:128] @ w[2].T) < 1e-3
    assert fp8.calc_diff(out[128:256], a[128:256] @ w[0].T) < 1e-3
    assert out[256:].abs().max().item() == 0
    am = a.view(3, 128, 256)
    pairs = [fp8.quantize_per_token_group(am[i]) for i in range(3)]
    masked = fp8.grouped_gemm_fp8_masked(
        torch.stack([p[0] for p in pairs]),
        torch.stack([p[1] for p in pairs]),
        wq,
        w_s,
        torch.tensor([5, 0, 128]),
        backend="torch",
    )
    assert fp8.calc_diff(masked[0, :5], am[0, :5] @ w[0].T) < 1e-3
    assert masked[0, 5:].abs().max().item() == 0 and masked[1].abs().max().item() == 0


def test_auto_backend_falls_back_to_torch_on_cpu() -> None:
    assert resolve("auto", "mla", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve("triton", "gemm", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="deep_gemm"):
        resolve("official", "gemm", torch.device("cpu"))
