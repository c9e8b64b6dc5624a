"""patch_model's settings as users pass them: a config through ``config=``, warnings for settings that do less than
they seem to (once per setting), and what ``last_highway_iterations`` reports for each kind of step."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ZOO, ZOO_LAYERS
from transformers.testing_utils import CaptureLogger

import hf_hwbp
from hf_hwbp import patching
from hf_hwbp.config import HighwayConfig

L = ZOO_LAYERS


def gpt2():
    return ZOO["gpt2"].build()


def train_step(model) -> None:
    model.zero_grad(set_to_none=True)
    model(**ZOO["gpt2"].batch()).loss.backward()


def grads(model) -> list[torch.Tensor]:
    torch.manual_seed(3)  # GPT-2's dropout: the same masks for every model
    train_step(model)
    return [p.grad.clone() for p in model.parameters()]


# ----- config= ---------------------------------------------------------------------------------------------------
def test_a_config_is_passed_as_config():
    config = HighwayConfig(k=1, group_size=1, tol=1e-9, backend="sequential")
    by_config = hf_hwbp.patch_model(gpt2(), config=config)
    by_keywords = hf_hwbp.patch_model(gpt2(), k=1, group_size=1, tol=1e-9, backend="sequential")
    assert hf_hwbp.get_highway_config(by_config) == config
    assert all(torch.equal(a, b) for a, b in zip(grads(by_config), grads(by_keywords)))


def test_a_config_as_k_is_refused():
    model = gpt2()
    with pytest.raises(TypeError, match=r"as k: pass it as patch_model\(model, config=config\)"):
        hf_hwbp.patch_model(model, HighwayConfig(k=1))
    assert not hf_hwbp.is_patched(model)


@pytest.mark.parametrize(
    "settings",
    [dict(k_schedule="step"), dict(k_schedule="exact_last", exact_last_steps=3), dict(fidelity_steps=10)],
)
def test_a_training_config_is_refused_not_dropped(settings):
    model = gpt2()
    with pytest.raises(TypeError, match="not a HighwayTrainingConfig.*HighwayCallback / HighwayTrainer"):
        hf_hwbp.patch_model(model, config=hf_hwbp.HighwayTrainingConfig(k=1, **settings))
    assert not hf_hwbp.is_patched(model)
    with pytest.raises(TypeError, match=next(iter(settings))):
        HighwayConfig(k=1, **settings)  # the engine config has no training settings to drop


def test_a_config_and_keywords_are_one_or_the_other():
    model = gpt2()
    config = HighwayConfig(k=1)
    with pytest.raises(TypeError, match=r"config= and tol.*config.updated\(tol=...\)"):
        hf_hwbp.patch_model(model, config=config, tol=1e-3)
    with pytest.raises(TypeError, match=r"config= and k"):
        hf_hwbp.patch_model(model, 3, config=config)
    with pytest.raises(TypeError, match="config must be a HighwayConfig"):
        hf_hwbp.patch_model(model, config={"k": 1})
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        HighwayConfig(k="auto")
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        hf_hwbp.set_highway_config(hf_hwbp.patch_model(model, k=1), k="auto")
    assert hf_hwbp.get_highway_config(model).k == 1


# ----- warnings, once per setting --------------------------------------------------------------------------------
def test_a_k_past_the_blocks_is_clamped_with_a_warning_once_per_setting():
    model = gpt2()
    with CaptureLogger(patching.logger) as first:
        hf_hwbp.patch_model(model, k=10)
    assert f"k=10 is more than the {L} Highway blocks" in first.out and "clamped" in first.out
    with CaptureLogger(patching.logger) as again:
        hf_hwbp.patch_model(model, k=10)
        hf_hwbp.set_highway_k(model, 10)
        hf_hwbp.set_highway_k(model, L)  # k = L: exact, as asked; nothing to say
    assert again.out == ""
    with CaptureLogger(patching.logger) as other:
        hf_hwbp.set_highway_config(model, k=11)
    assert "k=11 is more than" in other.out
    assert hf_hwbp.highway_state(model).effective_k == L


def test_a_group_size_that_makes_one_block_says_so_once():
    model = gpt2()
    with CaptureLogger(patching.logger) as first:
        hf_hwbp.patch_model(model, k=1, group_size=L)
    assert f"group_size={L} puts all {L} layers of transformer.h into one Highway block" in first.out
    with CaptureLogger(patching.logger) as again:
        hf_hwbp.patch_model(model, k=1, group_size=L)
        hf_hwbp.set_highway_config(model, group_size=1)
    assert again.out == ""


# ----- last_highway_iterations -----------------------------------------------------------------------------------
def test_last_highway_iterations_says_which_gradient_the_last_step_delivered():
    """k after a Highway-BP step; L after an exact step the settings ask for (run as the model's own backward);
    None where Highway-BP was off for the step (exact_backprop, eval mode) or before any step."""
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    assert hf_hwbp.last_highway_iterations(model) is None
    train_step(model)
    assert hf_hwbp.last_highway_iterations(model) == 1
    hf_hwbp.set_highway_k(model, L)
    train_step(model)
    assert hf_hwbp.highway_state(model).recorded_forwards == 1  # the exact step recorded nothing
    assert hf_hwbp.last_highway_iterations(model) == L
    with hf_hwbp.exact_backprop(model):
        train_step(model)
    assert hf_hwbp.last_highway_iterations(model) is None
    hf_hwbp.set_highway_k(model, 2)
    train_step(model)
    assert hf_hwbp.last_highway_iterations(model) == 2
    model.eval()
    train_step(model)
    assert hf_hwbp.last_highway_iterations(model) is None
