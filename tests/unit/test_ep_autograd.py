"""The differentiable dispatch/combine pair across processes (gloo on CPU; NCCL where two GPUs
are visible): outputs and gradients equal a one-process reference of the same mixture of experts,
and agree with finite differences of the distributed loss."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fireflyer.kernels import ep_autograd
from fireflyer.kernels.ep import Dispatcher
from fireflyer.workloads.process_exit import exit_process
from tests.ports import free_port

HIDDEN = 16
TOKENS = 10
EXPERTS = 4
TOP_K = 2


def _worker(
    rank: int, world: int, port: int, backend: str, body: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        body(rank, world, device, *args)
    finally:
        dist.destroy_process_group()
    exit_process(0)  # no interpreter teardown after gloo collectives (see process_exit)


def _spawn(world: int, backend: str, body: Callable[..., None], *args: Any) -> None:
    mp.spawn(_worker, args=(world, free_port(), backend, body, args), nprocs=world, join=True)


def _inputs(rank: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens, choices (some −1), weights and output cotangent: any process can
    rebuild any rank's."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, HIDDEN, generator=g)
    idx = torch.rand(tokens, EXPERTS, generator=g).topk(TOP_K, dim=1).indices
    idx[::4, -1] = -1
    weights = torch.rand(tokens, TOP_K, generator=g)
    cotangent = torch.randn(tokens, HIDDEN, generator=g)
    return x, idx, weights, cotangent


def _expert_weights() -> torch.Tensor:
    return torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(7)) / HIDDEN**0.5


def _mixture(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    """The reference: Σ_k weights[t, k] · x[t] @ experts[idx[t, k]] on one process."""
    out = torch.zeros_like(x)
    for k in range(idx.shape[1]):
        chosen = idx[:, k] >= 0
        per = torch.einsum("th,thg->tg", x, experts[idx[:, k].clamp(min=0)])
        out = out + torch.where(chosen[:, None], per * weights[:, k : k + 1], 0.0)
    return out


def _distributed_loss(
    dispatcher: Dispatcher,
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    local: torch.Tensor,
    cotangent: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    entries, entry_weights, routing = ep_autograd.dispatch(dispatcher, x, idx, weights)
    assert routing.tokens_per_expert is not None
    outs = [chunk @ local[e] for e, chunk in enumerate(entries.split(routing.tokens_per_expert.tolist()))]
    y = ep_autograd.combine(torch.cat(outs) * entry_weights[:, None], routing)
    return y, (y * cotangent).sum()


def _check_against_reference(rank: int, world: int, device: torch.device, tokens_of: list[int]) -> None:
    per_rank = EXPERTS // world
    experts = _expert_weights()
    dispatcher = Dispatcher(
        dist.group.WORLD, HIDDEN, max(tokens_of), EXPERTS, transport="portable", device=device
    )
    x, idx, weights, cotangent = (t.to(device) for t in _inputs(rank, tokens_of[rank]))
    x.requires_grad_(True)
    weights.requires_grad_(True)
    local = experts[rank * per_rank : (rank + 1) * per_rank].to(device).requires_grad_(True)
    y, loss = _distributed_loss(dispatcher, x, idx, weights, local, cotangent)
    loss.backward()

    # One process, every rank's tokens, all experts.
    ref_experts = experts.clone().requires_grad_(True)
    ref_total = torch.zeros(())
    mine: dict[str, torch.Tensor] = {}
    for r in range(world):
        rx, ridx, rw, rc = _inputs(r, tokens_of[r])
        rx.requires_grad_(True)
        rw.requires_grad_(True)
        ry = _mixture(rx, ridx, rw, ref_experts)
        ref_total = ref_total + (ry * rc).sum()
        if r == rank:
            mine = {"x": rx, "w": rw, "y": ry}
    ref_total.backward()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.detach().cpu(), mine["y"].detach(), **tol)
    assert x.grad is not None and weights.grad is not None and local.grad is not None
    assert mine["x"].grad is not None and mine["w"].grad is not None and ref_experts.grad is not None
    torch.testing.assert_close(x.grad.cpu(), mine["x"].grad, **tol)
    torch.testing.assert_close(weights.grad.cpu(), mine["w"].grad, **tol)
    torch.testing.assert_close(
        local.grad.cpu(), ref_experts.grad[rank * per_rank : (rank + 1) * per_rank], **tol
    )

    # Finite differences of the loss summed over ranks, one coordinate of each rank's inputs.
    def world_loss(dx: float, dw: float, owner: int) -> float:
        with torch.no_grad():
            px, pw = x.detach().clone(), weights.detach().clone()
            if rank == owner and tokens_of[rank]:
                px[0, 3] += dx
                pw[0, 0] += dw
            _, value = _distributed_loss(dispatcher, px, idx, pw, local.detach(), cotangent)
            total = value.detach().double().reshape(1).clone()
            dist.all_reduce(total)
            return float(total)

    eps = 1e-2
    for owner in range(world):
        if not tokens_of[owner]:
            continue
        fd_x = (world_loss(eps, 0, owner) - world_loss(-eps, 0, owner)) / (2 * eps)
        fd_w = (world_loss(0, eps, owner) - world_loss(0, -eps, owner)) / (2 * eps)
        if rank == owner:
            assert fd_x == pytest.approx(float(x.grad[0, 3]), rel=1e-3, abs=1e-3)
            assert fd_w == pytest.approx(float(weights.grad[0, 0]), rel=1e-3, abs=1e-3)


BACKENDS = [
    "gloo",
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
    ),
]


def _all_checks(rank: int, world: int, device: torch.device) -> None:
    _check_against_reference(rank, world, device, [TOKENS, TOKENS - 3])
    _check_against_reference(rank, world, device, [TOKENS, 0])  # a rank without tokens takes part
    low_latency = Dispatcher(
        dist.group.WORLD, HIDDEN, TOKENS, EXPERTS, mode="low_latency", transport="portable", device=device
    )
    x, idx, weights, _ = (t.to(device) for t in _inputs(rank, TOKENS))
    with pytest.raises(ValueError, match="normal-mode Dispatcher"):
        ep_autograd.dispatch(low_latency, x, idx, weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_one_process_and_finite_differences(backend: str) -> None:
    _spawn(2, backend, _all_checks)
