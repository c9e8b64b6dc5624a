"""Several residual streams handed on by each layer (docs/algorithm.md, "Several residual streams"): the state is a
tuple, each stream with its own identity path. Exact at k = L against autograd; at k < L equal to a dense recursion
written here (a toy stack) and to the independent reference over tuple states (LUKE, LiLT); every stream layout the
code cannot follow raises before any gradient exists."""

from __future__ import annotations

import pytest
import torch
from reference import grads_of, reference_highway_grads
from tiny_models import ZOO, one_thread  # noqa: F401 (fixture)
from torch import nn

import hf_hwbp
from hf_hwbp import HighwayBPError

pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")  # k = L runs the engine (tests/conftest.py)

SEED = 7
RTOL = 1e-10  # float64: the Highway sums differ from autograd's and the reference's by rounding only
STREAMS = {0: ((1, 1),)}  # the entity / layout / toy stream: second positional argument, second output


def error(actual: dict, expected: dict) -> float:
    """max over parameters of ||a - b|| / ||b|| (against 1e-6 of the largest norm where a gradient vanishes)."""
    assert actual.keys() == expected.keys()
    floor = 1e-6 * max(g.norm().item() for g in expected.values())
    return max((actual[n] - expected[n]).norm().item() / max(expected[n].norm().item(), floor) for n in expected)


def projection(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()


# ----- a toy stack of two streams of different widths --------------------------------------------------------------
class TwoStreamLayer(nn.Module):
    """(h, z) -> (h + tanh(A [h, z]), z + tanh(B [h, z])): each stream reads both."""

    def __init__(self, width: int, narrow: int):
        super().__init__()
        self.a = nn.Linear(width + narrow, width)
        self.b = nn.Linear(width + narrow, narrow)

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([h, z], dim=-1)
        return h + torch.tanh(self.a(x)), z + torch.tanh(self.b(x))


class TwoStreamModel(nn.Module):
    def __init__(self, depth: int = 4, width: int = 5, narrow: int = 3):
        super().__init__()
        self.embed_h = nn.Linear(2, width)
        self.embed_z = nn.Linear(2, narrow)
        self.layers = nn.ModuleList([TwoStreamLayer(width, narrow) for _ in range(depth)])
        self.by_keyword = False  # hand the stream on as z= rather than positionally
        self.tweak = None  # applied to the stream after the second layer

    def forward(self, x: torch.Tensor, skip: bool = False) -> tuple[torch.Tensor, torch.Tensor, list]:
        h, z = self.embed_h(x), self.embed_z(x)
        states = []
        previous = z
        for i, layer in enumerate(self.layers):
            if skip and i == 2:
                z = previous  # reads the stream of two layers below: not a stack of two streams
            previous = z
            h, z = layer(h, z=z) if self.by_keyword else layer(h, z)
            if i == 1 and self.tweak is not None:
                z = self.tweak(z)
            states.append((h, z))
        return h, z, states


def toy(depth: int = 4) -> TwoStreamModel:
    torch.manual_seed(0)
    model = TwoStreamModel(depth).double()
    for p in model.parameters():
        p.data.mul_(3.0)  # strong blocks: k < L differs clearly from backprop
    return model


X = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def toy_loss(model: TwoStreamModel, read_middle: bool = False) -> torch.Tensor:
    h, z, states = model(X)
    loss = projection(h, 1) + projection(z, 2)
    if read_middle:  # a loss on both streams of an intermediate state: e_j with two components
        loss = loss + projection(states[1][0], 3) + projection(states[1][1], 4)
    return loss


def dense_highway(model: TwoStreamModel, k: int, read_middle: bool) -> dict[str, torch.Tensor]:
    """The definition on flat vectors of the tuple state, with dense Jacobians of each block over the whole tuple:
    delta^(n+1)_i = delta^(0)_i + sum_{j > i} J_j^T delta^(n)_j; parameters (dg_j/dtheta_j)^T delta^(k)_j."""
    width, narrow = model.embed_h.out_features, model.embed_z.out_features
    h0, z0 = model.embed_h(X), model.embed_z(X)
    shapes = [h0.shape, z0.shape]

    def unflat(v):
        return v[: h0.numel()].view(shapes[0]), v[h0.numel() :].view(shapes[1])

    def flat(h, z):
        return torch.cat([h.reshape(-1), z.reshape(-1)])

    states = [flat(h0, z0).detach()]
    for layer in model.layers:
        states.append(flat(*layer(*unflat(states[-1]))).detach())
    depth = len(model.layers)
    # d and e_j: the gradients of the loss at the flat states, read from a loss on detached copies.
    leaves = [s.clone().requires_grad_(True) for s in states]
    h_last, z_last = unflat(leaves[depth])
    loss = projection(h_last, 1) + projection(z_last, 2)
    if read_middle:
        h2, z2 = unflat(leaves[2])
        loss = loss + projection(h2, 3) + projection(z2, 4)
    loss.backward()
    e = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    jac = [None] + [
        torch.autograd.functional.jacobian(lambda v, layer=layer: flat(*layer(*unflat(v))), states[j - 1])
        - torch.eye(states[0].numel(), dtype=torch.float64)
        for j, layer in enumerate(model.layers, start=1)
    ]
    base = [sum(e[i:], torch.zeros_like(e[0])) for i in range(depth + 1)]
    delta = list(base)
    for _ in range(min(k, depth)):
        delta = [
            base[i] + sum((jac[j].T @ delta[j] for j in range(i + 1, depth + 1)), 0 * base[i]) for i in range(depth)
        ]
        delta.append(base[depth])
    grads = {}
    for j, layer in enumerate(model.layers, start=1):
        out = flat(*layer(*unflat(states[j - 1])))
        for name, g in zip(
            [n for n, _ in layer.named_parameters()], torch.autograd.grad(out, list(layer.parameters()), delta[j])
        ):
            grads[f"layers.{j - 1}.{name}"] = g
    dh0, dz0 = unflat(delta[0])
    for name, p in model.embed_h.named_parameters():
        grads[f"embed_h.{name}"] = torch.autograd.grad(model.embed_h(X), p, dh0)[0]
    for name, p in model.embed_z.named_parameters():
        grads[f"embed_z.{name}"] = torch.autograd.grad(model.embed_z(X), p, dz0)[0]
    assert (width, narrow) == (shapes[0][-1], shapes[1][-1])
    return grads


@pytest.mark.parametrize("read_middle, by_keyword", [(False, False), (True, False), (False, True)])
def test_toy_two_streams_exact_and_equal_to_a_dense_recursion(read_middle, by_keyword):
    model = toy()
    model.by_keyword = by_keyword
    streams = {0: (("z", 1),)} if by_keyword else STREAMS
    loss_fn = lambda m: toy_loss(m, read_middle)  # noqa: E731
    exact = grads_of(model, loss_fn)
    hf_hwbp.patch_model(model, k=4, layers=model.layers)
    assert error(grads_of(model, loss_fn), exact) <= RTOL
    for k in (0, 1, 2):
        with hf_hwbp.exact_backprop(model):
            expected = dense_highway(model, k, read_middle)
            reference = reference_highway_grads(model, model.layers, loss_fn, k, streams=streams)
        assert error(reference, expected) <= RTOL  # the reference over tuple states is the definition
        hf_hwbp.set_highway_k(model, k)
        assert error(grads_of(model, loss_fn), expected) <= RTOL
        assert error(expected, exact) > 1e-3


def test_engine_takes_tuple_states():
    """highway_backward with tuple states: the same numbers as the patched toy (block by block, by hand)."""
    model = toy(depth=3)
    h, z = model.embed_h(X).detach(), model.embed_z(X).detach()
    inputs, outputs = [], []
    for layer in model.layers:
        x = (h.clone().requires_grad_(True), z.clone().requires_grad_(True))
        y = layer(*x)
        inputs.append(x)
        outputs.append(y)
        h, z = (t.detach() for t in y)
    d = (torch.ones_like(h), None)  # nothing reads the top z: the parameters only it reaches get no gradient
    params = [p for layer in model.layers for p in layer.parameters()]
    result = hf_hwbp.highway_backward(inputs, outputs, params, d, k=3, keep_block_grads=True)
    # k = L: exact backprop of sum(h_L) through the three layers.
    x0 = (inputs[0][0].detach().requires_grad_(True), inputs[0][1].detach().requires_grad_(True))
    state = x0
    for layer in model.layers:
        state = layer(*state)
    expected = torch.autograd.grad(state[0].sum(), [*x0, *params], allow_unused=True)
    assert isinstance(result.input_grad, tuple) and len(result.block_grads[0]) == 2
    torch.testing.assert_close(result.input_grad[0], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.input_grad[1], expected[1], rtol=1e-12, atol=1e-14)
    for got, want in zip(result.param_grads, expected[2:]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert result.param_grads[-1] is None and result.param_grads[-2] is None  # the last layer's b: unread


def test_a_stream_read_from_further_below_raises_before_any_gradient():
    model = toy()
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with pytest.raises(HighwayBPError, match="unpatch_model|layers="):
        h, z, _ = model(X, skip=True)
        (projection(h, 1) + projection(z, 2)).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "tweak, message",
    [
        (lambda z: z.detach(), "unchanged"),  # the next layer does not get the stream the layer before returned
        (lambda z: z.float(), "unchanged"),
    ],
)
def test_a_stream_changed_between_layers_raises_before_any_gradient(tweak, message):
    model = toy()
    model.tweak = tweak
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with pytest.raises(HighwayBPError, match=message):
        h, z, _ = model(X)
        (projection(h, 1) + projection(z.double(), 2)).backward()
    assert all(p.grad is None for p in model.parameters())


# ----- LUKE and LiLT -----------------------------------------------------------------------------------------------
def luke(layers: int = 3, **overrides):
    entry = ZOO["luke"]
    return entry, entry.build(num_hidden_layers=layers, **overrides), entry.batch()


def seeded(fn):
    def loss_fn(model):
        torch.manual_seed(SEED)
        return fn(model)

    return loss_fn


def assert_highway(model, loss_fn, ks=(1, 2), streams=STREAMS):
    exact = grads_of(model, loss_fn)
    depth = len(model.luke.encoder.layer)
    hf_hwbp.patch_model(model, k=depth)
    assert error(grads_of(model, loss_fn), exact) <= RTOL
    for k in ks:
        with hf_hwbp.exact_backprop(model):
            expected = reference_highway_grads(model, model.luke.encoder.layer, loss_fn, k, streams=streams)
        hf_hwbp.set_highway_k(model, k)
        assert error(grads_of(model, loss_fn), expected) <= RTOL
        if k == 1:
            assert error(expected, exact) > 1e-3  # k < L really differs from backprop here
    return exact


@pytest.mark.parametrize("layers", [2, 4])
def test_luke_other_depths(layers):
    """Two layers: the entity state of layer 1 used to be routed as a tensor handed on (exact backprop below it);
    it is a stream now."""
    entry, model, batch = luke(layers)
    assert_highway(model, seeded(lambda m: entry.loss(m, batch)), ks=range(1, layers))


def test_luke_stream_reading_is_not_the_side_input_reading():
    """The reference without streams (the entity state a tensor each block reads and returns, with ordinary backprop
    between blocks) differs at k = 1: the tests above could tell a patch that ignored the stream."""
    entry, model, batch = luke()
    loss_fn = seeded(lambda m: entry.loss(m, batch))
    with_streams = reference_highway_grads(model, model.luke.encoder.layer, loss_fn, 1, streams=STREAMS)
    without = reference_highway_grads(model, model.luke.encoder.layer, loss_fn, 1)
    assert error(without, with_streams) > 1e-3


def test_luke_intermediate_states_and_attention_maps_in_the_loss():
    """e_j on both streams (a loss on hidden_states and entity_hidden_states) and side outputs (attention maps)
    whose VJP reaches both streams of the block's input."""
    entry, model, batch = luke()

    def loss(m):
        out = m(**batch, output_hidden_states=True, output_attentions=True)
        total = out.loss + projection(out.hidden_states[2], 5) + projection(out.entity_hidden_states[1], 6)
        return total + sum(projection(a, 10 + i) for i, a in enumerate(out.attentions))

    assert_highway(model, seeded(loss))


def test_luke_with_frozen_entity_embeddings():
    """The entity stream of h_0 does not require grad: delta_0 has no entity part to deliver."""
    entry, model, batch = luke()
    model.luke.entity_embeddings.requires_grad_(False)
    assert_highway(model, seeded(lambda m: entry.loss(m, batch)))


def test_luke_without_entities_is_one_stream():
    entry, model, batch = luke()
    batch = {n: v for n, v in batch.items() if not n.startswith("entity")}
    assert_highway(model, seeded(lambda m: entry.loss(m, batch)), streams=None)


def test_luke_retained_states_get_their_stream_of_delta():
    """retain_grad() on returned word and entity states: each gets its stream's part of delta^(k)_j."""
    entry, model, batch = luke()
    kept: dict = {}

    def loss(m):
        torch.manual_seed(SEED)
        out = m(**batch, output_hidden_states=True)
        for t in (*out.hidden_states[1:-1], *out.entity_hidden_states[1:-1]):
            if t.requires_grad:
                t.retain_grad()
        kept["out"] = out
        return out.loss

    runs: list = []
    reference_highway_grads(model, model.luke.encoder.layer, loss, 1, runs=runs, streams=STREAMS)
    (run,) = runs
    hf_hwbp.patch_model(model, k=1)
    loss(model).backward()
    out = kept["out"]
    for j in (1, 2):
        for s, states in enumerate((out.hidden_states, out.entity_hidden_states)):
            torch.testing.assert_close(states[j].grad, run.delta[j][s], rtol=1e-10, atol=1e-14)


def test_luke_groups_of_layers_raise_before_any_gradient():
    entry, model, batch = luke(4)
    hf_hwbp.patch_model(model, k=1, group_size=2)
    with pytest.raises(HighwayBPError, match="group_size=1"):
        entry.loss(model, batch).backward()
    assert all(p.grad is None for p in model.parameters())


def test_lilt_unread_layout_output_gets_no_gradient_and_adaptive_stop():
    """LiLT returns no layout state: the last layer's layout-only parameters get None, as under autograd; the
    adaptive stop measures the change over both streams (the reference's criterion, computed here)."""
    entry = ZOO["lilt"]
    model, batch = entry.build(), entry.batch()
    loss_fn = seeded(lambda m: entry.loss(m, batch))
    exact = grads_of(model, loss_fn)
    assert not any(n.startswith("lilt.encoder.layer.2.layout_output") for n in exact)

    def converged(previous, current) -> bool:
        flat = [t.reshape(-1) for state in current for t in state]
        change = [(c - p).reshape(-1) for a, b in zip(previous, current) for p, c in zip(a, b)]
        return bool(torch.cat(change).norm() <= 1e-2 * torch.cat(flat).norm())

    ran: list[int] = []
    expected = reference_highway_grads(
        model, model.lilt.encoder.layer, loss_fn, 3, stop=converged, iterations=ran, streams=STREAMS
    )
    hf_hwbp.patch_model(model, k=3, tol=1e-2)
    assert error(grads_of(model, loss_fn), expected) <= RTOL
    assert hf_hwbp.last_highway_iterations(model) == ran[0]


# ----- a tensor handed on that is not a stream ---------------------------------------------------------------------
class BiasLayer(nn.Module):
    """Makes a bias when it gets none (the first layer, as T5's), else transforms the one it gets and hands it on."""

    def __init__(self, width: int = 5):
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.seed = nn.Parameter(torch.randn(width))
        self.scale = nn.Parameter(torch.randn(width))

    def forward(self, h: torch.Tensor, bias: torch.Tensor | None = None):
        bias = self.seed.expand_as(h) if bias is None else torch.tanh(bias * self.scale)
        return h + torch.tanh(self.mix(h) + bias), bias


class BiasModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 5)
        self.layers = nn.ModuleList([BiasLayer() for _ in range(4)])

    def forward(self, x):
        h, bias = self.embed(x), None
        for layer in self.layers:
            h, bias = layer(h, bias=bias)
        return h


def test_a_tensor_handed_on_from_another_handed_on_tensor_raises():
    """The first layer gets no bias, so the bias is no stream; the second layer's bias is computed from the first's
    (a tensor handed on): routing it into the block that returned it would lose the chain. Refused (it used to run
    with that part of the gradient missing)."""
    torch.manual_seed(0)
    model = BiasModel().double()
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with pytest.raises(HighwayBPError, match="unpatch_model"):
        projection(model(X), 1).backward()
    assert all(p.grad is None for p in model.parameters())


def test_luke_with_activation_checkpointing_and_the_batched_backend_asked_for():
    """Non-reentrant checkpointing recomputes each layer in every sweep (dropout as shipped, its RNG state kept);
    backend='batched' falls back to the sequential engine for a stack with streams."""
    entry, model, batch = luke()
    model.activation_checkpointing_enable()  # non-reentrant by default
    loss_fn = seeded(lambda m: entry.loss(m, batch))
    exact = grads_of(model, loss_fn)
    hf_hwbp.patch_model(model, k=1, backend="batched")
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.luke.encoder.layer, loss_fn, 1, streams=STREAMS)
    assert error(grads_of(model, loss_fn), expected) <= RTOL
    hf_hwbp.set_highway_k(model, 3)
    assert error(grads_of(model, loss_fn), exact) <= RTOL
