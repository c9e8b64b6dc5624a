"""HighwayLSTM against torch.nn.LSTM autograd (exact at k >= T) and against Highway-BP(k) through time written out.

The independent reference below shares no code with hf_hwbp: it re-implements the LSTM step from torch's
documented equations, takes each step's full Jacobian d(h_t, c_t)/d(h_{t-1}, c_{t-1}) with autograd, splits it
into the residual path R_t (the paths through c_{t-1} with the gates held fixed: f_t on c, o_t tanh'(c_t) f_t on
h) and the rest J_t (everything from h_{t-1}), and evaluates the recursion of docs/algorithm.md literally on the
2H-wide state, one time step at a time:

    delta^(0):   delta_T = d,  delta_{t-1} = e_{t-1} + R_t^T delta_t
    delta^(n+1): delta_T = d,  delta_{t-1} = e_{t-1} + R_t^T delta^(n+1)_t + J_t^T delta^(n)_t

then gives every step's parameters and input their local VJP with delta^(k)_t, and the initial state delta^(k)_0.
Float64 throughout; 1e-10 relative catches any wrong term (O(1)) with a wide margin over rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_hwbp
from hf_hwbp.errors import HighwayBPError
from hf_hwbp.rnn import HighwayLSTM
from hf_hwbp.rnn.scan import forward_linear_scan

pytestmark = pytest.mark.usefixtures("float64_default")

BATCH, INPUT, HIDDEN = 2, 3, 4
RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----- the independent reference -------------------------------------------------------------------------------
def reference_cell(x, state, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step from torch.nn.LSTM's documented equations; state = cat(h, c) [.., 2H]; returns (state, gates)."""
    h, c = state.chunk(2, -1)
    pre = x @ w_ih.T + h @ w_hh.T + (0 if b_ih is None else b_ih + b_hh)
    i, f, g, o = pre.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return torch.cat([h_new, c_new], -1), (f, o, c_new)


def residual_matrix(f, o, c_new):
    """R_t for one batch row: [[0, diag(o tanh'(c) f)], [0, diag(f)]] (rows: h_t, c_t; columns: h_{t-1}, c_{t-1})."""
    hidden = f.shape[0]
    r = torch.zeros(2 * hidden, 2 * hidden)
    r[:hidden, hidden:] = torch.diag(o * (1 - torch.tanh(c_new) ** 2) * f)
    r[hidden:, hidden:] = torch.diag(f)
    return r


def reference_layer_grads(x, state0, weights, e, d, k):
    """Highway-BP(k) through one layer on the (h, c) state: (x grad, state0 grad [B, 2H], weight grads)."""
    steps = x.shape[0]
    states = [state0]
    with torch.no_grad():
        for t in range(steps):
            states.append(reference_cell(x[t], states[-1], *weights)[0])
    residual, through = [], []
    for t in range(steps):
        r_rows, j_rows = [], []
        for b in range(x.shape[1]):
            step = lambda s, b=b, t=t: reference_cell(x[t, b], s, *weights)[0]  # noqa: E731
            full = torch.autograd.functional.jacobian(step, states[t][b])  # [2H out, 2H in]
            r = residual_matrix(*reference_cell(x[t, b], states[t][b], *weights)[1])
            r_rows.append(r)
            j_rows.append(full - r)
        residual.append(torch.stack(r_rows))
        through.append(torch.stack(j_rows))
    # J_t really is the h_{t-1} columns alone (the split the algorithm states)
    assert all(j[:, :, HIDDEN:].abs().max() < 1e-12 for j in through)

    def vjp(matrices, t, v):
        return torch.einsum("boi,bo->bi", matrices[t - 1], v)

    delta = [None] * (steps + 1)
    delta[steps] = d
    for t in range(steps, 0, -1):
        delta[t - 1] = e[t - 1] + vjp(residual, t, delta[t])
    for _ in range(min(k, steps)):
        new = [None] * (steps + 1)
        new[steps] = d
        for t in range(steps, 0, -1):
            new[t - 1] = e[t - 1] + vjp(residual, t, new[t]) + vjp(through, t, delta[t])
        delta = new
    params = [w.detach().clone().requires_grad_(True) if w is not None else None for w in weights]
    used = [p for p in params if p is not None]
    grad_x = torch.zeros_like(x)
    grads = [torch.zeros_like(p) for p in used]
    for t in range(steps):
        xt = x[t].detach().clone().requires_grad_(True)
        s, _ = reference_cell(xt, states[t], *params)
        out = torch.autograd.grad(s, [xt, *used], delta[t + 1])
        grad_x[t] = out[0]
        grads = [g + o for g, o in zip(grads, out[1:])]
    return grad_x, delta[0], grads


def reference_highway_grads(lstm: nn.LSTM, x, h0, c0, loss_of, k):
    """Highway-BP(k) of a (possibly multi-layer, unidirectional, time-major, dropout-free) LSTM, by name."""
    layers = lstm.num_layers
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if lstm.bias else [])
    weights = [[getattr(lstm, f"{n}_l{i}").detach() for n in names] for i in range(layers)]
    weights = [w if lstm.bias else w + [None, None] for w in weights]
    inputs, outputs, finals = [x], [], []
    with torch.no_grad():
        for i in range(layers):
            s, seq = torch.cat([h0[i], c0[i]], -1), []
            for t in range(x.shape[0]):
                s, _ = reference_cell(inputs[-1][t], s, *weights[i])
                seq.append(s[..., :HIDDEN])
            outputs.append(torch.stack(seq))
            finals.append(s)
            inputs.append(outputs[-1])
    top = outputs[-1].clone().requires_grad_(True)
    h_n = torch.stack([s[..., :HIDDEN] for s in finals]).requires_grad_(True)
    c_n = torch.stack([s[..., HIDDEN:] for s in finals]).requires_grad_(True)
    grads = torch.autograd.grad(loss_of(top, (h_n, c_n)), [top, h_n, c_n], allow_unused=True)
    grad_top, grad_h, grad_c = (torch.zeros_like(t) if g is None else g for g, t in zip(grads, [top, h_n, c_n]))
    result, grad_h0, grad_c0 = {}, torch.zeros_like(h0), torch.zeros_like(c0)
    from_above = grad_top
    for i in range(layers - 1, -1, -1):
        zero = torch.zeros(BATCH, 2 * HIDDEN)
        e = [zero] + [torch.cat([g, torch.zeros_like(g)], -1) for g in from_above[:-1]]  # outputs are h only
        d = torch.cat([from_above[-1] + grad_h[i], grad_c[i]], -1)
        state0 = torch.cat([h0[i], c0[i]], -1)
        grad_in, grad_state0, grads = reference_layer_grads(inputs[i], state0, weights[i], e, d, k)
        grad_h0[i], grad_c0[i] = grad_state0[..., :HIDDEN], grad_state0[..., HIDDEN:]
        for n, g in zip(names, grads):
            result[f"{n}_l{i}"] = g
        from_above = grad_in
    result.update(input=from_above, h0=grad_h0, c0=grad_c0)
    return result


# ----- helpers -------------------------------------------------------------------------------------------------
def make_pair(num_layers=1, batch_first=False, bias=True, bidirectional=False, dropout=0.0, seed=0, k=2):
    torch.manual_seed(seed)
    lstm = nn.LSTM(INPUT, HIDDEN, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                   dropout=dropout)  # fmt: skip
    return lstm, HighwayLSTM.from_lstm(lstm, k=k)


def make_inputs(steps, batch_first, states, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, steps, INPUT) if batch_first else (steps, BATCH, INPUT)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    h0 = torch.randn(states, BATCH, HIDDEN, generator=gen).requires_grad_(True)
    c0 = torch.randn(states, BATCH, HIDDEN, generator=gen).requires_grad_(True)
    return x, h0, c0


def loss_every_step(out, hidden):
    """A loss on every step's output (intermediate losses) and on both last states."""
    h_n, c_n = hidden
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    return (
        (out * weights).sum()
        + (out**2).sum()
        + 0.5 * (h_n**3).sum()
        + (c_n * torch.linspace(0, 1, c_n.numel()).view_as(c_n)).sum()
    )


def loss_linear_outputs(out, hidden):
    """Only linear in the outputs: with batch_first, the gradient reaching the layer is a transposed tensor."""
    return (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum()


def loss_last_h(out, hidden):
    h = hidden[0][-1]
    return (h * torch.linspace(1, 2, h.numel()).view_as(h)).sum() + (h**2).sum()


def loss_last_c(out, hidden):
    c = hidden[1][-1]
    return (c * torch.linspace(1, 2, c.numel()).view_as(c)).sum() + (c**2).sum()


def grads_of(module, x, h0, c0, loss_fn, with_state=True):
    out, hidden = module(x, (h0, c0)) if with_state else module(x)
    tensors = [x, *module.parameters()] + ([h0, c0] if with_state else [])
    return torch.autograd.grad(loss_fn(out, hidden), tensors)


# ----- exact at k >= T -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 5, 16])  # 16: chunks of 4, no remainder; 5: a remainder
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("loss_fn", [loss_every_step, loss_linear_outputs, loss_last_h, loss_last_c])
def test_exact_at_k_ge_T(steps, num_layers, batch_first, with_state, loss_fn):
    lstm, highway = make_pair(num_layers, batch_first, k=steps)
    x, h0, c0 = make_inputs(steps, batch_first, num_layers)
    expected = grads_of(lstm, x, h0, c0, loss_fn, with_state)
    got = grads_of(highway, x, h0, c0, loss_fn, with_state)
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
    lstm, highway = make_pair(k=steps + 3, **options)  # k > T: clamped, still exact
    states = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    x, h0, c0 = make_inputs(steps, options.get("batch_first", False), states)
    for a, b in zip(grads_of(highway, x, h0, c0, loss_every_step), grads_of(lstm, x, h0, c0, loss_every_step)):
        assert rel_err(a, b) <= RTOL


def test_exact_with_dropout_between_layers():
    """Training-mode dropout between layers: on CPU the masks are nn.LSTM's for the same seed."""
    steps = 7
    lstm, highway = make_pair(num_layers=3, dropout=0.4, k=steps)
    x, h0, c0 = make_inputs(steps, False, 3)
    torch.manual_seed(11)
    expected = grads_of(lstm, x, h0, c0, loss_every_step)
    torch.manual_seed(11)
    got = grads_of(highway, x, h0, c0, loss_every_step)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= RTOL


def test_exact_unbatched_in_training():
    steps = 5
    lstm, highway = make_pair(num_layers=2, k=steps)
    x = torch.randn(steps, INPUT, requires_grad=True)  # unbatched: [T, I], states [layers, H]
    h0, c0 = torch.randn(2, HIDDEN, requires_grad=True), torch.randn(2, HIDDEN, requires_grad=True)
    for with_state in (True, False):
        got = grads_of(highway, x, h0, c0, loss_every_step, with_state)
        for a, b in zip(got, grads_of(lstm, x, h0, c0, loss_every_step, with_state)):
            assert rel_err(a, b) <= RTOL
        assert highway.last_iterations == [steps, steps]


def test_eval_mode_runs_the_ordinary_backward():
    """In eval mode the backward is nn.LSTM's own, bit for bit, even at k = 1; no Highway iteration is reported."""
    steps = 8
    lstm, highway = make_pair(num_layers=2, k=1)
    x, h0, c0 = make_inputs(steps, False, 2)
    grads_of(highway, x, h0, c0, loss_every_step)  # a training step first: last_iterations must not go stale
    assert highway.last_iterations == [1, 1]
    lstm.eval(), highway.eval()
    for a, b in zip(grads_of(highway, x, h0, c0, loss_every_step), grads_of(lstm, x, h0, c0, loss_every_step)):
        assert torch.equal(a, b)
    assert highway.last_iterations == []
    highway.train()
    assert (
        rel_err(grads_of(highway, x, h0, c0, loss_every_step)[2], grads_of(lstm, x, h0, c0, loss_every_step)[2]) > 1e-6
    )


def test_input_gradients_reach_layers_below():
    """An LSTM on top of embeddings: the embedding gets its gradient through the Highway backward."""
    steps = 9
    torch.manual_seed(3)
    embed = nn.Embedding(10, INPUT)
    lstm, highway = make_pair(k=steps)
    tokens = torch.randint(0, 10, (steps, BATCH))
    grads = []
    for module in (lstm, highway):
        out, _ = module(embed(tokens))
        (grad,) = torch.autograd.grad((out**2).sum() + out[-1].sum(), [embed.weight])
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[1], grads[0]) <= RTOL


# ----- k < T against the independent recursion -----------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("loss_fn", [loss_every_step, loss_last_h, loss_last_c])
def test_k_below_T_matches_independent_recursion(k, num_layers, loss_fn):
    steps = 6
    lstm, highway = make_pair(num_layers, k=k, seed=k)
    x, h0, c0 = make_inputs(steps, False, num_layers, seed=10 + k)
    names = ["input", *dict(highway.named_parameters()), "h0", "c0"]
    got = dict(zip(names, grads_of(highway, x, h0, c0, loss_fn)))
    expected = reference_highway_grads(lstm, x.detach(), h0.detach(), c0.detach(), loss_fn, k)
    for name, value in expected.items():
        assert rel_err(got[name], value) <= RTOL, name
    assert highway.last_iterations == [k] * num_layers
    # k < T really differs from backprop (the test would not notice a silently exact backward otherwise)
    exact = grads_of(lstm, x, h0, c0, loss_fn)
    assert rel_err(got["weight_hh_l0"], exact[2]) > 1e-6


def test_reference_is_exact_at_k_eq_T():
    """The reference itself reproduces autograd at k = T (so agreeing with it at k < T means something)."""
    steps = 5
    lstm, _ = make_pair(num_layers=2)
    x, h0, c0 = make_inputs(steps, False, 2)
    names = ["input", *dict(lstm.named_parameters()), "h0", "c0"]
    expected = dict(zip(names, grads_of(lstm, x, h0, c0, loss_every_step)))
    got = reference_highway_grads(lstm, x.detach(), h0.detach(), c0.detach(), loss_every_step, steps)
    for name, value in got.items():
        assert rel_err(value, expected[name]) <= RTOL, name


def test_k_can_change_between_steps_and_tol_stops_early():
    steps = 6
    lstm, highway = make_pair(k=0, bias=False)
    x, h0, c0 = make_inputs(steps, False, 1)
    names = ["input", *dict(highway.named_parameters()), "h0", "c0"]
    for k in (0, 2, 1):
        highway.k = k
        got = dict(zip(names, grads_of(highway, x, h0, c0, loss_every_step)))
        expected = reference_highway_grads(lstm, x.detach(), h0.detach(), c0.detach(), loss_every_step, k)
        assert highway.last_iterations == [k]
        for name, value in expected.items():
            assert rel_err(got[name], value) <= RTOL, name
    highway.k, highway.tol = steps, 1e-4
    got = grads_of(highway, x, h0, c0, loss_every_step)
    assert 1 <= highway.last_iterations[0] < steps
    assert all(rel_err(a, b) < 1e-2 for a, b in zip(got, grads_of(lstm, x, h0, c0, loss_every_step)))


# ----- drop-in behaviour ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_same_forward_as_nn_lstm(train, grad_enabled):
    lstm, highway = make_pair(num_layers=2, bidirectional=True, batch_first=True)
    lstm.train(train), highway.train(train)
    x, h0, c0 = make_inputs(8, True, 4)
    with torch.set_grad_enabled(grad_enabled):
        for args in ((x, (h0, c0)), (x,)):
            (out_a, (h_a, c_a)), (out_b, (h_b, c_b)) = highway(*args), lstm(*args)
            for a, b in ((out_a, out_b), (h_a, h_b), (c_a, c_b)):
                assert a.shape == b.shape
                assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_state_dict_round_trip_and_from_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True, dropout=0.1)
    highway = HighwayLSTM.from_lstm(lstm.eval(), k=3)
    assert isinstance(highway, nn.LSTM) and not highway.training and highway.k == 3
    assert highway.batch_first and highway.num_layers == 2 and highway.dropout == 0.1
    assert list(highway.state_dict()) == list(lstm.state_dict())
    for name, value in lstm.state_dict().items():
        assert torch.equal(highway.state_dict()[name], value)
    back = nn.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True)
    back.load_state_dict(highway.state_dict())
    assert hf_hwbp.HighwayLSTM is HighwayLSTM and "k=3" in repr(highway)


def test_float32_close_to_nn_lstm():
    steps = 40
    lstm, highway = make_pair(k=steps)
    lstm.float(), highway.float()
    x = torch.randn(steps, BATCH, INPUT, dtype=torch.float32, requires_grad=True)
    for a, b in zip(
        grads_of(highway, x, None, None, loss_every_step, False), grads_of(lstm, x, None, None, loss_every_step, False)
    ):
        assert a.dtype == torch.float32
        assert rel_err(a.double(), b.double()) < 1e-4


# ----- refusals ------------------------------------------------------------------------------------------------
def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be >= 0"):
        HighwayLSTM(INPUT, HIDDEN, k=-1)
    with pytest.raises(TypeError, match="k must be an int"):
        HighwayLSTM(INPUT, HIDDEN, k=1.5)
    highway = HighwayLSTM(INPUT, HIDDEN)
    with pytest.raises(TypeError, match="k must be an int"):
        highway.k = True
    with pytest.raises(ValueError, match="tol must be None or a number > 0"):
        highway.tol = -1
    with pytest.raises(ValueError, match="scan_chunk"):
        highway.scan_chunk = 0
    with pytest.raises(HighwayBPError, match="proj_size.*torch.nn.LSTM"):
        HighwayLSTM(INPUT, HIDDEN, proj_size=2)
    with pytest.raises(HighwayBPError, match="proj_size"):
        HighwayLSTM.from_lstm(nn.LSTM(INPUT, HIDDEN, proj_size=2))
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        HighwayLSTM.from_lstm(nn.GRU(INPUT, HIDDEN))


def test_bad_inputs_raise_before_any_gradient():
    highway = HighwayLSTM(INPUT, HIDDEN)
    x = torch.randn(5, BATCH, INPUT, requires_grad=True)
    with pytest.raises(TypeError, match="pad the batch"):
        highway(torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3])))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        highway(torch.randn(5, BATCH, INPUT + 1, requires_grad=True))
    with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size"):
        highway(x, (torch.randn(1, BATCH + 1, HIDDEN), torch.randn(1, BATCH, HIDDEN)))
    with pytest.raises(RuntimeError, match="should also be 3-D"):
        highway(x, (torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)))
    with pytest.raises(TypeError, match="\\(h_0, c_0\\)"):
        highway(x, torch.randn(1, BATCH, HIDDEN))
    assert highway.weight_hh_l0.grad is None


def test_double_backward_is_exact():
    """The Hessian-vector-like product of the old refusal test; tests/test_rnn_double_backward.py covers the rest."""
    found = []
    for module in make_pair(k=1):
        x, h0, c0 = make_inputs(4, False, 1)
        out, hidden = module(x, (h0, c0))
        (grad,) = torch.autograd.grad(loss_every_step(out, hidden), [module.weight_hh_l0], create_graph=True)
        grad.pow(2).sum().backward()
        found.append(torch.cat([t.grad.flatten() for t in (module.weight_ih_l0, x, h0, c0)]))
    assert rel_err(found[1], found[0]) <= RTOL


@pytest.mark.parametrize("steps,chunk", [(1, None), (7, None), (16, None), (17, 4), (17, 1), (17, 17), (5, 9)])
def test_forward_linear_scan_matches_a_loop(steps, chunk):
    gen = torch.Generator().manual_seed(steps)
    a = torch.rand(steps, 3, 2, generator=gen)
    a[steps // 2] = 0.0  # a closed gate
    u = torch.randn(steps, 3, 2, generator=gen)
    initial = torch.randn(3, 2, generator=gen)
    expected = [initial]
    for t in range(steps):
        expected.append(u[t] + a[t] * expected[-1])
    assert rel_err(forward_linear_scan(a, u, initial, chunk), torch.stack(expected)) <= 1e-14
