"""Learning-rate schedule, clipping, the trainable set and AdamW state by parameter name."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fireflyer.workloads.train import optim


def test_warmup_then_cosine_to_the_floor() -> None:
    s = optim.LRSchedule(peak=1e-3, warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1e-4)
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert s(110) == pytest.approx(1e-4)
    assert s(500) == pytest.approx(1e-4)  # past the end: the floor
    decay = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert optim.LRSchedule(1.0, 0, 10)(0) == 1.0  # no warmup


def test_schedule_is_a_pure_function_of_the_step() -> None:
    a, b = optim.LRSchedule(3e-4, 5, 50), optim.LRSchedule(3e-4, 5, 50)
    assert [a(i) for i in range(60)] == [b(i) for i in reversed(range(60))][::-1]


def test_clipping_scales_to_the_max_norm() -> None:
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    p.grad, q.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = optim.clip_gradients([p, q], 1.0)
    assert norm == pytest.approx(math.sqrt(27 + 64))
    total = torch.cat([p.grad, q.grad]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-5)
    assert optim.clip_gradients([p, q], 0.0) == pytest.approx(1.0, rel=1e-5)  # 0: measure only


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(4), requires_grad=False)


def test_trainable_set_and_optimizer_state_round_trip() -> None:
    torch.manual_seed(0)
    model = Tiny()
    named = optim.trainable_parameters(model)
    assert [n for n, _ in named] == ["proj.weight", "proj.bias"]
    opt = optim.build_optimizer(named, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    model.proj(torch.ones(2, 4)).sum().backward()
    opt.step()
    saved = optim.optimizer_state(opt, named)
    assert set(saved) == {"proj.weight", "proj.bias"}
    assert set(saved["proj.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = optim.build_optimizer(named, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optim.load_optimizer_state(fresh, named, saved)
    assert torch.equal(fresh.state[model.proj.weight]["exp_avg"], opt.state[model.proj.weight]["exp_avg"])


def test_fp8_or_bf16_weights_are_refused() -> None:
    model = Tiny().to(torch.bfloat16)
    with pytest.raises(optim.OptimError, match="training needs a BF16 or FP32 checkpoint"):
        optim.trainable_parameters(model)


def test_compute_dtype_defaults() -> None:
    assert optim.compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert optim.compute_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert optim.compute_dtype("bf16", torch.device("cpu")) == torch.bfloat16
