"""The model-family registry (``hf_hwbp.model_patches``): every entry is complete and consistent with transformers
and with the test zoo, the zoo's families find their knowledge through it, and a family registered at run time is
what discovery, the residual gates, the refusals and the stage recipes then use (checked on small custom models
against autograd and the independent reference of tests/reference.py)."""

from __future__ import annotations

import contextlib
import importlib
import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from reference import POST_ACTIVATION_CLASSES, pre_activation_gates, reference_highway_grads
from test_zoo import RTOL, max_relative_error
from tiny_models import REFUSED, WAY_OUT, ZOO, one_thread  # noqa: F401 (one_thread: fixture)
from torch import nn
from transformers import CONFIG_MAPPING

import hf_hwbp
from hf_hwbp import model_patches as registry
from hf_hwbp.discovery import _discover, find_stacks
from hf_hwbp.model_patches import ModelFamily, StageRecipeEntry, register_family, unregister_family
from hf_hwbp.parallel import arch, build_stage

pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")

FAMILIES = registry.families()
ZOO_TYPES = {entry.model_type for entry in ZOO.values()}
REFUSED_TYPES = {entry.model_type for entry in REFUSED.values()}


@contextlib.contextmanager
def registered(family: ModelFamily):
    register_family(family)
    try:
        yield family
    finally:
        unregister_family(family.name)


def _modeling_module(model_type: str) -> str:
    """transformers' modeling module of a model type (its config class lives in the package's configuration_*)."""
    return CONFIG_MAPPING[model_type].__module__.replace(".configuration_", ".modeling_")


# ----- every entry: complete and consistent -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_says_something_and_covers_real_model_types(family):
    """An entry holds knowledge discovery cannot read off the structure (else it is dead), for model types that
    transformers knows, each found back through the registry."""
    assert family.find_stacks or family.post_activation_layers or family.refusal or family.stage_recipes
    for model_type in family.model_types:
        assert model_type in CONFIG_MAPPING, model_type
        assert registry.family_of(model_type) is family
    assert registry.BUILTIN_FAMILIES == FAMILIES  # nothing registered behind the list's back


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_is_exercised_by_the_zoo(family):
    """A registered model type is built by tests/tiny_models.py: in the zoo (exact at k >= L, the reference at
    k < L) or among the models that must be refused."""
    for model_type in family.model_types:
        if family.refusal is not None:
            assert model_type in REFUSED_TYPES, model_type
        else:
            assert model_type in ZOO_TYPES, model_type


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.post_activation_layers], ids=lambda f: f.name)
def test_post_activation_layers_are_the_familys_own_classes(family):
    """Each gated layer class is a class of the family's own modeling code in transformers."""
    modules = [importlib.import_module(_modeling_module(t)) for t in family.model_types]
    for name in family.post_activation_layers:
        classes = [getattr(m, name) for m in modules if hasattr(m, name)]
        assert classes, f"{name} is not a class of {family.model_types}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.refusal], ids=lambda f: f.name)
def test_refusals_name_a_way_out_and_refuse_before_any_gradient(family):
    assert re.search(WAY_OUT, family.refusal)
    for entry in (e for e in REFUSED.values() if e.model_type in family.model_types):
        model = entry.build()
        with pytest.raises(hf_hwbp.UnsupportedModelError) as raised:
            hf_hwbp.patch_model(model, k=1)
        assert family.refusal in str(raised.value)
        assert all(p.grad is None for p in model.parameters())


def test_every_stage_recipe_is_checked_against_its_models_forward():
    """Each registered recipe's model type and head class match transformers' (the class's config is of that model
    type), and tests/test_parallel.py builds a model of it for its stages-in-a-row check."""
    from test_parallel import RECIPE_MODELS

    recipes = registry.stage_recipes()
    assert recipes
    assert arch.supported_models() == [entry.model_class for entry in recipes.values()]
    checked = {}
    for build in RECIPE_MODELS.values():
        model = build()
        checked.setdefault(model.config.model_type, set()).add(type(model).__name__)
    for model_type, entry in recipes.items():
        assert getattr(transformers, entry.model_class).config_class.model_type == model_type
        assert entry.model_class in checked.get(model_type, set()), f"no stage test builds {entry.model_class}"


def test_a_family_claims_its_model_types_alone():
    with pytest.raises(ValueError, match="already registered"):
        register_family(ModelFamily("Another GPT-2", ("gpt2",), refusal="no. Do not patch it."))
    with pytest.raises(ValueError, match="already registered"):
        register_family(ModelFamily("GPT-2", ("hwbp-test-unused",), refusal="no. Do not patch it."))
    with pytest.raises(ValueError, match="does not cover"):
        ModelFamily("Stray", ("a",), stage_recipes={"b": StageRecipeEntry("X", arch.GPT2_RECIPE)})
    with pytest.raises(ValueError, match="refused"):
        ModelFamily("Both", ("a",), refusal="no.", find_stacks=lambda model: [])
    with pytest.raises(TypeError, match="non-empty tuple"):
        ModelFamily("Bare", "gpt2")
    assert registry.family_of("hwbp-test-unused") is None


# ----- the zoo's families find their knowledge through the registry --------------------------------------------------
def test_every_post_activation_class_of_transformers_is_registered():
    """tests/reference.py lists, from transformers' sources, the layer classes that are act(h + g(h))."""
    assert POST_ACTIVATION_CLASSES <= registry.post_activation_layers()


@pytest.mark.parametrize("name", ["resnet", "regnet", "bit-bottleneck"])
def test_gated_zoo_models_get_their_gate_from_the_registry(name):
    model = ZOO[name].build()
    stacks = find_stacks(model)
    assert stacks and all(stack.residual_gate is registry.relu_residual_gate for stack in stacks)
    for stack in stacks:
        for layer in stack.layers:
            owner = [f for f in FAMILIES if type(layer).__name__ in f.post_activation_layers]
            assert len(owner) == 1 and type(layer).__module__ in map(_modeling_module, owner[0].model_types)


def test_albert_needs_its_finder_and_finds_it_through_the_registry():
    """Discovery alone does not see ALBERT's one shared layer run at every depth; its family's finder does."""
    model = ZOO["albert"].build()
    finder = registry.stack_finder("albert")
    found = [(path, len(layers), *more) for path, layers, *more in finder(model)]
    assert found == [("albert.encoder.albert_layer_groups.0.albert_layers", 1, model.config.num_hidden_layers)]
    assert [(path, len(layers)) for path, layers in _discover(model)] != [(p, n) for p, n, _ in found]
    assert [(s.path, s.repeats) for s in find_stacks(model)] == [(found[0][0], found[0][2])]


def test_reformer_is_refused_through_the_registry():
    assert registry.refusal("reformer") is not None and registry.family_of("reformer").refusal is not None


def test_a_refused_family_is_refused_with_layers_too():
    """Reformer's reversible layers run with gradients off and are recomputed in its own backward: passing them as
    layers= would leave the training silently on Reformer's backward (Highway-BP never applied), so it raises too."""
    model = REFUSED["reformer"].build()
    for layers in (None, model.reformer.encoder.layers):
        with pytest.raises(hf_hwbp.HighwayBPError, match="reversible"):
            hf_hwbp.patch_model(model, k=1, layers=layers)
        assert not hf_hwbp.is_patched(model)


# ----- a family registered at run time is used ----------------------------------------------------------------------
TOY_TYPE = "hwbp-test-toy"


class ToyReluBlock(nn.Module):
    """relu(h + g(h)): the residual path is the ReLU mask, which only a registered gate knows."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.activation = nn.ReLU()

    def forward(self, h):
        return self.activation(h + torch.tanh(self.linear(h)))


class ToyModel(nn.Module):
    """Its blocks sit in a list whose length no config names: discovery does not see them."""

    def __init__(self, layers: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type=TOY_TYPE)
        self.embed = nn.Linear(3, 8)
        self.blocks = nn.ModuleList([ToyReluBlock() for _ in range(layers)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).pow(2).sum()


def _toy_family(**fields) -> ModelFamily:
    return ModelFamily("Toy", (TOY_TYPE,), find_stacks=lambda model: [("blocks", list(model.blocks))], **fields)


def _grads(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_a_registered_family_is_found_by_discovery_with_its_gate():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(hf_hwbp.UnsupportedModelError, match="no residual stack"):
        hf_hwbp.patch_model(ToyModel().double(), k=1)

    with registered(_toy_family(post_activation_layers={"ToyReluBlock"})):
        assert registry.stack_finder(TOY_TYPE) is not None and "ToyReluBlock" in registry.post_activation_layers()
        model = ToyModel().double()
        exact = _grads(model, x)
        with pre_activation_gates(model.blocks) as gate:
            gated = reference_highway_grads(model, model.blocks, lambda m: m(x), 1, residual_gate=gate)
        ungated = reference_highway_grads(model, model.blocks, lambda m: m(x), 1)
        hf_hwbp.patch_model(model, k=1)
        stacks = hf_hwbp.highway_state(model).stacks
        assert [(s.path, len(s)) for s in stacks] == [("blocks", 4)]
        assert stacks[0].residual_gate is registry.relu_residual_gate
        assert max_relative_error(_grads(model, x), gated) <= RTOL[torch.float64]
        assert max_relative_error(gated, ungated) > 1e-3  # the gate changes the k = 1 gradient
        assert max_relative_error(gated, exact) > 1e-3  # k = 1 is not exact here
        hf_hwbp.set_highway_k(model, 4)
        assert max_relative_error(_grads(model, x), exact) <= RTOL[torch.float64]
        hf_hwbp.unpatch_model(model)

    assert registry.family_of(TOY_TYPE) is None and registry.stack_finder(TOY_TYPE) is None
    assert "ToyReluBlock" not in registry.post_activation_layers()
    with pytest.raises(hf_hwbp.UnsupportedModelError, match="no residual stack"):
        hf_hwbp.patch_model(ToyModel().double(), k=1)


def test_a_registered_refusal_refuses_before_any_gradient():
    reason = "its blocks are toys. Train it with ordinary backprop (do not patch it)."
    with registered(ModelFamily("Toy refused", (TOY_TYPE,), refusal=reason)):
        assert registry.refusal(TOY_TYPE) == reason
        model = ToyModel().double()
        with pytest.raises(hf_hwbp.UnsupportedModelError, match=re.escape(reason)):
            hf_hwbp.patch_model(model, k=1)
        assert all(p.grad is None for p in model.parameters())
    assert registry.refusal(TOY_TYPE) is None


class ToyGPT2Config(transformers.GPT2Config):
    model_type = "hwbp-test-toy-gpt2"


class ToyGPT2LMHeadModel(transformers.GPT2LMHeadModel):
    config_class = ToyGPT2Config


def test_a_registered_stage_recipe_cuts_a_new_model_type_into_stages():
    """A model type layer-parallel training does not know gets its stages from a registered recipe: the stages in a
    row give the model's own loss, to the last bit."""
    from tiny_models import VOCAB, make_batch

    torch.manual_seed(0)
    config = ToyGPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    model = ToyGPT2LMHeadModel(config).double().eval()
    assert model.config.model_type == ToyGPT2Config.model_type
    with pytest.raises(ValueError, match="no stage recipe"):
        build_stage(model, 0, 2)
    entry = StageRecipeEntry("ToyGPT2LMHeadModel", arch.GPT2_RECIPE)
    with registered(ModelFamily("Toy GPT-2", (config.model_type,), stage_recipes={config.model_type: entry})):
        assert registry.stage_recipe(config.model_type) == entry and "ToyGPT2LMHeadModel" in arch.supported_models()
        with pytest.raises(ValueError, match="cuts ToyGPT2LMHeadModel into stages, not GPT2LMHeadModel"):
            arch.recipe_for(transformers.GPT2LMHeadModel(config))  # the recipe's head class only
        batch = make_batch("gpt2-lm")
        want = model(**batch).loss
        parts = [build_stage(model, s, 2) for s in range(2)]
        h = parts[0].embed(batch["input_ids"])
        for stage in parts:
            h = stage.run_layers(h, range(len(stage.layers)), stage.layer_kwargs(h, None))
        assert torch.equal(parts[-1].loss(parts[-1].logits(h), batch["labels"]), want)
    assert registry.stage_recipe(config.model_type) is None
