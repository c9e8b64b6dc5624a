"""Activation checkpointing is told apart by what it does, not by how its function was built: a wrapper around the
non-reentrant checkpoint function (a lambda, a ``unittest.mock.Mock`` counting recomputations, a profiler) trains
as the bare function does; the reentrant form (the layer's forward with gradients disabled inside a training
forward) is refused before any gradient, wrapped or not."""

from __future__ import annotations

import functools
from unittest import mock

import pytest
import reference
import torch
from reference import reference_highway_grads
from tiny_models import ZOO, ZOO_LAYERS
from torch.utils.checkpoint import checkpoint

import hf_hwbp

L = ZOO_LAYERS
RTOL = 1e-10  # float64: the same operations, recomputed


def seeded_loss(model):
    torch.manual_seed(11)  # GPT-2's dropout (0.1): the same masks in every pass and every recomputation
    return model(**ZOO["gpt2"].batch()).loss


def grads_of(model, loss_fn=seeded_loss) -> dict[str, torch.Tensor]:
    return reference.grads_of(model, loss_fn)  # the GPT-2 loss unless a test gives its own


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, b in expected.items():
        err = (actual[name] - b).norm().item() / max(b.norm().item(), 1e-30)
        assert err <= RTOL, f"{name}: relative error {err:.3e}"


def wrap_checkpoint_functions(model, wrap) -> list:
    """Put ``wrap(original)`` in place of every layer's checkpoint function; returns the wrappers."""
    wrappers = []
    for layer in model.transformer.h:
        layer._gradient_checkpointing_func = wrap(layer._gradient_checkpointing_func)
        wrappers.append(layer._gradient_checkpointing_func)
    return wrappers


WRAPPERS = {
    "lambda": lambda orig: lambda f, *a, **k: orig(f, *a, **k),
    "mock": lambda orig: mock.Mock(wraps=orig),
    "own_function": lambda orig: lambda f, *a, **k: checkpoint(f, *a, use_reentrant=False, **k),
}


@pytest.mark.usefixtures("engine_at_exact_steps")  # k = L: the engine through wrapped checkpoints vs autograd
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_wrapped_non_reentrant_checkpoint_trains(wrapper):
    model = ZOO["gpt2"].build()  # dropout 0.1: every recomputation must replay the forward's masks
    exact = grads_of(model)
    expected = reference_highway_grads(model, model.transformer.h, seeded_loss, 1)
    model.activation_checkpointing_enable()  # non-reentrant by default
    hf_hwbp.patch_model(model, k=1)
    wrappers = wrap_checkpoint_functions(model, WRAPPERS[wrapper])
    assert_close(grads_of(model), expected)
    if wrapper == "mock":
        assert all(w.call_count == 1 for w in wrappers)  # one checkpointed forward per layer
    hf_hwbp.set_highway_k(model, L)
    assert_close(grads_of(model), exact)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_reentrant_checkpointing_is_refused_before_any_gradient(wrapped):
    model = ZOO["gpt2"].build()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    hf_hwbp.patch_model(model, k=1)
    if wrapped:
        wrap_checkpoint_functions(model, WRAPPERS["lambda"])
    with pytest.raises(hf_hwbp.HighwayBPError, match="reentrant") as info:
        seeded_loss(model).backward()
    assert "activation_checkpointing_enable()" in str(info.value)
    assert all(p.grad is None for p in model.parameters())


def test_reentrant_checkpointing_by_the_users_own_function_is_refused():
    """Not built by transformers' kwargs at all: the user's function runs torch's reentrant checkpoint."""
    model = ZOO["gpt2"].build()
    model.activation_checkpointing_enable()
    hf_hwbp.patch_model(model, k=1)
    wrap_checkpoint_functions(model, lambda _: functools.partial(checkpoint, use_reentrant=True))
    with pytest.raises(hf_hwbp.HighwayBPError, match="reentrant"):
        seeded_loss(model)
    assert all(p.grad is None for p in model.parameters())


def test_a_checkpoint_that_does_not_restore_the_rng_state_is_refused_behind_a_wrapper():
    """preserve_rng_state=False hidden behind a wrapper (the forward cannot read it) with dropout: the recomputation
    in the Highway backward draws new random numbers, and the step is refused before any block parameter gets a
    gradient (the head's, above the stack, come first)."""
    model = ZOO["gpt2"].build()  # dropout 0.1
    model.activation_checkpointing_enable()
    hf_hwbp.patch_model(model, k=1)
    no_rng = functools.partial(checkpoint, use_reentrant=False, preserve_rng_state=False)
    wrap_checkpoint_functions(model, lambda _: lambda f, *a, **k: no_rng(f, *a, **k))
    with pytest.raises(hf_hwbp.HighwayBPError, match="preserve_rng_state=True"):
        seeded_loss(model).backward()
    assert all(p.grad is None for p in model.transformer.h.parameters())


@pytest.mark.parametrize("name", ["t5", "swin"])
def test_reentrant_checkpointing_is_refused_whatever_the_layout(name):
    """T5's block calls its sublayers through a list it never calls itself (a probe on its direct children never
    fires); Swin checkpoints its stages, around the stacks of blocks (the blocks' own hooks see gradients off and,
    unrefused, the stages' recomputation would silently give them backprop's gradient). Both refused before any
    gradient."""
    entry = ZOO[name]
    model = entry.build()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    hf_hwbp.patch_model(model, k=1)
    with pytest.raises(hf_hwbp.HighwayBPError, match="reentrant"):
        entry.loss(model, entry.batch()).backward()
    assert all(p.grad is None for p in model.parameters())


def test_non_reentrant_checkpointing_of_swins_stages_keeps_highway_bp():
    """Checkpointing around the stacks (non-reentrant): the stages' recomputation inside the backward is not
    recorded again, and the gradient is Highway-BP(1)'s as without checkpointing."""
    entry = ZOO["swin"]
    model = entry.build()
    hf_hwbp.patch_model(model, k=1)

    def loss_fn(m):
        torch.manual_seed(3)
        return entry.loss(m, entry.batch())

    without = grads_of(model, loss_fn)
    model.activation_checkpointing_enable()  # non-reentrant by default: transformers checkpoints each SwinStage
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.swin.encoder.layers)
    assert_close(grads_of(model, loss_fn), without)
    assert hf_hwbp.last_highway_iterations(model) == 1
