"""HighwayGRU against torch.nn.GRU autograd (exact at k >= T) and against Highway-BP(k) through time written out.

The independent reference below shares no code with hf_hwbp: it re-implements the GRU step from torch's documented
formula, takes each step's full Jacobian dh_t/dh_{t-1} with autograd, splits it into the highway R_t = diag(z_t)
and the rest J_t, and evaluates the recursion of docs/algorithm.md ("Residual paths that are not the identity")
literally, one time step at a time:

    delta^(0):   delta_T = d,  delta_{t-1} = e_{t-1} + R_t^T delta_t
    delta^(n+1): delta_T = d,  delta_{t-1} = e_{t-1} + R_t^T delta^(n+1)_t + J_t^T delta^(n)_t

then gives every step's parameters and input (dh_t/dtheta)^T delta^(k)_t and the initial state delta^(k)_0.
Several layers are stacks in sequence: what a layer sends into its input sequence is the e of the layer below.

Tolerances: float64 throughout; the two computations differ only by rounding (~1e-16 per operation over a few
hundred operations), so 1e-10 relative leaves a wide margin and still catches any wrong term (which is O(1)).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from hf_hwbp.rnn import HighwayGRU
from hf_hwbp.rnn.scan import ReverseLinearScan

pytestmark = pytest.mark.usefixtures("float64_default")


BATCH, INPUT, HIDDEN = 2, 3, 4
RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----- the independent reference -------------------------------------------------------------------------------
def reference_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """One GRU step from torch.nn.GRU's documented formula; returns (h_t, z_t)."""
    gi = x @ w_ih.T + (0 if b_ih is None else b_ih)
    gh = h @ w_hh.T + (0 if b_hh is None else b_hh)
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, z


def reference_layer_grads(x, h0, weights, e, d, k):
    """Highway-BP(k) through one layer, time-major x [T, B, I]: (x grad, h0 grad, weight grads)."""
    steps = x.shape[0]
    states, gates = [h0], []
    with torch.no_grad():
        for t in range(steps):
            h, z = reference_cell(x[t], states[-1], *weights)
            states.append(h)
            gates.append(z)
    # J_t^T v for every step: the full Jacobian of the step minus its highway diag(z_t), per batch row.
    jacobians = []
    for t in range(steps):
        rows = []
        for b in range(x.shape[1]):
            step = lambda h, b=b, t=t: reference_cell(x[t, b], h, *weights)[0]  # noqa: E731
            full = torch.autograd.functional.jacobian(step, states[t][b])  # [H_out, H_in]
            rows.append(full - torch.diag(gates[t][b]))
        jacobians.append(torch.stack(rows))  # [B, H, H]

    def highway(t, v):  # R_t^T v (t = 1..T)
        return gates[t - 1] * v

    def through_gates(t, v):  # J_t^T v
        return torch.einsum("boi,bo->bi", jacobians[t - 1], v)

    delta = [None] * (steps + 1)
    delta[steps] = d
    for t in range(steps, 0, -1):
        delta[t - 1] = e[t - 1] + highway(t, delta[t])
    for _ in range(min(k, steps)):
        new = [None] * (steps + 1)
        new[steps] = d
        for t in range(steps, 0, -1):
            new[t - 1] = e[t - 1] + highway(t, new[t]) + through_gates(t, delta[t])
        delta = new
    # Every step's local VJP with delta_t, with respect to its input and the weights (h_{t-1} held fixed).
    params = [w.detach().clone().requires_grad_(True) if w is not None else None for w in weights]
    used = [p for p in params if p is not None]
    grad_x = torch.zeros_like(x)
    grads = [torch.zeros_like(p) for p in used]
    for t in range(steps):
        xt = x[t].detach().clone().requires_grad_(True)
        h, _ = reference_cell(xt, states[t], *params)
        out = torch.autograd.grad(h, [xt, *used], delta[t + 1])
        grad_x[t] = out[0]
        grads = [g + o for g, o in zip(grads, out[1:])]
    return grad_x, delta[0], grads


def reference_highway_grads(gru: nn.GRU, x, h0, loss_of, k):
    """Highway-BP(k) of a (possibly multi-layer, unidirectional, time-major, dropout-free) GRU, by name."""
    layers = gru.num_layers
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if gru.bias else [])
    weights = [[getattr(gru, f"{n}_l{i}").detach() for n in names] for i in range(layers)]
    weights = [w if gru.bias else w + [None, None] for w in weights]
    # The forward, layer by layer, on leaves: the loss's gradients at every layer's outputs and last state.
    inputs, outputs = [x], []
    with torch.no_grad():
        for i in range(layers):
            h, seq = h0[i], []
            for t in range(x.shape[0]):
                h, _ = reference_cell(inputs[-1][t], h, *weights[i])
                seq.append(h)
            outputs.append(torch.stack(seq))
            inputs.append(outputs[-1])
    top = outputs[-1].clone().requires_grad_(True)
    finals = torch.stack([o[-1] for o in outputs]).requires_grad_(True)
    grad_top, grad_finals = torch.autograd.grad(loss_of(top, finals), [top, finals], allow_unused=True)
    grad_top = torch.zeros_like(top) if grad_top is None else grad_top
    grad_finals = torch.zeros_like(finals) if grad_finals is None else grad_finals
    result, grad_h0 = {}, torch.zeros_like(h0)
    from_above = grad_top  # dloss/d(outputs of the current layer), from the loss or the layer above
    for i in range(layers - 1, -1, -1):
        e = [torch.zeros_like(h0[i])] + list(from_above[:-1])  # e_0 = 0, e_t = grad of output t (t < T)
        d = from_above[-1] + grad_finals[i]
        grad_in, grad_h0[i], grads = reference_layer_grads(inputs[i], h0[i], weights[i], e, d, k)
        for n, g in zip(names, grads):
            result[f"{n}_l{i}"] = g
        from_above = grad_in
    result["input"] = from_above
    result["h0"] = grad_h0
    return result


# ----- helpers -------------------------------------------------------------------------------------------------
def make_pair(num_layers=1, batch_first=False, bias=True, bidirectional=False, dropout=0.0, seed=0, k=2):
    torch.manual_seed(seed)
    gru = nn.GRU(INPUT, HIDDEN, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                 dropout=dropout)  # fmt: skip
    highway = HighwayGRU(INPUT, HIDDEN, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                         dropout=dropout, k=k)  # fmt: skip
    highway.load_state_dict(gru.state_dict())
    return gru, highway


def make_inputs(steps, batch_first, states, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, steps, INPUT) if batch_first else (steps, BATCH, INPUT)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    h0 = torch.randn(states, BATCH, HIDDEN, generator=gen).requires_grad_(True)
    return x, h0


def loss_every_step(out, h_n):
    """A loss on every step's output (intermediate losses) and on the last states."""
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    return (out * weights).sum() + (out**2).sum() + 0.5 * (h_n**3).sum()


def loss_linear_outputs(out, h_n):
    """Only linear in the outputs: with batch_first, the gradient reaching the layer is a transposed tensor."""
    return (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum()


def loss_last_state(out, h_n):
    return (h_n[-1] * torch.linspace(1, 2, h_n[-1].numel()).view_as(h_n[-1])).sum() + (h_n[-1] ** 2).sum()


def grads_of(module, x, h0, loss_fn, with_state=True):
    out, h_n = module(x, h0) if with_state else module(x)
    tensors = [x, *module.parameters()] + ([h0] if with_state else [])
    return torch.autograd.grad(loss_fn(out, h_n), tensors)


# ----- exact at k >= T -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 5, 16])  # 16: chunks of 4, no remainder; 5: a remainder
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("loss_fn", [loss_every_step, loss_linear_outputs, loss_last_state])
def test_exact_at_k_ge_T(steps, num_layers, batch_first, with_state, loss_fn):
    gru, highway = make_pair(num_layers, batch_first, k=steps)
    x, h0 = make_inputs(steps, batch_first, num_layers)
    expected = grads_of(gru, x, h0, loss_fn, with_state)
    got = grads_of(highway, x, h0, loss_fn, with_state)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= RTOL
    assert highway.last_iterations == [steps] * num_layers  # k is clamped to T: T iterations ran


@pytest.mark.parametrize(
    "options",
    [dict(bias=False), dict(bidirectional=True), dict(bidirectional=True, num_layers=2, batch_first=True)],
    ids=["no-bias", "bidirectional", "bidirectional-2-layers"],
)
def test_exact_other_configurations(options):
    steps = 6
    gru, highway = make_pair(k=steps + 3, **options)  # k > T: clamped, still exact
    states = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    x, h0 = make_inputs(steps, options.get("batch_first", False), states)
    for a, b in zip(grads_of(highway, x, h0, loss_every_step), grads_of(gru, x, h0, loss_every_step)):
        assert rel_err(a, b) <= RTOL


def test_exact_with_dropout_between_layers():
    """Training-mode dropout between layers: on CPU the masks are nn.GRU's for the same seed."""
    steps = 7
    gru, highway = make_pair(num_layers=3, dropout=0.4, k=steps)
    x, h0 = make_inputs(steps, False, 3)
    torch.manual_seed(11)
    expected = grads_of(gru, x, h0, loss_every_step)
    torch.manual_seed(11)
    got = grads_of(highway, x, h0, loss_every_step)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= RTOL


def test_exact_unbatched_in_training():
    steps = 5
    gru, highway = make_pair(num_layers=2, k=steps)
    x = torch.randn(steps, INPUT, requires_grad=True)  # unbatched: [T, I]
    h0 = torch.randn(2, HIDDEN, requires_grad=True)
    for with_state in (True, False):
        got = grads_of(highway, x, h0, loss_every_step, with_state)
        for a, b in zip(got, grads_of(gru, x, h0, loss_every_step, with_state)):
            assert rel_err(a, b) <= RTOL
        assert highway.last_iterations == [steps, steps]


def test_eval_mode_runs_the_ordinary_backward():
    """In eval mode the backward is nn.GRU's own, bit for bit, even at k = 1 (the rule of patched transformers
    models); last_iterations reports that no Highway iteration ran, not the previous training step's."""
    steps = 8
    gru, highway = make_pair(num_layers=2, k=1)
    x, h0 = make_inputs(steps, False, 2)
    grads_of(highway, x, h0, loss_every_step)
    assert highway.last_iterations == [1, 1]
    gru.eval(), highway.eval()
    for a, b in zip(grads_of(highway, x, h0, loss_every_step), grads_of(gru, x, h0, loss_every_step)):
        assert torch.equal(a, b)
    assert highway.last_iterations == []
    x_unbatched = torch.randn(steps, INPUT, requires_grad=True)
    for a, b in zip(
        grads_of(highway, x_unbatched, h0[:, 0], loss_every_step), grads_of(gru, x_unbatched, h0[:, 0], loss_every_step)
    ):
        assert torch.equal(a, b)
    highway.train()  # and back in training mode k = 1 is Highway-BP again, not backprop
    got = grads_of(highway, x, h0, loss_every_step)[2]
    assert rel_err(got, grads_of(gru, x, h0, loss_every_step)[2]) > 1e-6 and highway.last_iterations == [1, 1]


def test_input_gradients_reach_layers_below():
    """A GRU on top of embeddings: the embedding gets its gradient through the Highway backward."""
    steps = 9
    torch.manual_seed(3)
    embed = nn.Embedding(10, INPUT)
    gru, highway = make_pair(k=steps)
    tokens = torch.randint(0, 10, (steps, BATCH))
    grads = []
    for module in (gru, highway):
        out, _ = module(embed(tokens))
        (grad,) = torch.autograd.grad(loss_every_step(out, out[-1:]), [embed.weight])
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[1], grads[0]) <= RTOL


# ----- k < T against the independent recursion -----------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("loss_fn", [loss_every_step, loss_last_state])
def test_k_below_T_matches_independent_recursion(k, num_layers, loss_fn):
    steps = 6
    gru, highway = make_pair(num_layers, k=k, seed=k)
    x, h0 = make_inputs(steps, False, num_layers, seed=10 + k)
    got = dict(zip(["input", *dict(highway.named_parameters()), "h0"], grads_of(highway, x, h0, loss_fn)))
    expected = reference_highway_grads(gru, x.detach(), h0.detach(), loss_fn, k)
    for name, value in expected.items():
        assert rel_err(got[name], value) <= RTOL, name
    # k < T really differs from backprop (the test would not notice a silently exact backward otherwise)
    exact = grads_of(gru, x, h0, loss_fn)
    assert rel_err(got["weight_hh_l0"], exact[2]) > 1e-6


def test_reference_is_exact_at_k_eq_T():
    """The reference itself reproduces autograd at k = T (so agreeing with it at k < T means something)."""
    steps = 5
    gru, _ = make_pair(num_layers=2)
    x, h0 = make_inputs(steps, False, 2)
    expected = dict(zip(["input", *dict(gru.named_parameters()), "h0"], grads_of(gru, x, h0, loss_every_step)))
    got = reference_highway_grads(gru, x.detach(), h0.detach(), loss_every_step, steps)
    for name, value in got.items():
        assert rel_err(value, expected[name]) <= RTOL, name


def test_k_can_change_between_steps():
    steps = 6
    gru, highway = make_pair(k=0)
    x, h0 = make_inputs(steps, False, 1)
    names = ["input", *dict(highway.named_parameters()), "h0"]
    for k in (0, 2, 1):
        highway.k = k
        got = dict(zip(names, grads_of(highway, x, h0, loss_every_step)))
        expected = reference_highway_grads(gru, x.detach(), h0.detach(), loss_every_step, k)
        assert highway.last_iterations == [k]
        for name, value in expected.items():
            assert rel_err(got[name], value) <= RTOL, name


def test_k_is_read_at_forward_time():
    """Changing k between a forward and its backward does not change that backward."""
    steps = 6
    gru, highway = make_pair(k=1)
    x, h0 = make_inputs(steps, False, 1)
    out, h_n = highway(x, h0)
    highway.k = 3
    got = torch.autograd.grad(loss_every_step(out, h_n), [highway.weight_hh_l0])[0]
    expected = reference_highway_grads(gru, x.detach(), h0.detach(), loss_every_step, 1)["weight_hh_l0"]
    assert highway.last_iterations == [1]
    assert rel_err(got, expected) <= RTOL


def test_tolerance_stops_early():
    steps = 12
    gru, highway = make_pair(k=steps)
    highway.tol = 1e-4
    x, h0 = make_inputs(steps, False, 1)
    got = grads_of(highway, x, h0, loss_every_step)
    assert 1 <= highway.last_iterations[0] < steps
    exact = grads_of(gru, x, h0, loss_every_step)
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(got, exact))


# ----- drop-in behaviour ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_same_forward_as_nn_gru(train, grad_enabled):
    gru, highway = make_pair(num_layers=2, bidirectional=True, batch_first=True)
    gru.train(train), highway.train(train)
    x, h0 = make_inputs(8, True, 4)
    with torch.set_grad_enabled(grad_enabled):
        for with_state in (True, False):
            args = (x, h0) if with_state else (x,)
            expected, got = gru(*args), highway(*args)
            for a, b in zip(got, expected):
                assert a.shape == b.shape
                assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_state_dict_round_trip_and_from_gru():
    torch.manual_seed(0)
    gru = nn.GRU(INPUT, HIDDEN, num_layers=2, batch_first=True, dropout=0.1)
    highway = HighwayGRU.from_gru(gru.eval(), k=3)
    assert isinstance(highway, nn.GRU) and not highway.training and highway.k == 3
    assert highway.batch_first and highway.num_layers == 2 and highway.dropout == 0.1
    assert list(highway.state_dict()) == list(gru.state_dict())
    for name, value in gru.state_dict().items():
        assert torch.equal(highway.state_dict()[name], value)
    back = nn.GRU(INPUT, HIDDEN, num_layers=2, batch_first=True)
    back.load_state_dict(highway.state_dict())  # and back into a plain nn.GRU


def test_float32_close_to_nn_gru():
    steps = 40
    gru, highway = make_pair(k=steps)
    gru.float(), highway.float()
    x = torch.randn(steps, BATCH, INPUT, dtype=torch.float32, requires_grad=True)
    for a, b in zip(grads_of(highway, x, None, loss_every_step, False), grads_of(gru, x, None, loss_every_step, False)):
        assert a.dtype == torch.float32
        assert rel_err(a.double(), b.double()) < 1e-4


# ----- refusals ------------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be >= 0"):
        HighwayGRU(INPUT, HIDDEN, k=-1)
    with pytest.raises(TypeError, match="k must be an int"):
        HighwayGRU(INPUT, HIDDEN, k=1.5)
    with pytest.raises(TypeError, match="k must be an int"):
        HighwayGRU(INPUT, HIDDEN, k=True)
    highway = HighwayGRU(INPUT, HIDDEN)
    with pytest.raises(TypeError, match="k must be an int"):
        highway.k = "2"
    with pytest.raises(ValueError, match="tol must be None or a number > 0"):
        highway.tol = 0
    with pytest.raises(ValueError, match="scan_chunk"):
        highway.scan_chunk = 0
    with pytest.raises(ValueError, match="proj_size"):
        HighwayGRU(INPUT, HIDDEN, proj_size=2)
    with pytest.raises(TypeError, match="torch.nn.GRU"):
        HighwayGRU.from_gru(nn.LSTM(INPUT, HIDDEN))


def test_packed_sequences_are_refused():
    highway = HighwayGRU(INPUT, HIDDEN)
    packed = pack_padded_sequence(torch.randn(5, BATCH, INPUT), torch.tensor([5, 3]))
    with pytest.raises(TypeError, match="pad the batch"):
        highway(packed)


def test_wrong_shapes_raise_like_nn_gru():
    highway = HighwayGRU(INPUT, HIDDEN)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        highway(torch.randn(5, BATCH, INPUT + 1, requires_grad=True))
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        highway(torch.randn(5, BATCH, INPUT, requires_grad=True), torch.randn(1, BATCH + 1, HIDDEN))


def test_double_backward_is_exact():
    """The Hessian-vector-like product of the old refusal test; tests/test_rnn_double_backward.py covers the rest."""
    steps = 4
    found = []
    for module in make_pair(k=1):
        x, h0 = make_inputs(steps, False, 1)
        out, h_n = module(x, h0)
        (grad,) = torch.autograd.grad(loss_every_step(out, h_n), [module.weight_hh_l0], create_graph=True)
        grad.pow(2).sum().backward()
        found.append(torch.cat([module.weight_ih_l0.grad.flatten(), x.grad.flatten(), h0.grad.flatten()]))
    assert rel_err(found[1], found[0]) <= RTOL


# ----- the reverse linear scan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("steps,chunk", [(1, None), (7, None), (16, None), (17, 4), (17, 1), (17, 17), (5, 9)])
def test_reverse_linear_scan_matches_a_loop(steps, chunk):
    gen = torch.Generator().manual_seed(steps)
    a = torch.rand(steps, 3, 2, generator=gen)
    a[steps // 2] = 0.0  # a closed gate: nothing may leak through, and no log/exp may turn it into NaN
    c = torch.randn(steps, 3, 2, generator=gen)
    top = torch.randn(3, 2, generator=gen)
    expected = [None] * (steps + 1)
    expected[steps] = top
    for i in range(steps - 1, -1, -1):
        expected[i] = c[i] + a[i] * expected[i + 1]
    scan = ReverseLinearScan(a, chunk)
    got = scan(top, c)
    assert rel_err(got, torch.stack(expected)) <= 1e-14
    buffer = torch.empty(steps + 1, 3, 2)
    assert scan(top, c, out=buffer) is buffer and torch.equal(buffer, got)
    zero_inflow = scan(top, None)
    assert torch.equal(zero_inflow[steps], top) and torch.isfinite(zero_inflow).all()


def test_dropout_is_applied_only_in_training():
    _, highway = make_pair(num_layers=2, dropout=0.9)
    x, h0 = make_inputs(6, False, 2)
    highway.eval()
    first, _ = highway(x, h0)
    second, _ = highway(x, h0)
    assert torch.equal(first, second)
    highway.train()
    torch.manual_seed(0)
    third, _ = highway(x, h0)
    assert not torch.allclose(third, first)
