"""The suite's patch-on-build hook (modes.py) patches what transformers' tests build, as the suite claims: the
outermost model only, once, at k = 1 or k = L, models loaded with ``from_pretrained`` too; nothing unpatched.
These run in the default test command (a few seconds): without them a patched mode that silently patched nothing
would pass every transformers test."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

import hf_hwbp
from hf_hwbp import patching

from .modes import patch_on_build


def _gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)


def _t5_config() -> T5Config:
    return T5Config(vocab_size=50, d_model=16, d_ff=24, d_kv=8, num_layers=3, num_decoder_layers=2, num_heads=2)


def test_unpatched_mode_patches_nothing():
    with patch_on_build("unpatched"):
        model = GPT2LMHeadModel(_gpt2_config())
    assert not hf_hwbp.is_patched(model)


@pytest.mark.parametrize("mode, k", [("k1", 1), ("kL", 3)])
def test_outermost_model_patched_once(mode, k):
    with patch_on_build(mode):
        model = GPT2LMHeadModel(_gpt2_config())
        assert hf_hwbp.is_patched(model)
        assert not hf_hwbp.is_patched(model.transformer)  # the base model built inside the head model
        assert hf_hwbp.get_highway_config(model).k == k
        assert [len(s.layers) for s in hf_hwbp.highway_state(model).stacks] == [3]
        assert patching.EXACT_STEPS_BY_AUTOGRAD is (mode != "kL")  # k = L runs the Highway engine
    assert patching.EXACT_STEPS_BY_AUTOGRAD is True
    assert not hf_hwbp.is_patched(GPT2LMHeadModel(_gpt2_config()))  # the hook is gone afterwards


def test_k_equals_longest_stack_of_encoder_decoder():
    with patch_on_build("kL"):
        model = T5ForConditionalGeneration(_t5_config())
    assert [len(s.layers) for s in hf_hwbp.highway_state(model).stacks] == [3, 2]
    assert hf_hwbp.get_highway_config(model).k == 3


def test_loaded_and_built_from_config_models_are_patched():
    with patch_on_build("k1"), tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(_gpt2_config()).save_pretrained(tmp)
        assert hf_hwbp.is_patched(GPT2LMHeadModel.from_pretrained(tmp))
        assert hf_hwbp.is_patched(AutoModelForCausalLM.from_pretrained(tmp))
        assert hf_hwbp.is_patched(AutoModelForCausalLM.from_config(_gpt2_config()))


def test_patched_step_runs_highway():
    """A training step of a model built under the hook runs Highway-BP (k iterations), not autograd's backward."""
    with patch_on_build("k1"):
        model = GPT2LMHeadModel(_gpt2_config())
        model.train()
        ids = torch.randint(0, 50, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        assert hf_hwbp.last_highway_iterations(model) == 1
        twin = copy.deepcopy(model)
        assert hf_hwbp.is_patched(twin)
