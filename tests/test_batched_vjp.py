"""Batched input- and parameter-VJPs over stacked block weights (hf_hwbp.batched), against autograd and
the engine's recorded-graph Highway-BP, float64 on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_hwbp.batched import BatchedBlocks, BatchedStack
from hf_hwbp.engine import highway_backward, run_recursion
from hf_hwbp.errors import HighwayBPError
from hf_hwbp.parallel.stages import build_stage

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import build  # noqa: E402

LAYERS = 4


def _recorded(arch: str, seed: int = 0):
    """A float64 stack: its layers, side inputs, each block's leaf input and output, and a gradient at the top."""
    torch.manual_seed(seed)
    model = build(arch, LAYERS)
    stage = build_stage(model, 0, 1)
    ids = torch.randint(0, 64, (2, 12))
    h = stage.embed(ids).detach()
    kwargs = stage.layer_kwargs(h)
    inputs, outputs = [], []
    for i in range(LAYERS):
        x = h.detach().requires_grad_(True)
        h = stage.run_layers(x, range(i, i + 1), kwargs)
        inputs.append(x)
        outputs.append(h)
    return stage, kwargs, inputs, outputs, torch.randn_like(h)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_input_vjps_equal_each_blocks_autograd(arch):
    stage, kwargs, inputs, outputs, _ = _recorded(arch)
    grads = torch.randn(LAYERS, *outputs[0].shape, dtype=torch.float64)
    batched = BatchedBlocks(list(stage.layers), kwargs)
    got = batched.input_vjps(torch.stack([x.detach() for x in inputs]), grads)
    for j in range(LAYERS):
        (want,) = torch.autograd.grad(outputs[j], inputs[j], grads[j], retain_graph=True)
        want = want - grads[j]
        assert float((got[j] - want).norm() / want.norm()) <= 1e-12
    part = batched.input_vjps(torch.stack([x.detach() for x in inputs[1:3]]), grads[1:3], slice(1, 3))
    assert torch.allclose(part, got[1:3], rtol=1e-12, atol=0)  # a slice of the stack is those blocks


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [0, 1, 2, LAYERS])
def test_batched_highway_equals_the_engine(arch, k):
    stage, kwargs, inputs, outputs, d = _recorded(arch)
    params = [p for layer in stage.layers for p in layer.parameters()]
    stack = BatchedStack(list(stage.layers), torch.stack([x.detach() for x in inputs]), d, kwargs)
    delta, iterations = run_recursion(stack, k)
    stack.accumulate_param_grads(delta)
    got = [p.grad.clone() for p in params]
    ref = highway_backward(inputs, outputs, params, d, k=k)
    assert iterations == min(k, LAYERS)
    assert float((delta[0] - ref.input_grad).norm() / ref.input_grad.norm()) <= 1e-10
    for g, r in zip(got, ref.param_grads):
        assert float((g - r).norm() / r.norm()) <= 1e-10


def test_batched_highway_at_k_equal_depth_is_exact_backprop():
    stage, kwargs, inputs, outputs, d = _recorded("gpt2", seed=1)
    params = [p for layer in stage.layers for p in layer.parameters()]
    stack = BatchedStack(list(stage.layers), torch.stack([x.detach() for x in inputs]), d, kwargs)
    delta, _ = run_recursion(stack, LAYERS)
    stack.accumulate_param_grads(delta)
    # exact backprop through the same blocks, chained (not cut at the block inputs)
    x = inputs[0].detach().requires_grad_(True)
    h = x
    for i in range(LAYERS):
        h = stage.run_layers(h, range(i, i + 1), kwargs)
    exact = torch.autograd.grad(h, [x, *params], d)
    assert float((delta[0] - exact[0]).norm() / exact[0].norm()) <= 1e-10
    for p, e in zip(params, exact[1:]):
        assert float((p.grad - e).norm() / e.norm()) <= 1e-10


def test_reused_blocks_are_not_recomputed():
    stage, kwargs, inputs, _, d = _recorded("gpt2")
    batched = BatchedBlocks(list(stage.layers), kwargs)
    sizes = []
    original = batched.input_vjps

    def counting(x, g, blocks=slice(None)):
        sizes.append(x.shape[0])
        return original(x, g, blocks)

    batched.input_vjps = counting
    run_recursion(BatchedStack(batched, torch.stack([x.detach() for x in inputs]), d, need_input_grad=False), 3)
    assert sizes == [3, 2, 1]  # blocks 2..4, then 2..3, then 2 (block 1 feeds only the unwanted delta_0)


def test_active_dropout_or_mixed_blocks_are_refused():
    model = build("gpt2", 2)
    model.transformer.h[0].mlp.dropout.p = 0.1
    with pytest.raises(HighwayBPError, match="dropout"):
        BatchedBlocks(list(model.transformer.h))
    llama = build("llama", 1)
    with pytest.raises(HighwayBPError, match="one architecture"):
        BatchedBlocks([model.transformer.h[1], llama.model.layers[0]])
