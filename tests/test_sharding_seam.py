"""The patch's interface for engines that shard parameters (``hf_hwbp.sharding``), proved with fake lifecycles on a
tiny float64 GPT-2 at k = 0, 1, 2 and L (k = L by the engine, not by the model's own backward: these tests check the
engine's calls into the lifecycle, which an exact step by autograd never makes).

The main fake keeps the blocks' parameters NaN outside ``gathered`` and their true values inside, so any autograd
call through a block's local graph outside its window puts NaN into some gradient: finite gradients equal to the
reference prove that every VJP of the Highway backward ran inside the window of its block."""

from __future__ import annotations

import contextlib

import pytest
import torch
from reference import grads_of, reference_highway_grads
from tiny_models import ZOO, ZOO_LAYERS
from torch import nn

import hf_hwbp
from hf_hwbp import sharding
from hf_hwbp.errors import HighwayBPError
from hf_hwbp.sharding import ParameterLifecycle

L = ZOO_LAYERS
RTOL = 1e-10  # float64, the same operations in another order: rounding only


def gpt2() -> nn.Module:
    model = ZOO["gpt2"].build(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.config._attn_implementation = "eager"  # attention maps are returned by eager attention only
    return model


def lm_loss(model: nn.Module) -> torch.Tensor:
    return model(**ZOO["gpt2"].batch()).loss


def lm_and_attention_loss(model: nn.Module) -> torch.Tensor:
    out = model(**ZOO["gpt2"].batch(), output_attentions=True)  # attention maps: the side-output VJP runs too
    return out.loss + sum((i + 1) * a.pow(2).sum() for i, a in enumerate(out.attentions))


def engine_at_every_k(model: nn.Module, k: int) -> None:
    hf_hwbp.patch_model(model, k=k)
    # k = L must run the engine (and so the lifecycle), not the model's own backward, to be checked here.
    hf_hwbp.highway_state(model).exact_steps_by_autograd = False


class NaNOutsideWindows(ParameterLifecycle):
    """Block parameters hold NaN except inside ``gathered`` (for the blocks it names); records every call."""

    def __init__(self, layers: nn.ModuleList, group_size: int = 1, per_block: bool = False):
        self.per_block_parameter_step = per_block
        self.blocks = [list(layers[a : a + group_size]) for a in range(0, len(layers), group_size)]
        self.true = {id(p): p.detach().clone() for p in layers.parameters()}
        self.calls: list[tuple] = []
        self.finished = 0

    def _params(self, blocks):
        return [p for j in blocks for layer in self.blocks[j] for p in layer.parameters()]

    def shard(self) -> None:
        for p in self._params(range(len(self.blocks))):
            p.data.fill_(float("nan"))  # .data: the autograd version counter is not bumped

    def unshard(self) -> None:
        for p in self._params(range(len(self.blocks))):
            p.data.copy_(self.true[id(p)])

    @contextlib.contextmanager
    def gathered(self, stack_index, blocks, prefetch=()):
        self.calls.append(("gathered", stack_index, tuple(blocks), tuple(prefetch)))
        for p in self._params(blocks):
            p.data.copy_(self.true[id(p)])
        try:
            yield
        finally:
            for p in self._params(blocks):
                p.data.fill_(float("nan"))

    def take_parameter_grads(self, stack_index, block, params, grads):
        self.calls.append(("take", stack_index, block, len(params)))
        return grads

    def backward_finished(self, stack_index):
        self.finished += 1


def grads_with(model: nn.Module, lifecycle: NaNOutsideWindows, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    lifecycle.shard()
    try:
        loss.backward()
    finally:
        lifecycle.unshard()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def expected_grads(model: nn.Module, loss_fn, k: int) -> dict[str, torch.Tensor]:
    with hf_hwbp.exact_backprop(model):
        if k < L:
            return reference_highway_grads(model, model.transformer.h, loss_fn, k)
        return grads_of(model, loss_fn)


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, b in expected.items():
        a = actual[name]
        assert torch.isfinite(a).all(), f"{name}: a VJP ran outside its block's gathered window"
        err = (a - b).norm().item() / max(b.norm().item(), 1e-30)
        assert err <= RTOL, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("per_block", [False, True], ids=["one_parameter_call", "per_block"])
@pytest.mark.parametrize("k", [0, 1, 2, L])
def test_every_vjp_runs_inside_its_blocks_window(k, per_block):
    loss_fn = lm_and_attention_loss
    model = gpt2()
    expected = expected_grads(model, loss_fn, k)
    engine_at_every_k(model, k)
    lifecycle = NaNOutsideWindows(model.transformer.h, per_block=per_block)
    hf_hwbp.highway_state(model).lifecycle = lifecycle
    assert_close(grads_with(model, lifecycle, loss_fn), expected)
    assert lifecycle.finished == 1
    gathered = [c for c in lifecycle.calls if c[0] == "gathered"]
    assert {c[1] for c in gathered} == {0}  # GPT-2 has one stack, index 0
    sweeps = [c[2] for c in gathered if len(c[2]) == 1]
    if per_block:  # the parameter step: each block alone, from the top, prefetching the one below, then its take
        step = [c for c in lifecycle.calls if c[0] == "take" or c[2:3] in [((j,),) for j in range(L)]][-2 * L :]
        assert step == [
            c
            for j in range(L - 1, -1, -1)
            for c in (("gathered", 0, (j,), (j - 1,) if j > 0 else ()), ("take", 0, j, 12))  # 12 tensors per block
        ]
    else:
        assert gathered[-1][2] == tuple(range(L))  # one parameter call over every block
        assert not any(c[0] == "take" for c in lifecycle.calls)
    assert len(sweeps) >= k * (L - 1)  # at least the input-VJPs of k sweeps (block 1's feeds h_0: L per sweep)


@pytest.mark.parametrize("k", [1, L])
def test_groups_of_layers_are_gathered_together(k):
    model = gpt2()
    model.transformer.h.append(type(model.transformer.h[0])(model.config, layer_idx=L))  # 4 layers: 2 groups of 2
    model.config.n_layer = L + 1
    model.double()
    blocks = 2
    with hf_hwbp.exact_backprop(model):
        if k < blocks:
            expected = reference_highway_grads(model, model.transformer.h, lm_loss, k, group_size=2)
        else:
            expected = expected_grads(model, lm_loss, L + 1)
    hf_hwbp.patch_model(model, k=k, group_size=2)
    hf_hwbp.highway_state(model).exact_steps_by_autograd = False  # as engine_at_every_k
    lifecycle = NaNOutsideWindows(model.transformer.h, group_size=2, per_block=True)
    hf_hwbp.highway_state(model).lifecycle = lifecycle
    assert_close(grads_with(model, lifecycle, lm_loss), expected)
    assert ("take", 0, 1, 24) in lifecycle.calls and ("take", 0, 0, 24) in lifecycle.calls


class Consumes(ParameterLifecycle):
    """Takes block ``block``'s parameter gradients itself (as FSDP reduce-scatters them) and lets autograd deliver
    the others."""

    per_block_parameter_step = True

    def __init__(self, block: int):
        self.block = block
        self.taken: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take_parameter_grads(self, stack_index, block, params, grads):
        if block != self.block:
            return grads
        self.taken.extend(zip(params, grads))
        return [None] * len(grads)


@pytest.mark.parametrize("k", [0, 1, 2, L])
def test_gradients_a_lifecycle_takes_do_not_reach_grad(k):
    model = gpt2()
    expected = expected_grads(model, lm_and_attention_loss, k)
    engine_at_every_k(model, k)
    lifecycle = Consumes(block=1)
    hf_hwbp.highway_state(model).lifecycle = lifecycle
    model.zero_grad(set_to_none=True)
    lm_and_attention_loss(model).backward()
    names = {id(p): n for n, p in model.named_parameters()}
    taken = {names[id(p)]: g for p, g in lifecycle.taken}
    assert taken and all(name.startswith("transformer.h.1.") for name in taken)
    assert set(taken) == {n for n, p in model.transformer.h[1].named_parameters(prefix="transformer.h.1")}
    delivered = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert not set(taken) & set(delivered)  # nothing of what the lifecycle took reached .grad through autograd
    assert_close({**delivered, **taken}, expected)


def test_connect_runs_at_every_training_forward_before_any_layer(monkeypatch):
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    patch = hf_hwbp.highway_state(model)
    seen = []

    def connect(root, given):
        seen.append((root, given, patch.is_recording(0)))

    monkeypatch.setattr(sharding, "connect", connect)
    model.train()
    lm_loss(model)
    lm_loss(model)
    with torch.no_grad():
        lm_loss(model)  # not a training forward
    model.eval()
    lm_loss(model)  # not a training forward
    assert seen == [(model, patch, False)] * 2

    def refuse(root, given):
        raise HighwayBPError("this set-up is refused")

    monkeypatch.setattr(sharding, "connect", refuse)
    model.train()
    with pytest.raises(HighwayBPError, match="refused"):
        lm_loss(model)
    assert all(p.grad is None for p in model.parameters())


def test_is_recording_and_hooked_stacks():
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    patch = hf_hwbp.highway_state(model)
    assert patch.hooked_stacks == tuple(patch.stacks) and len(patch.hooked_stacks) == 1
    seen = []
    model.transformer.h[1].register_forward_hook(lambda *_: seen.append(patch.is_recording(0)))
    lm_loss(model)
    with torch.no_grad():
        lm_loss(model)
    assert seen == [True, False]
    assert patch.is_recording(0) is False  # after the stack's last layer


def test_hooked_stacks_keep_a_rejected_list():
    """A list a training forward showed is no residual stack leaves ``stacks`` but keeps its index."""

    class Widening(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8)])  # changes the state's shape: rejected
            self.blocks = nn.ModuleList([Residual(8), Residual(8)])

        def forward(self, x):
            for layer in self.first:
                x = layer(x)
            for block in self.blocks:
                x = block(x)
            return x

    model = Widening().double()
    hf_hwbp.patch_model(model, k=1, layers=[model.first, model.blocks])
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    patch = hf_hwbp.highway_state(model)
    assert [s.layers for s in patch.hooked_stacks] == [tuple(model.first), tuple(model.blocks)]
    assert [s.layers for s in patch.stacks] == [tuple(model.blocks)]


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(x))


def test_reinstall_hooks_puts_the_patch_first():
    """A pre-hook prepended after patching (as FSDP2's fully_shard registers its own) runs before the patch's; after
    reinstall_hooks the patch sees the layer's input first, so the stack is already recording when it runs."""
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    patch = hf_hwbp.highway_state(model)
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda *_: seen.append(patch.is_recording(0)), prepend=True)
    lm_loss(model)
    patch.reinstall_hooks()
    expected = expected_grads(model, lm_loss, 1)
    model.zero_grad(set_to_none=True)
    lm_loss(model).backward()
    assert seen == [False, False, True]  # the reference's forward runs under exact_backprop: not recorded
    assert_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, expected)
    hf_hwbp.unpatch_model(model)
    with pytest.raises(HighwayBPError, match="removed"):
        patch.reinstall_hooks()


def test_lifecycle_is_checked_and_reset_by_remove():
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    patch = hf_hwbp.highway_state(model)
    assert type(patch.lifecycle) is ParameterLifecycle
    with pytest.raises(TypeError, match="ParameterLifecycle"):
        patch.lifecycle = object()
    patch.lifecycle = Consumes(block=0)
    hf_hwbp.unpatch_model(model)
    assert type(patch.lifecycle) is ParameterLifecycle
