"""The zoo: transformers architectures built from tiny configs and patched WITHOUT layers= (the stacks are found
from their structure): exact at k >= L against unpatched autograd, and k = 1, 2 against the independent
reference of tests/reference.py. Dropout stays at each config's default (same seed for every pass)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from reference import reference_highway_grads, residual_gates
from tiny_models import (  # noqa: F401 (one_thread: fixture)
    _S2S,
    REFUSAL_PENDING,
    REFUSED,
    WAY_OUT,
    ZOO,
    ZOO_LAYERS,
    ZOO_PENDING,
    ZooEntry,
    one_thread,
)
from transformers.utils import logging as hf_logging

import hf_hwbp
from hf_hwbp import HighwayBPError
from hf_hwbp.model_patches import supported_model_types

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")

SEED = 7
# float64: the Highway sums differ from autograd's only by rounding (observed <= 1e-13 relative).
# float32 (MoE: the grouped-matmul expert kernels refuse float64): the same products summed in another order,
# float32 rounding (6e-8) through 3 layers, softmax and the router's top-k weights: observed <= 3e-7 at k = L
# against autograd and <= 3e-8 against the reference; 1e-5 leaves a 30x margin and is far below the k = 1 vs
# exact differences (> 1e-2) the test must tell apart.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def loss_of(model: torch.nn.Module, batch: dict, entry: ZooEntry | None = None) -> torch.Tensor:
    """The entry's loss (the same dropout masks in every pass); the model's own loss when no entry is given."""
    if entry is not None:
        return entry.loss(model, batch)
    torch.manual_seed(SEED)
    return model(**batch).loss


def grads_of(model: torch.nn.Module, batch: dict, entry: ZooEntry | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch, entry).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def max_relative_error(actual: dict, expected: dict) -> float:
    """max over parameters of ||a - b|| / ||b||; parameters whose gradient vanishes (softmax ignores a shift of the
    key biases) are measured against 1e-6 of the largest gradient norm instead."""
    assert actual.keys() == expected.keys()
    floor = 1e-6 * max(g.double().norm().item() for g in expected.values())
    return max(
        (actual[n].double() - expected[n].double()).norm().item() / max(expected[n].double().norm().item(), floor)
        for n in expected
    )


def reference_gates(entry, state):
    return residual_gates([s.layers for s in state.stacks])


def _cases(names, pending):
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=pending[n])) if n in pending else n
        for n in sorted(names)
    ]


@pytest.mark.parametrize("name", _cases(ZOO, ZOO_PENDING))
def test_zoo_exact_at_L_and_reference_below(name):
    entry = ZOO[name]
    model, batch = entry.build(), entry.batch()
    rtol = entry.rtol or RTOL[entry.dtype]
    exact = grads_of(model, batch, entry)
    hf_hwbp.patch_model(model, k=ZOO_LAYERS)
    state = hf_hwbp.highway_state(model)
    assert [len(s) * s.repeats for s in state.stacks] == [ZOO_LAYERS] * entry.stacks  # blocks per forward
    assert max_relative_error(grads_of(model, batch, entry), exact) <= rtol
    assert hf_hwbp.last_highway_iterations(model) == ZOO_LAYERS
    for k in (1, 2):
        with hf_hwbp.exact_backprop(model), reference_gates(entry, state) as gate:  # the model's own backward
            expected = reference_highway_grads(
                model,
                [s.layers for s in state.stacks],
                lambda m: loss_of(m, batch, entry),
                k,
                residual_gate=gate,
                streams=entry.streams,
            )
        hf_hwbp.set_highway_k(model, k)
        assert max_relative_error(grads_of(model, batch, entry), expected) <= rtol
        assert hf_hwbp.last_highway_iterations(model) == k
        assert max_relative_error(expected, exact) > 1e-3  # k < L really differs from backprop here


@pytest.mark.parametrize("name", _cases(REFUSED, REFUSAL_PENDING))
def test_refused_before_any_gradient_with_a_way_out(name):
    entry = REFUSED[name]
    model, batch = entry.build(), entry.batch()
    with pytest.raises(HighwayBPError, match=WAY_OUT):
        hf_hwbp.patch_model(model, k=1)
        entry.loss(model, batch).backward()
    assert all(p.grad is None for p in model.parameters())


def _executed(model: torch.nn.Module, stacks, run) -> list[list[torch.nn.Module]]:
    """The layers of each stack that a forward really ran (LayerDrop skips some), in order."""
    ran: list[torch.nn.Module] = []
    handles = [layer.register_forward_pre_hook(lambda m, a: ran.append(m)) for s in stacks for layer in s]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return [[m for m in ran if any(m is layer for layer in s)] for s in stacks]


def test_layerdrop_runs_over_the_executed_layers_or_is_refused_at_patch_time():
    """m2m_100 with LayerDrop: either patch_model refuses it, or each seed's run is exact at k = L and equals the
    reference on the layers the forward ran at k = 1."""
    config = dict(_S2S, encoder_layerdrop=0.3, decoder_layerdrop=0.3)
    entry = ZooEntry("m2m_100", "M2M100ForConditionalGeneration", config, "seq2seq", stacks=2)
    batch = entry.batch()
    dropped = 0
    for seed in range(6):

        def loss_fn(m, seed=seed):
            torch.manual_seed(100 + seed)  # which layers are dropped
            return m(**batch).loss

        model = entry.build()
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        exact = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        try:
            hf_hwbp.patch_model(model, k=ZOO_LAYERS)
        except HighwayBPError as error:
            assert "layerdrop" in str(error).lower()
            return
        loss_fn(model).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert max_relative_error(got, exact) <= RTOL[entry.dtype]
        stacks = [s.layers for s in hf_hwbp.highway_state(model).stacks]
        with hf_hwbp.exact_backprop(model):
            ran = _executed(model, stacks, loss_fn)
            dropped += sum(len(s) for s in stacks) - sum(len(r) for r in ran)
            expected = reference_highway_grads(model, [r for r in ran if r], loss_fn, 1)
        hf_hwbp.set_highway_k(model, 1)
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        # When LayerDrop skips every decoder layer the encoder output is unused: autograd leaves its grads None,
        # the reference writes zeros.
        assert all(not expected[n].any() for n in expected.keys() - got.keys())
        got.update({n: torch.zeros_like(expected[n]) for n in expected.keys() - got.keys()})
        assert max_relative_error(got, expected) <= RTOL[entry.dtype]
    assert dropped > 0  # the seeds really dropped layers


def test_tested_model_types_are_the_zoo():
    """supported_model_types() names exactly the model types the zoo checks exact."""
    exact = {entry.model_type for name, entry in ZOO.items() if name not in ZOO_PENDING}
    assert supported_model_types() == sorted(exact)


def test_models_page_is_generated_from_the_zoo():
    """docs/models.md is the output of scripts/supported_models_table.py (run it with --write after changing the zoo
    or a refusal's message)."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("supported_models_table", root / "scripts/supported_models_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.document() == (root / "docs" / "models.md").read_text()


def test_discovery_is_inspectable_and_logged_once(caplog):
    model = ZOO["bart"].build()
    hf_logging.set_verbosity_info()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO):
            hf_hwbp.patch_model(model, k=1)
            hf_hwbp.patch_model(model, k=2)  # an update of the settings: nothing new to say
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity_warning()
    found = [r.getMessage() for r in caplog.records if "Highway-BP" in r.getMessage()]
    assert len(found) == 1
    assert "model.encoder.layers (3 x BartEncoderLayer)" in found[0]
    assert "model.decoder.layers (3 x BartDecoderLayer)" in found[0]
    state = hf_hwbp.highway_state(model)
    assert [s.path for s in state.stacks] == ["model.encoder.layers", "model.decoder.layers"]
    assert state.stacks[1].layers[0] is model.model.decoder.layers[0]
    assert state.num_blocks == ZOO_LAYERS and state.config.k == 2


def test_resnet_stages_leave_the_shape_changing_layer_outside():
    model = ZOO["resnet"].build()
    hf_hwbp.patch_model(model, k=1)
    stages = model.resnet.encoder.stages
    paths = [s.path for s in hf_hwbp.highway_state(model).stacks]
    assert paths == ["resnet.encoder.stages.0.layers", "resnet.encoder.stages.1.layers[1:]"]
    assert hf_hwbp.highway_state(model).stacks[1].layers == tuple(stages[1].layers[1:])


def test_resnet_highway_follows_the_relu_gated_residual_path():
    """relu(h + g(h)): below k = L the gradient travels the ReLU-masked residual path, not the identity."""
    entry = ZOO["resnet"]
    model, batch = entry.build(), entry.batch()
    hf_hwbp.patch_model(model, k=1)
    state = hf_hwbp.highway_state(model)
    stacks = [s.layers for s in state.stacks]
    with hf_hwbp.exact_backprop(model):
        identity_path = reference_highway_grads(model, stacks, lambda m: loss_of(m, batch), 1)
        with reference_gates(entry, state) as gate:
            gated_path = reference_highway_grads(model, stacks, lambda m: loss_of(m, batch), 1, residual_gate=gate)
    assert max_relative_error(identity_path, gated_path) > 1e-3  # the two readings really differ here
    assert max_relative_error(grads_of(model, batch), gated_path) <= RTOL[torch.float64]
    with pytest.raises(ValueError, match="group_size must be 1"):
        hf_hwbp.set_highway_config(model, group_size=2)
        grads_of(model, batch)


def test_resnet_with_another_activation_is_refused():
    model = ZOO["resnet"].build(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'.*layers="):
        hf_hwbp.patch_model(model, k=1)


def test_model_without_a_residual_stack_raises_and_shows_layers():
    mixed = torch.nn.Module()
    mixed.parts = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Tanh()])  # no list of repeated layers
    with pytest.raises(ValueError, match="found no residual stack") as info:
        hf_hwbp.patch_model(mixed, k=2)
    assert "layers=" in str(info.value)
    with pytest.raises(ValueError, match="layers="):
        hf_hwbp.patch_model(torch.nn.Linear(3, 3), k=1)
    assert not hf_hwbp.is_patched(mixed)
