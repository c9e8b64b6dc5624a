"""A backward that creates a graph (``create_graph=True``: gradient penalties, Hessian-vector products) through a
patched stack is refused before any parameter gets a gradient, whether the loss is the model's own or computed
from what it returned (the head and the final norm sit above the stack, so their gradients come first); steps that
run the model's own backward (exact steps, ``exact_backprop``) compute it exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ZOO, ZOO_LAYERS

import hf_hwbp

MODELS = ["gpt2", "llama"]


def loss_inside(model):
    return model(**ZOO[model.config.model_type].batch()).loss


def loss_from_logits(model):
    batch = ZOO[model.config.model_type].batch()
    logits = model(input_ids=batch["input_ids"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())


def loss_from_hidden_states(model):
    batch = ZOO[model.config.model_type].batch()
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    return out.hidden_states[-1].pow(2).mean() + out.hidden_states[1].pow(2).mean()


LOSSES = pytest.mark.parametrize("loss_fn", [loss_inside, loss_from_logits, loss_from_hidden_states])


@pytest.mark.parametrize("name", MODELS)
@LOSSES
def test_create_graph_is_refused_before_any_gradient(name, loss_fn):
    model = ZOO[name].build()
    hf_hwbp.patch_model(model, k=1)
    loss = loss_fn(model)
    with pytest.raises(hf_hwbp.HighwayBPError, match="create_graph=True") as info:
        loss.backward(create_graph=True)
    assert "exact_backprop" in str(info.value)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


@pytest.mark.parametrize("name", MODELS)
def test_a_gradient_penalty_is_exact_where_the_step_is_the_models_own_backward(name):
    """Under exact_backprop and at k >= L (run as the model's own backward by default) create_graph works."""

    def penalized(model):
        loss = loss_from_logits(model)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        return torch.autograd.grad(loss + penalty, params)

    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if name == "gpt2" else {}
    model = ZOO[name].build(**no_dropout)
    model.config._attn_implementation = "eager"  # SDPA on CPU has no double backward
    expected = penalized(model)
    hf_hwbp.patch_model(model, k=1)
    with hf_hwbp.exact_backprop(model):
        assert all(torch.equal(a, b) for a, b in zip(penalized(model), expected))
    hf_hwbp.set_highway_k(model, ZOO_LAYERS)
    assert all(torch.equal(a, b) for a, b in zip(penalized(model), expected))
