"""The training forward against the serving forward, the sequence-wise balance loss and the
auxiliary-loss-free bias update."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fireflyer.workloads.model.batch import BatchMetadata, PrefillSpan
from fireflyer.workloads.model.loader import load_model
from fireflyer.workloads.model.model import DeepseekV3
from fireflyer.workloads.threads import single_intra_op_thread
from fireflyer.workloads.train import balance, forward, optim
from tests.workloads.train_support import tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with single_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DeepseekV3:
    return load_model(tiny_model(tmp_path_factory.mktemp("balance")), dtype=torch.float32)


def test_training_forward_matches_the_serving_forward(model: DeepseekV3) -> None:
    tokens = torch.randint(2, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = forward.forward(model, tokens)
        for b in range(2):
            caches = [torch.zeros(1, 64, model.config.latent_dim) for _ in model.blocks]
            rows = torch.arange(40)
            meta = BatchMetadata(slot_mapping=rows, prefills=[PrefillSpan(0, 40, 0, rows)])
            served = model.logits(model(tokens[b], rows, caches, meta))
            torch.testing.assert_close(logits[b], served, rtol=1e-4, atol=1e-4)


def test_every_trained_weight_gets_a_finite_gradient(model: DeepseekV3) -> None:
    tokens = torch.randint(2, 1000, (2, 33), generator=torch.Generator().manual_seed(1))
    named = optim.trainable_parameters(model)
    try:
        forward.losses(model, tokens, alpha=1e-2).total.backward()
        for name, p in named:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name  # the router too (through the balance loss)
        biases = [m.gate.e_score_correction_bias for m in balance.moe_layers(model)]
        assert all(b.grad is None and not b.requires_grad for b in biases)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_sequence_balance_loss() -> None:
    experts, top_k, tokens = 8, 2, 16
    # Balanced: every expert chosen equally often, equal affinities → Σ f_i P_i = 1.
    ids = torch.arange(tokens * top_k).remainder(experts).view(1, tokens, top_k)
    uniform = torch.full((1, tokens, experts), 0.5)
    assert float(balance.sequence_balance_loss(uniform, ids, 0.1)) == pytest.approx(0.1)
    # Every token on experts 0 and 1, which also hold most of the affinity: far larger.
    skewed_ids = torch.tensor([0, 1]).expand(1, tokens, top_k)
    skewed = torch.full((1, tokens, experts), 0.01)
    skewed[..., :2] = 0.9
    skewed.requires_grad_(True)
    loss = balance.sequence_balance_loss(skewed, skewed_ids, 0.1)
    assert float(loss.detach()) > 3 * 0.1
    loss.backward()
    assert skewed.grad is not None and skewed.grad[..., :2].sum() > 0  # lowering them lowers the loss


def test_bias_update_moves_routing_towards_balance(model: DeepseekV3) -> None:
    gates = [moe.gate for moe in balance.moe_layers(model)]
    saved = [g.e_score_correction_bias.clone() for g in gates]
    tokens = torch.randint(2, 1000, (4, 32), generator=torch.Generator().manual_seed(2))

    def imbalance() -> float:
        balance.start_counting(model)
        with torch.no_grad():
            forward.forward(model, tokens)
        loads = torch.stack([m.load for m in balance.moe_layers(model) if m.load is not None]).float()
        return float((loads.max(1).values / loads.mean(1)).mean())

    try:
        for g in gates:  # experts 0–3 start heavily favoured
            g.e_score_correction_bias.zero_()[:4] = 0.5
        before = imbalance()
        balance.start_counting(model)
        with torch.no_grad():
            forward.forward(model, tokens)
        counted = [m.load.clone() for m in balance.moe_layers(model) if m.load is not None]
        loads = balance.update_bias(model, 0.01)
        assert torch.equal(loads, torch.stack(counted))
        for g, load in zip(gates, loads, strict=True):
            over = load.float() > load.float().mean()
            assert (g.e_score_correction_bias[over] < 0.5).all()  # over-loaded: lowered by 0.01
            assert (g.e_score_correction_bias[~over & (load.float() < load.float().mean())] > -1e-9).all()
        for _ in range(40):
            balance.start_counting(model)
            with torch.no_grad():
                forward.forward(model, tokens)
            balance.update_bias(model, 0.05)
        after = imbalance()
        assert before > 2.5 and after < 0.6 * before, (before, after)
    finally:
        for g, bias in zip(gates, saved, strict=True):
            g.e_score_correction_bias.copy_(bias)
        for moe in balance.moe_layers(model):
            moe.load = None
