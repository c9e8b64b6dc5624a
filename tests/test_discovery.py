"""Discovery by structure (stages of down-sampling models, transformers' layer lists, hybrid stacks, heads beside a
stack), one layer applied at several depths (Highway-BP over the unrolled depth), and what stays refused. The
zoo (tests/test_zoo.py) checks the gradients of each family; these tests check what discovery and the forward
decide."""

from __future__ import annotations

import pytest
import torch
from reference import reference_highway_grads
from test_zoo import RTOL, grads_of, max_relative_error
from tiny_models import _ENC, AUTOFORMER, ZOO, ZooEntry, one_thread  # noqa: F401 (one_thread: fixture)
from torch import nn

import hf_hwbp
from hf_hwbp.discovery import find_stacks

pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")


def paths(model: nn.Module) -> list[str]:
    return [stack.path for stack in find_stacks(model)]


def test_a_stages_down_sampling_first_layer_stays_outside_its_stack():
    """BiT and RegNet stages: nn.Sequential lists whose first layer projects its shortcut (and strides)."""
    bit = ZOO["bit"].build()
    assert paths(bit) == ["bit.encoder.stages.0.layers[1:]", "bit.encoder.stages.1.layers[1:]"]
    stacks = find_stacks(bit)
    assert stacks[1].layers == tuple(bit.bit.encoder.stages[1].layers[1:])
    assert all(stack.residual_gate is None for stack in stacks)  # pre-activation layers: h + g(h)
    regnet = ZOO["regnet"].build()
    assert all(stack.residual_gate is not None for stack in find_stacks(regnet))  # relu(h + g(h))


def test_sibling_stage_lists_of_one_class_are_stages_not_per_operation_lists():
    """PVT's encoder.block holds one list per stage, all of one length: each is a stack."""
    assert paths(ZOO["pvt"].build()) == ["pvt.encoder.block.0", "pvt.encoder.block.1"]


def test_transformers_layer_lists_need_no_config_count():
    """Nemotron-H's layer count is a property (the length of its pattern); its hybrid blocks (Mamba, attention,
    MLP) differ from each other and all belong to the stack."""
    model = ZOO["nemotron_h"].build()
    assert "num_hidden_layers" not in model.config.to_dict()
    assert [len(s) for s in find_stacks(model)] == [3]


def test_autoformers_decoder_is_found_and_trained_with_highway():
    """Its decoder layers also project a trend with a convolution (a side output): still a stack."""
    import transformers

    config = transformers.AutoformerConfig(**AUTOFORMER)
    model = transformers.AutoformerForPrediction(config).train()
    assert paths(model) == ["model.encoder.layers", "model.decoder.layers"]
    entry = ZooEntry("autoformer", "AutoformerForPrediction", AUTOFORMER, "timeseries", torch.float32)
    hf_hwbp.patch_model(model, k=1)
    entry.loss(model, entry.batch()).backward()
    assert hf_hwbp.highway_state(model).recorded_forwards == 2  # both stacks ran Highway-BP


def test_shared_layers_run_highway_over_the_unrolled_depth():
    """ALBERT with one group of two layers run at two depths: 4 blocks per forward, exact at k = 4, the reference at
    k = 1, 2 (the shared parameters' gradient sums over depths)."""
    config = dict(_ENC, embedding_size=16, num_hidden_layers=2, num_hidden_groups=1, inner_group_num=2)
    entry = ZooEntry("albert", "AlbertForMaskedLM", config, "mlm")
    model, batch = entry.build(), entry.batch()
    exact = grads_of(model, batch, entry)
    hf_hwbp.patch_model(model, k=1)
    state = hf_hwbp.highway_state(model)
    assert [(len(s), s.repeats) for s in state.stacks] == [(2, 2)] and state.num_blocks == 4
    hf_hwbp.set_highway_k(model, 4)
    assert max_relative_error(grads_of(model, batch, entry), exact) <= RTOL[torch.float64]
    for k in (1, 2):
        with hf_hwbp.exact_backprop(model):
            expected = reference_highway_grads(
                model, [s.layers for s in state.stacks], lambda m: entry.loss(m, batch), k
            )
        hf_hwbp.set_highway_k(model, k)
        assert max_relative_error(grads_of(model, batch, entry), expected) <= RTOL[torch.float64]
        assert max_relative_error(expected, exact) > 1e-3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class Looped(nn.Module):
    """A loop over one block, three times, that no registry knows: the patch counts the passes it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 8)
        self.layers = nn.ModuleList([Block()])
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        for _ in range(3):
            h = self.layers[0](h)
        return self.head(h).pow(2).sum()


class _Call:
    """The entry interface of ``grads_of`` for a module called on one input."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(self.x)


def test_a_loop_over_one_block_is_followed_over_its_passes():
    model = Looped().double()
    call = _Call(torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    exact = grads_of(model, None, call)
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    grads_of(model, None, call)  # the first training forward shows the three passes
    assert hf_hwbp.highway_state(model).num_blocks == 3
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.layers, lambda m: call.loss(m, None), 1)
    assert max_relative_error(grads_of(model, None, call), expected) <= RTOL[torch.float64]
    assert max_relative_error(expected, exact) > 1e-3
    hf_hwbp.set_highway_k(model, 3)
    assert max_relative_error(grads_of(model, None, call), exact) <= RTOL[torch.float64]


def test_reversible_layers_stay_refused_before_any_gradient():
    from tiny_models import REFUSED

    entry = REFUSED["reformer"]
    model = entry.build()
    with pytest.raises(hf_hwbp.HighwayBPError, match="reversible.*ordinary backprop"):
        hf_hwbp.patch_model(model, k=1)
    assert all(p.grad is None for p in model.parameters())
