"""What makes a list of layers a residual stack (docs/algorithm.md): each layer keeps the hidden state's shape, runs
once per forward of the model, in order, on the output of the one before. Discovery leaves out what its structure
shows is not one; the forward checks the rest before any gradient exists. Also: exact steps run the model's own
backward, eval-mode forwards say so, and the iteration count describes the last step."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from reference import grads_of, reference_highway_grads
from tiny_models import ZOO, one_thread  # noqa: F401 (fixture)
from torch import nn
from transformers import SwinConfig, SwinForImageClassification, XLMConfig, XLMWithLMHeadModel
from transformers.utils import logging as hf_logging

import hf_hwbp
from hf_hwbp.discovery import find_stacks

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.usefixtures("engine_at_exact_steps")]


def max_error(actual: dict, expected: dict) -> float:
    assert actual.keys() == expected.keys()
    return max(((actual[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-30)).item() for n in expected)


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class Widen(nn.Module):
    """Not a residual block: changes the width."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 2 * width)

    def forward(self, h):
        return torch.tanh(self.linear(h))


class TwoLists(nn.Module):
    """A list that is not a stack (its first layer widens the state), then a residual stack."""

    def __init__(self, widen_at: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 4)
        widths = [4 if i < widen_at else 8 for i in range(2)]
        self.front = nn.ModuleList([Widen(4) if i == widen_at else Residual(widths[i]) for i in range(2)])
        self.layers = nn.ModuleList([Residual(8) for _ in range(3)])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.front:
            h = layer(h)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).pow(2).sum()


def inputs() -> torch.Tensor:
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(1))


def test_a_first_layer_that_changes_the_shape_is_let_go(caplog):
    model = TwoLists()
    exact = grads_of(model, lambda m: m(inputs()))
    hf_hwbp.patch_model(model, k=1, layers=[model.front, model.layers])
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            highway = grads_of(model, lambda m: m(inputs()))
    finally:
        hf_logging.disable_propagation()
    assert any("is not a residual stack" in r.getMessage() for r in caplog.records)
    assert [s.path for s in hf_hwbp.highway_state(model).stacks] == ["layers"]
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.layers, lambda m: m(inputs()), 1)
    assert max_error(highway, expected) < 1e-12  # front trains with backprop, layers with Highway-BP(1)
    assert max_error(expected, exact) > 1e-3
    hf_hwbp.set_highway_k(model, 3)
    assert max_error(grads_of(model, lambda m: m(inputs())), exact) < 1e-12


def test_a_later_layer_that_changes_the_shape_is_refused_before_any_gradient():
    model = TwoLists(widen_at=1)
    hf_hwbp.patch_model(model, k=1, layers=[model.front, model.layers])
    with pytest.raises(hf_hwbp.HighwayBPError, match="keep the hidden state's shape.*layers="):
        model(inputs()).backward()
    assert all(p.grad is None for p in model.parameters())


def test_discovery_follows_the_definition():
    swin = SwinForImageClassification(
        SwinConfig(image_size=16, patch_size=2, embed_dim=8, depths=[2, 3], num_heads=[2, 2], window_size=2)
    )
    assert [s.path for s in find_stacks(swin)] == ["swin.encoder.layers.0.blocks", "swin.encoder.layers.1.blocks"]
    xlm = XLMWithLMHeadModel(XLMConfig(vocab_size=64, emb_dim=16, n_layers=2, n_heads=2))
    with pytest.raises(hf_hwbp.UnsupportedModelError, match="found no residual stack.*layers="):
        hf_hwbp.patch_model(xlm, k=1)  # attentions, layer_norm1, ffns, layer_norm2: one layer over four lists
    assert not hf_hwbp.is_patched(xlm)


def lm_loss(batch: dict):
    def loss(model: nn.Module) -> torch.Tensor:
        torch.manual_seed(7)  # GPT-2's dropout: the same masks in every pass
        return model(**batch).loss

    return loss


def test_exact_steps_run_the_models_own_backward():
    entry = ZOO["gpt2"]
    model, batch = entry.build(), entry.batch()
    exact = grads_of(model, lm_loss(batch))
    hf_hwbp.patch_model(model, k=3)
    patch = hf_hwbp.highway_state(model)
    patch.exact_steps_by_autograd = True  # the users' default (this file runs the engine at exact steps)
    loss = lm_loss(batch)(model)
    assert patch.recorded_forwards == 0 and "_StackEntry" not in repr(loss.grad_fn)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert max_error({n: p.grad for n, p in model.named_parameters()}, exact) == 0
    assert hf_hwbp.last_highway_iterations(model) == 3  # the same gradient as Highway-BP(k = L)
    hf_hwbp.set_highway_k(model, 1)
    grads_of(model, lm_loss(batch))
    assert patch.recorded_forwards == 1 and hf_hwbp.last_highway_iterations(model) == 1


def test_the_iteration_count_describes_the_last_step(caplog):
    entry = ZOO["gpt2"]
    model, batch = entry.build(), entry.batch()
    hf_hwbp.patch_model(model, k=1)
    assert hf_hwbp.last_highway_iterations(model) is None
    grads_of(model, lm_loss(batch))
    assert hf_hwbp.last_highway_iterations(model) == 1
    assert hf_hwbp.last_highway_iterations(model) == 1  # reading does not consume it
    with hf_hwbp.exact_backprop(model):
        grads_of(model, lm_loss(batch))
    assert hf_hwbp.last_highway_iterations(model) is None
    grads_of(model, lm_loss(batch))
    model.eval()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            grads_of(model, lm_loss(batch))
            grads_of(model, lm_loss(batch))
            report = hf_hwbp.measure_fidelity(model, lm_loss(batch))
    finally:
        hf_logging.disable_propagation()
    assert hf_hwbp.last_highway_iterations(model) is None
    eval_warnings = [r for r in caplog.records if "a forward with gradients enabled" in r.getMessage()]
    assert len(eval_warnings) == 1 and "model.train()" in eval_warnings[0].getMessage()  # said once
    assert not report.highway_active and report.cosine == pytest.approx(1.0)
    assert any("was not active" in r.getMessage() for r in caplog.records)
    model.train()
    assert hf_hwbp.measure_fidelity(model, lm_loss(batch)).highway_active


def test_a_held_loss_keeps_no_patch_alive():
    entry = ZOO["gpt2"]
    model, batch = entry.build(), entry.batch()
    hf_hwbp.patch_model(model, k=1)
    patch = weakref.ref(hf_hwbp.highway_state(model))
    loss = model(**batch).loss
    hf_hwbp.unpatch_model(model)
    gc.collect()
    assert patch() is None and loss.grad_fn is not None
