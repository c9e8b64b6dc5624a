"""Double backward through ``HighwayGRU`` / ``HighwayLSTM``: a backward that creates a graph is exact.

A backward with ``create_graph=True`` (gradient penalties, WGAN-GP, Hessian-vector products) runs torch's own
differentiable recurrence, so what it returns equals ``nn.GRU`` / ``nn.LSTM`` autograd's at every k, and every
later backward through the same forward is exact too, so ``(o.pow(2).sum() + 10 * gx.pow(2).sum()).backward()``
equals torch's module. A forward whose graph is never differentiated with create_graph stays Highway-BP(k). Every
check is in float64 against torch's module with the same weights; 1e-10 relative is far below any dropped or wrong
term (the penalty's contribution is O(1) of the total in these set-ups) and far above rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_hwbp.rnn import HighwayGRU, HighwayLSTM

pytestmark = pytest.mark.usefixtures("float64_default")

STEPS, BATCH, INPUT, HIDDEN = 6, 2, 3, 4
RTOL = 1e-10
CELLS = {"gru": (nn.GRU, HighwayGRU.from_gru), "lstm": (nn.LSTM, HighwayLSTM.from_lstm)}
SHAPES = [(1, False), (2, False), (1, True), (2, True)]  # (num_layers, bidirectional)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def pair(cell: str, layers: int, bidirectional: bool, k: int, **kwargs):
    torch.manual_seed(0)
    base, convert = CELLS[cell]
    reference = base(INPUT, HIDDEN, num_layers=layers, bidirectional=bidirectional, **kwargs)
    return reference, convert(reference, k=k)


def inputs(batch_first: bool = False) -> torch.Tensor:
    shape = (BATCH, STEPS, INPUT) if batch_first else (STEPS, BATCH, INPUT)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)


def grads_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
    return torch.cat([g.flatten() for g in parts] + [x.grad.flatten()])


def penalty_step(module: nn.Module, with_loss: bool, batch_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reproduction: gx = d(sum o)/dx with a graph, then (o^2 + 10 |gx|^2).backward(); returns (gx, grads)."""
    module.zero_grad(set_to_none=True)
    x = inputs(batch_first)
    out, _ = module(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    loss = 10 * gx.pow(2).sum() + (out.pow(2).sum() if with_loss else 0)
    loss.backward()
    return gx.detach(), grads_of(module, x)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("layers,bidirectional", SHAPES)
@pytest.mark.parametrize("k", [0, 1])
def test_penalty_is_exact_at_every_k(cell, layers, bidirectional, k):
    reference, highway = pair(cell, layers, bidirectional, k)
    gx_ref, grads_ref = penalty_step(reference, with_loss=False)
    gx, grads = penalty_step(highway, with_loss=False)
    assert rel_err(gx, gx_ref) < RTOL  # the first-order gradient of a graph-creating backward is exact
    assert rel_err(grads, grads_ref) < RTOL  # and so are the second-order terms
    assert grads_ref.norm() > 1  # the check has something to compare (the penalty is not ~0)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("layers,bidirectional", SHAPES)
@pytest.mark.parametrize("k", [0, 1])
def test_reproduction_penalty_plus_loss(cell, layers, bidirectional, k):
    """(o^2 + 10 |gx|^2).backward() equals torch's; the same module's next plain step is Highway-BP(k) again."""
    reference, highway = pair(cell, layers, bidirectional, k=k)
    _, total_ref = penalty_step(reference, with_loss=True)
    _, total = penalty_step(highway, with_loss=True)
    assert rel_err(total, total_ref) < RTOL
    assert highway.last_iterations == [STEPS] * layers * (2 if bidirectional else 1)  # exact: T per layer

    def plain_step(module):
        module.zero_grad(set_to_none=True)
        x = inputs()
        module(x)[0].pow(2).sum().backward()
        return grads_of(module, x)

    assert rel_err(plain_step(highway), plain_step(reference)) > 1e-6  # a new forward: Highway-BP(k) again
    assert highway.last_iterations == [k] * layers * (2 if bidirectional else 1)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_grad_of_parameters_with_create_graph(cell, layers, bidirectional):
    """torch.autograd.grad w.r.t. the parameters with create_graph=True, then a penalty on those gradients (with
    given initial states that require grad and batch_first input)."""
    found = []
    for module in pair(cell, layers, bidirectional, k=1, batch_first=True):
        x = inputs(batch_first=True)
        shape = (layers * (2 if bidirectional else 1), BATCH, HIDDEN)
        gen = torch.Generator().manual_seed(2)
        states = [torch.randn(shape, generator=gen).requires_grad_(True) for _ in range(2 if cell == "lstm" else 1)]
        out, _ = module(x, tuple(states) if cell == "lstm" else states[0])
        params = list(module.parameters())
        first = torch.autograd.grad((out * out.detach().sin()).sum(), params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        second = torch.autograd.grad(penalty, [x, *states, *params])
        found.append(torch.cat([g.flatten() for g in (*first, *second)]))
    assert rel_err(found[1], found[0]) < RTOL


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_float32_double_backward_runs_and_matches(cell):
    """In float32 (where nn.LSTM runs oneDNN's fused kernel on CPU) the graph-creating backward still works."""
    reference, highway = pair(cell, 1, False, k=1)
    _, grads_ref = penalty_step(reference, with_loss=False)
    highway.float()
    x = inputs().detach().float().requires_grad_(True)
    out, _ = highway(x)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    (10 * gx.pow(2).sum()).backward()
    assert rel_err(grads_of(highway, x).double(), grads_ref) < 1e-5  # float32 rounding over a few steps
