"""Routed experts: the masked (decode) and contiguous (prefill) layouts against a per-token loop,
with all experts hosted or only a rank's share; the router against a direct reading of its rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fireflyer.kernels import fp8
from fireflyer.workloads.model import moe
from fireflyer.workloads.model.config import ModelConfig
from tests.workloads.moe_config import CONFIG


def _experts(hosted: range, fp8_weights: bool, seed: int = 0) -> moe.Experts:
    config = ModelConfig(**{**CONFIG.__dict__, "fp8_weights": fp8_weights})
    experts = moe.Experts(config, hosted, dtype=torch.float32, device="cpu", gemm_backend="torch")
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts.w13.shape, generator=g) / 12
    w2 = torch.randn(experts.w2.shape, generator=g) / 12
    if fp8_weights:
        q13, s13 = fp8.quantize_per_block(w13)
        q2, s2 = fp8.quantize_per_block(w2)
        experts.w13.data.copy_(q13)
        experts.w2.data.copy_(q2)
        assert experts.w13_scale is not None and experts.w2_scale is not None
        experts.w13_scale.data.copy_(s13)
        experts.w2_scale.data.copy_(s2)
    else:
        experts.w13.data.copy_(w13)
        experts.w2.data.copy_(w2)
    return experts


def _loop(experts: moe.Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each token through each of its hosted experts, one at a time (dequantised weights)."""
    w13, w2 = experts.w13.float(), experts.w2.float()
    if experts.fp8:
        assert experts.w13_scale is not None and experts.w2_scale is not None
        pairs13 = zip(experts.w13, experts.w13_scale, strict=True)
        pairs2 = zip(experts.w2, experts.w2_scale, strict=True)
        w13 = torch.stack([fp8.dequantize_per_block(q, s) for q, s in pairs13])
        w2 = torch.stack([fp8.dequantize_per_block(q, s) for q, s in pairs2])
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in experts.experts:
                local = e - experts.experts.start
                gate, up = _output(experts, F.linear(_as_fp8(experts, x[t]), w13[local])).chunk(2)
                down = F.linear(_as_fp8(experts, F.silu(gate) * up), w2[local])
                out[t] += weights[t, k] * _output(experts, down)
    return out


def _as_fp8(experts: moe.Experts, row: torch.Tensor) -> torch.Tensor:
    """What an FP8 GEMM sees of an activation row: quantised per 1×128 group."""
    if not experts.fp8:
        return row
    q, s = fp8.quantize_per_token_group(row[None])
    return fp8.dequantize_per_token_group(q, s)[0]


def _output(experts: moe.Experts, y: torch.Tensor) -> torch.Tensor:
    """FP8 GEMMs write BF16."""
    return y.to(torch.bfloat16).float() if experts.fp8 else y


@pytest.mark.parametrize("fp8_weights", [False, True])
@pytest.mark.parametrize("hosted", [range(0, 8), range(4, 8)])
@pytest.mark.parametrize("tokens", [5, moe.MASKED_MAX_TOKENS + 40])
def test_layouts_match_a_per_token_loop(fp8_weights: bool, hosted: range, tokens: int) -> None:
    experts = _experts(hosted, fp8_weights)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, CONFIG.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    got = experts(x, weights, ids)
    want = _loop(experts, x, weights, ids)
    # FP8 GEMMs round to BF16; a batched and a one-row product may round a value differently.
    tolerance = 4e-3 if fp8_weights else 1e-5
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    if hosted.start:  # a token whose experts all live elsewhere gets exactly zero
        elsewhere = (ids >= hosted.start).sum(1) == 0
        assert torch.equal(got[elsewhere], torch.zeros_like(got[elsewhere]))


def test_gate_follows_group_limited_biased_choice() -> None:
    gate = moe.Gate(CONFIG, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(3)
    gate.weight.data.copy_(torch.randn(gate.weight.shape, generator=g))
    gate.e_score_correction_bias.data.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(50, CONFIG.hidden_size, generator=g)
    weights, ids = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T)
    biased = scores + gate.e_score_correction_bias
    for t in range(50):
        groups = biased[t].view(4, 2)
        best_groups = groups.sum(-1).topk(2).indices.tolist()  # two experts per group: top-2 = both
        allowed = [e for grp in best_groups for e in (2 * grp, 2 * grp + 1)]
        expected = sorted(allowed, key=lambda e: -float(biased[t, e]))[:3]
        assert sorted(ids[t].tolist()) == sorted(expected)
        raw = scores[t, ids[t]]
        torch.testing.assert_close(weights[t], raw / raw.sum() * 2.0)


def test_a_rank_that_received_only_padding_computes_zeros() -> None:
    """Low-latency dispatch pads every rank's buffer: a buffer of padding alone (tokens arrived,
    none for this rank's experts) gives zero rows, not an index error."""
    experts = moe.Experts(CONFIG, range(8), dtype=torch.float32, device="cpu", gemm_backend="torch")
    local = torch.full((4,), 8)  # every entry marked invalid
    route = experts._route_contiguous(local[:, None], (local < 8)[:, None])
    out = experts._run(route, torch.randn(4, CONFIG.hidden_size), None, torch.float32)
    assert out.shape == (4, CONFIG.hidden_size)
    assert not out.any()
