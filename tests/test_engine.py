"""The engine on a plain stack of residual MLPs, against Theorems 1 and 2 computed from explicit Jacobians."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import hf_hwbp
from hf_hwbp.engine import RecordedStack, ResidualScan, highway_backward, run_recursion

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.usefixtures("engine_at_exact_steps")]


WIDTH = 5
DEPTH = 5


class ResidualMLP(nn.Module):
    """h -> h + W2 tanh(W1 h + b1): a residual block with a non-trivial Jacobian."""

    def __init__(self, width: int):
        super().__init__()
        self.inner = nn.Linear(width, 2 * width)
        self.outer = nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.outer(torch.tanh(self.inner(h)))


class Stack(nn.Module):
    def __init__(self, depth: int = DEPTH, width: int = WIDTH):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.layers = nn.ModuleList([ResidualMLP(width) for _ in range(depth)])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(torch.tanh(h)).pow(2).sum()


def _states(stack: Stack, x: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L of one unbatched input (a vector each)."""
    with torch.no_grad():
        h = stack.embed(x)
        states = [h]
        for layer in stack.layers:
            h = layer(h)
            states.append(h)
    return states


def _jacobians_of_g(stack: Stack, states: list[torch.Tensor]) -> list[torch.Tensor]:
    """J_j = dg_j/dh at h_{j-1}, as explicit matrices, j = 1..L (index 0 is unused)."""
    jac = [None]
    for j, layer in enumerate(stack.layers, start=1):
        full = torch.autograd.functional.jacobian(layer, states[j - 1])
        jac.append(full - torch.eye(full.shape[0]))
    return jac


def _output_grad(stack: Stack, h_last: torch.Tensor) -> torch.Tensor:
    h = h_last.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(stack.head(torch.tanh(h)).pow(2).sum(), h)
    return d


def _path_sum(jac: list, d: torch.Tensor, i: int, k: int, depth: int) -> torch.Tensor:
    """Theorem 1: the sum over paths from h_L down to h_i crossing at most k blocks."""
    total = torch.zeros_like(d)
    blocks = range(i + 1, depth + 1)
    for m in range(0, min(k, depth - i) + 1):
        for crossed in itertools.combinations(blocks, m):
            v = d
            for j in reversed(crossed):  # the gradient goes through the top block first
                v = jac[j].T @ v
            total = total + v
    return total


def _recursion(jac: list, d: torch.Tensor, k: int, depth: int) -> list[torch.Tensor]:
    """Theorem 2 written out with matrices: delta^(n+1)_i = d + sum_{j>i} J_j^T delta^(n)_j."""
    delta = [d.clone() for _ in range(depth + 1)]
    for _ in range(k):
        delta = [
            d + sum((jac[j].T @ delta[j] for j in range(i + 1, depth + 1)), torch.zeros_like(d)) for i in range(depth)
        ] + [d]
    return delta


def _engine_block_grads(stack: Stack, x: torch.Tensor, k: int, patch_k: bool = False):
    """Run the patched stack and return (delta_0 via the embedding grad, per-block deltas)."""
    hf_hwbp.patch_model(stack, k=k, layers=stack.layers)
    hf_hwbp.highway_state(stack).keep_block_grads = True
    stack.zero_grad()
    stack(x).backward()
    return hf_hwbp.highway_state(stack).last_block_grads


@pytest.fixture()
def stack_and_input():
    torch.manual_seed(0)
    return Stack(), torch.randn(3)


@pytest.mark.parametrize("k", range(DEPTH + 2))
def test_theorem1_path_sum_equals_highway(stack_and_input, k):
    stack, x = stack_and_input
    states = _states(stack, x)
    jac = _jacobians_of_g(stack, states)
    d = _output_grad(stack, states[-1])
    block_grads = _engine_block_grads(stack, x, k)
    for j in range(1, DEPTH + 1):
        expected = _path_sum(jac, d, j, k, DEPTH)
        torch.testing.assert_close(block_grads[j - 1], expected, rtol=1e-12, atol=1e-14)
    # delta^(k)_0 reaches the embedding: its weight gradient is outer(delta_0, x).
    delta0 = _path_sum(jac, d, 0, k, DEPTH)
    torch.testing.assert_close(stack.embed.bias.grad, delta0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stack.embed.weight.grad, torch.outer(delta0, x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("k", range(DEPTH + 1))
def test_theorem2_recursion_and_parameter_gradients(stack_and_input, k):
    stack, x = stack_and_input
    states = _states(stack, x)
    jac = _jacobians_of_g(stack, states)
    d = _output_grad(stack, states[-1])
    delta = _recursion(jac, d, k, DEPTH)
    _engine_block_grads(stack, x, k)
    assert hf_hwbp.last_highway_iterations(stack) == min(k, DEPTH)
    for j, layer in enumerate(stack.layers, start=1):
        # (dg_j/dtheta_j)^T delta_j, from an independent forward of the block alone.
        with hf_hwbp.exact_backprop(stack):
            out = layer(states[j - 1])
        expected = torch.autograd.grad(out, list(layer.parameters()), delta[j])
        for p, e in zip(layer.parameters(), expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    assert hf_hwbp.last_highway_iterations(stack) is None  # that forward under exact_backprop ran no Highway-BP


def test_exact_at_k_ge_L_against_autograd(stack_and_input):
    stack, x = stack_and_input
    stack(x).backward()
    exact = [p.grad.clone() for p in stack.parameters()]
    for k in (DEPTH, DEPTH + 3):
        _engine_block_grads(stack, x, k)
        for p, e in zip(stack.parameters(), exact):
            assert (p.grad - e).norm() <= 1e-12 * e.norm()


def test_iterations_are_clamped_to_number_of_blocks(stack_and_input):
    stack, x = stack_and_input
    _engine_block_grads(stack, x, 100)
    assert hf_hwbp.last_highway_iterations(stack) == DEPTH
    assert hf_hwbp.highway_state(stack).effective_k == DEPTH


def test_intermediate_losses_follow_the_intermediate_form():
    """A loss on h_j adds e_j to delta^(0)_i for i <= j (docs/algorithm.md, intermediate losses)."""
    torch.manual_seed(1)
    stack, x = Stack(), torch.randn(3)
    states = _states(stack, x)
    jac = _jacobians_of_g(stack, states)
    d = _output_grad(stack, states[-1])
    e = {1: 2 * states[1], 3: 2 * states[3]}  # d/dh of sum(h^2) at h_1 and h_3

    def loss_with_intermediates(model):
        h = model.embed(x)
        total = 0
        for j, layer in enumerate(model.layers, start=1):
            h = layer(h)
            if j in e:
                total = total + h.pow(2).sum()
        return total + model.head(torch.tanh(h)).pow(2).sum()

    for k in range(DEPTH + 1):
        base = [d + sum((e[j] for j in e if j >= i), torch.zeros_like(d)) for i in range(DEPTH + 1)]
        delta = [b.clone() for b in base]
        for _ in range(k):
            delta = [
                base[i] + sum((jac[j].T @ delta[j] for j in range(i + 1, DEPTH + 1)), torch.zeros_like(d))
                for i in range(DEPTH)
            ] + [base[DEPTH]]
        hf_hwbp.patch_model(stack, k=k, layers=stack.layers)
        stack.zero_grad()
        loss_with_intermediates(stack).backward()
        torch.testing.assert_close(stack.embed.bias.grad, delta[0], rtol=1e-12, atol=1e-14)
        for j, layer in enumerate(stack.layers, start=1):
            with hf_hwbp.exact_backprop(stack):
                out = layer(states[j - 1])
            expected = torch.autograd.grad(out, list(layer.parameters()), delta[j])
            for p, g in zip(layer.parameters(), expected):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("group_size", [2, 3])
def test_groups_are_exact_inside_and_highway_across(group_size):
    """Groups of G layers: Theorem 2 over group Jacobians (products of the layers' I + J)."""
    torch.manual_seed(2)
    stack, x = Stack(depth=6), torch.randn(3)
    states = _states(stack, x)
    d = _output_grad(stack, states[-1])
    starts = list(range(0, 6, group_size))
    groups = [nn.Sequential(*stack.layers[s : s + group_size]) for s in starts]
    group_in = [states[s] for s in starts]
    jac = [None] + [torch.autograd.functional.jacobian(g, h) - torch.eye(WIDTH) for g, h in zip(groups, group_in)]
    num_groups = len(groups)
    for k in range(num_groups + 1):
        delta = _recursion(jac, d, k, num_groups)
        hf_hwbp.patch_model(stack, k=k, layers=stack.layers, group_size=group_size)
        stack.zero_grad()
        stack(x).backward()
        torch.testing.assert_close(stack.embed.bias.grad, delta[0], rtol=1e-12, atol=1e-14)
        for b, (g, h) in enumerate(zip(groups, group_in), start=1):
            with hf_hwbp.exact_backprop(stack):
                out = g(h)
            expected = torch.autograd.grad(out, list(g.parameters()), delta[b])
            for p, e in zip(g.parameters(), expected):
                torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)


def test_tolerance_stops_early_and_matches_fixed_k(stack_and_input):
    stack, x = stack_and_input
    hf_hwbp.patch_model(stack, k=DEPTH, layers=stack.layers, tol=1e-1)
    stack.zero_grad()
    stack(x).backward()
    ran = hf_hwbp.last_highway_iterations(stack)
    assert 1 <= ran < DEPTH
    adaptive = [p.grad.clone() for p in stack.parameters()]
    hf_hwbp.patch_model(stack, k=ran, layers=stack.layers, tol=None)
    stack.zero_grad()
    stack(x).backward()
    for p, a in zip(stack.parameters(), adaptive):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)
    hf_hwbp.patch_model(stack, k=DEPTH, layers=stack.layers, tol=1e-14)
    stack.zero_grad()
    stack(x).backward()
    assert hf_hwbp.last_highway_iterations(stack) == DEPTH


def test_highway_backward_direct_call_matches_recursion(stack_and_input):
    """The engine's functional entry point on hand-recorded blocks (no patching)."""
    stack, x = stack_and_input
    states = _states(stack, x)
    jac = _jacobians_of_g(stack, states)
    d = _output_grad(stack, states[-1])
    inputs = [s.clone().requires_grad_(True) for s in states[:-1]]
    outputs = [layer(h) for layer, h in zip(stack.layers, inputs)]  # the stack is not patched here
    result = highway_backward(inputs, outputs, list(stack.layers.parameters()), d, k=2, keep_block_grads=True)
    delta = _recursion(jac, d, 2, DEPTH)
    torch.testing.assert_close(result.input_grad, delta[0], rtol=1e-12, atol=1e-14)
    for j in range(1, DEPTH + 1):
        torch.testing.assert_close(result.block_grads[j - 1], delta[j], rtol=1e-12, atol=1e-14)
    assert result.iterations == 2


class _CountingStack(RecordedStack):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.vjp_calls: list[int] = []

    def input_vjp(self, local_index, grad):
        self.vjp_calls.append(local_index + 1)
        return super().input_vjp(local_index, grad)


@pytest.mark.parametrize("need_input_grad", [True, False])
def test_final_deltas_reuse_their_vjp(stack_and_input, need_input_grad):
    """delta^(n)_j is final once n >= L - j: its VJP is computed once, and k = L stays exact."""
    stack, x = stack_and_input
    states = _states(stack, x)
    jac = _jacobians_of_g(stack, states)
    d = _output_grad(stack, states[-1])
    inputs = [s.clone().requires_grad_(True) for s in states[:-1]]
    outputs = [layer(h) for layer, h in zip(stack.layers, inputs)]
    recorded = _CountingStack(inputs, outputs, d, need_input_grad=need_input_grad)
    delta, ran = run_recursion(recorded, DEPTH)
    assert ran == DEPTH
    # Iteration n (0-based) needs fresh VJPs for blocks 1..L-n only; block 1 only when delta_0 is wanted.
    lowest = 1 if need_input_grad else 2
    expected_calls = sorted(j for n in range(DEPTH) for j in range(lowest, DEPTH - n + 1))
    assert sorted(recorded.vjp_calls) == expected_calls
    exact = _recursion(jac, d, DEPTH, DEPTH)
    for j in range(0 if need_input_grad else 1, DEPTH + 1):
        torch.testing.assert_close(delta[j], exact[j], rtol=1e-12, atol=1e-14)


def test_residual_scan_is_a_reverse_cumulative_sum():
    top = torch.tensor([1.0])
    inflow = [torch.tensor([2.0]), None, torch.tensor([4.0])]
    out = ResidualScan()(top, inflow)
    assert [float(t) for t in out] == [7.0, 5.0, 5.0, 1.0]


def test_gated_residual_paths_follow_the_definition():
    """Blocks relu(h + g(h)): R_j = diag(a_j) with a_j = relu'(...) held fixed, J_j = df_j/dh - R_j, and
    delta^(n+1)_{i-1} = R_i^T delta^(n+1)_i + J_i^T delta^(n)_i (docs/algorithm.md), written with matrices."""
    torch.manual_seed(3)
    blocks = [ResidualMLP(WIDTH) for _ in range(DEPTH)]
    h = torch.randn(WIDTH)
    states, gates = [h], []
    for block in blocks:
        pre = block(states[-1]).detach()
        gates.append((pre > 0).to(pre.dtype))
        states.append(torch.relu(pre))
    full = [torch.autograd.functional.jacobian(lambda x, b=b: torch.relu(b(x)), s) for b, s in zip(blocks, states)]
    residual = [torch.diag(a) for a in gates]
    crossing = [f - r for f, r in zip(full, residual)]  # J_j
    d = torch.randn(WIDTH)
    inputs = [s.clone().requires_grad_(True) for s in states[:-1]]
    outputs = [torch.relu(b(x)) for b, x in zip(blocks, inputs)]
    for k in range(DEPTH + 1):
        delta = [None] * DEPTH + [d]
        for i in range(DEPTH - 1, -1, -1):  # delta^(0): d carried down the gated residual path
            delta[i] = residual[i].T @ delta[i + 1]
        for _ in range(k):
            new = [None] * DEPTH + [d]
            for i in range(DEPTH - 1, -1, -1):
                new[i] = residual[i].T @ new[i + 1] + crossing[i].T @ delta[i + 1]
            delta = new
        result = highway_backward(inputs, outputs, [], d, k=k, keep_block_grads=True, residual_gates=gates)
        torch.testing.assert_close(result.input_grad, delta[0], rtol=1e-12, atol=1e-14)
        for j in range(1, DEPTH + 1):
            torch.testing.assert_close(result.block_grads[j - 1], delta[j], rtol=1e-12, atol=1e-14)
    exact = d
    for f in reversed(full):
        exact = f.T @ exact
    torch.testing.assert_close(result.input_grad, exact, rtol=1e-12, atol=1e-14)  # k = L is exact backprop
