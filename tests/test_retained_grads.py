"""What a returned hidden state or attention map gets after ``retain_grad()`` under Highway-BP(k): the gradient
the definition gives it (docs/algorithm.md, side outputs).

- a hidden state h_j between blocks: delta^(k)_j (the stack input h_0 too);
- an attention map s_j of block j: (dh_j/ds_j)^T delta^(k)_j, plus what the loss sends it directly.

Checked against tests/reference.py's deltas at k < L and against autograd at k = L (the engine, float64), and
transformers' own ``test_retain_grad_hidden_states_attentions`` reproduced."""

from __future__ import annotations

import pytest
import torch
from reference import reference_highway_grads
from tiny_models import ZOO, ZOO_LAYERS

import hf_hwbp

L = ZOO_LAYERS
RTOL = 1e-10  # float64: the same operations in another order
ATTENTION_WEIGHT = 0.5


def model_of(name: str):
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if name == "gpt2" else {}
    model = ZOO[name].build(**no_dropout)
    model.config._attn_implementation = "eager"  # attention maps are returned by eager attention only
    return model


def forward(model, kept: dict) -> torch.Tensor:
    """A loss on the logits and, directly, on one attention map; every returned state and map retains its grad."""
    out = model(input_ids=ZOO["gpt2"].batch()["input_ids"], output_hidden_states=True, output_attentions=True)
    for tensor in (*out.hidden_states, *out.attentions):
        if not tensor.is_leaf:
            tensor.retain_grad()
    kept["out"] = out
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(5), dtype=out.logits.dtype)
    return (out.logits * weights).sum() + ATTENTION_WEIGHT * out.attentions[1].pow(2).sum()


def retained(out) -> tuple[list, list]:
    return [h.grad for h in out.hidden_states], [a.grad for a in out.attentions]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual is not None, f"{what}: no gradient"
    err = (actual - expected).norm().item() / max(expected.norm().item(), 1e-30)
    assert err <= RTOL, f"{what}: relative error {err:.3e}"


@pytest.mark.parametrize("k", [0, 1, 2])
def test_retained_gradients_are_highway_bps_at_k(k):
    model = model_of("gpt2")
    kept: dict = {}
    runs: list = []
    reference_highway_grads(model, model.transformer.h, lambda m: forward(m, kept), k, runs=runs)
    (run,) = runs
    reference = kept["out"]
    expected_states = [run.delta[j] for j in range(L)]  # h_0 .. h_{L-1}; hidden_states[L] is the final norm's output
    expected_maps = []
    for j, attention in enumerate(reference.attentions):  # block j + 1's map, inside its local graph
        (through_block,) = torch.autograd.grad(run.outputs[j], attention, run.delta[j + 1], retain_graph=True)
        direct = 2 * ATTENTION_WEIGHT * attention.detach() if j == 1 else 0
        expected_maps.append(through_block + direct)
    hf_hwbp.patch_model(model, k=k)
    forward(model, kept).backward()
    states, maps = retained(kept["out"])
    for j in range(L):
        assert_close(states[j], expected_states[j], f"hidden_states[{j}]")
        assert_close(maps[j], expected_maps[j], f"attentions[{j}]")


@pytest.mark.usefixtures("engine_at_exact_steps")  # k = L: the engine's retained gradients against autograd's
def test_retained_gradients_are_exact_at_k_equal_depth():
    model = model_of("gpt2")
    kept: dict = {}
    forward(model, kept).backward()
    states, maps = retained(kept["out"])
    model.zero_grad(set_to_none=True)
    hf_hwbp.patch_model(model, k=L)
    forward(model, kept).backward()
    assert hf_hwbp.last_highway_iterations(model) == L and hf_hwbp.highway_state(model).recorded_forwards == 1
    got_states, got_maps = retained(kept["out"])
    for j in range(L + 1):
        assert_close(got_states[j], states[j], f"hidden_states[{j}]")
    for j in range(L):
        assert_close(got_maps[j], maps[j], f"attentions[{j}]")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_retain_grad_hidden_states_attentions(name):
    """transformers' test_retain_grad_hidden_states_attentions (tests/test_modeling_common.py), on a patched model at
    k = 1: the first hidden state and the first attention map get a gradient from the first output element."""
    model = model_of(name)
    hf_hwbp.patch_model(model, k=1)
    outputs = model(input_ids=ZOO[name].batch()["input_ids"], output_hidden_states=True, output_attentions=True)
    output = outputs[0]
    hidden_states = outputs.hidden_states[0]
    hidden_states.retain_grad()
    attentions = outputs.attentions[0]
    attentions.retain_grad()
    output.flatten()[0].backward(retain_graph=True)
    assert hidden_states.grad is not None
    assert attentions.grad is not None
