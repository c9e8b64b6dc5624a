"""Everything a block reads or emits besides the residual stream, frozen parts, several forwards, mixed modes: at
k = 1 against the independent reference and at k = L against autograd, with dropout where the model has it and
with non-reentrant activation checkpointing; and every configuration that cannot be routed raises first."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from reference import grads_of, reference_highway_grads
from tiny_models import ZOO, ZOO_LAYERS, one_thread  # noqa: F401 (fixture)
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import hf_hwbp

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")

L = ZOO_LAYERS
SEED = 7
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # as in test_zoo.py


def assert_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    floor = 1e-6 * max(g.double().norm().item() for g in expected.values())
    for name in expected:
        a, b = actual[name].double(), expected[name].double()
        err = (a - b).norm().item() / max(b.norm().item(), floor)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def assert_highway(model: nn.Module, loss_fn, *, rtol: float = 1e-10, exact_rtol: float | None = None) -> None:
    """Patch ``model`` (no layers=); k = 1 equals the reference, k = L equals unpatched autograd."""
    with hf_hwbp.exact_backprop(model):
        exact = grads_of(model, loss_fn)
    hf_hwbp.patch_model(model, k=1)
    stacks = [s.layers for s in hf_hwbp.highway_state(model).stacks]
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, stacks, loss_fn, 1)
    assert_close(grads_of(model, loss_fn), expected, rtol)
    assert max((expected[n] - exact[n]).norm() / exact[n].norm() for n in exact) > 1e-3  # k = 1 is not exact here
    hf_hwbp.set_highway_k(model, hf_hwbp.highway_state(model).num_blocks)
    assert_close(grads_of(model, loss_fn), exact, rtol if exact_rtol is None else exact_rtol)


def seeded(fn):
    def loss_fn(model):
        torch.manual_seed(SEED)  # the same dropout masks in every pass
        return fn(model)

    return loss_fn


def gpt2(**overrides) -> nn.Module:
    return ZOO["gpt2"].build(**overrides)  # dropout 0.1 (GPT-2's default)


def llama(**overrides) -> nn.Module:
    return ZOO["llama"].build(**{"attention_dropout": 0.1, **overrides})


def checkpointed(model: nn.Module, on: bool) -> nn.Module:
    if on:
        model.activation_checkpointing_enable()  # non-reentrant by default
    return model


CHECKPOINTING = pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])


# ----- frozen parts ------------------------------------------------------------------------------------------------
@CHECKPOINTING
def test_frozen_embeddings_and_bottom_layers(checkpointing):
    model = checkpointed(gpt2(n_layer=5), checkpointing)  # 3 trainable blocks above 2 frozen ones
    frozen = [model.transformer.wte, model.transformer.wpe, model.transformer.h[0], model.transformer.h[1]]
    for module in frozen:
        module.requires_grad_(False)
    batch = ZOO["gpt2"].batch()
    assert_highway(model, seeded(lambda m: m(**batch).loss))


def test_frozen_bottom_layers_build_no_graph():
    """Frozen layers below everything trainable run as they would unpatched: no graph, no recorded block."""
    model = gpt2()
    for module in (model.transformer.wte, model.transformer.wpe, model.transformer.h[0]):
        module.requires_grad_(False)
    hf_hwbp.patch_model(model, k=1)
    seen = []
    model.transformer.h[0].register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    loss = model(**ZOO["gpt2"].batch()).loss
    assert seen == [False]
    entry = [n for n in _nodes(loss) if "_StackEntry" in n.name()][0]
    assert entry.record.first_layer == 1
    assert hf_hwbp.highway_state(model).recorded_forwards == 1


def _nodes(tensor):
    found, pending, seen = [], [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            found.append(node)
            pending.extend(fn for fn, _ in node.next_functions)
    return found


# ----- PEFT --------------------------------------------------------------------------------------------------------
# transformers drops the cache of checkpointed layers ("Caching is incompatible with gradient checkpointing"), so
# prefix tuning cannot be checkpointed even without Highway-BP; prompt tuning can.
@pytest.mark.parametrize(
    "method, checkpointing",
    [("prefix", False), ("prefix+lora", False), ("prompt", False), ("prompt", True)],
)
def test_peft_prefix_and_prompt_tuning(method, checkpointing):
    model = llama()
    if method == "prefix+lora":  # the prefix and trainable stack parameters at once
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model = model.base_model.model
    config = (PromptTuningConfig if method == "prompt" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=3
    )
    model = get_peft_model(model, config).double()
    if method == "prefix+lora":
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or "prompt_encoder" in name)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable()
    batch = ZOO["llama"].batch()
    assert_highway(model, seeded(lambda m: m(**batch).loss))


# ----- side inputs -------------------------------------------------------------------------------------------------
class EncoderThenGPT2(nn.Module):
    """A trainable encoder whose states a GPT-2 with cross-attention reads in every layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Tanh())
        self.decoder = GPT2LMHeadModel(
            GPT2Config(n_layer=L, n_embd=32, n_head=4, vocab_size=64, add_cross_attention=True)
        )

    def forward(self, source, target):
        return self.decoder(target, labels=target, encoder_hidden_states=self.encoder(source)).loss


@CHECKPOINTING
def test_cross_attention_on_trainable_states(checkpointing):
    model = EncoderThenGPT2().double().train()
    checkpointed(model.decoder, checkpointing)
    source, target = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 6))
    assert_highway(model, seeded(lambda m: m(source, target)))
    assert "encoder.1.weight" in grads_of(model, seeded(lambda m: m(source, target)))


@CHECKPOINTING
def test_encoder_decoder_bart(checkpointing):
    """Two stacks in sequence; the encoder output is a side input of every decoder block."""
    entry = ZOO["bart"]
    model, batch = checkpointed(entry.build(), checkpointing), entry.batch()
    assert_highway(model, seeded(lambda m: m(**batch).loss))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h, scale):
        return h + torch.tanh(self.linear(h)) * scale


class OutsideParameterModel(nn.Module):
    """Blocks read ``scale``, a parameter of the model outside the stack, which the embedding also uses."""

    def __init__(self, width: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, width)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.layers = nn.ModuleList([Block(width) for _ in range(L)])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        h = self.embed(x) * self.scale
        for layer in self.layers:
            h = layer(h, scale=self.scale)
        return self.head(h).pow(2).sum()


def test_parameter_read_from_outside_the_stack():
    model = OutsideParameterModel().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = grads_of(model, lambda m: m(x))
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.layers, lambda m: m(x), 1)
    assert_close(grads_of(model, lambda m: m(x)), expected, 1e-10)
    assert (expected["scale"] - exact["scale"]).norm() > 1e-3 * exact["scale"].norm()
    hf_hwbp.set_highway_k(model, L)
    assert_close(grads_of(model, lambda m: m(x)), exact, 1e-10)


# ----- side outputs ------------------------------------------------------------------------------------------------
@CHECKPOINTING
def test_moe_router_auxiliary_loss(checkpointing):
    entry = ZOO["mixtral"]
    model = entry.build(output_router_logits=True, router_aux_loss_coef=0.5, attention_dropout=0.1)
    model = checkpointed(model, checkpointing)
    batch = entry.batch()

    def loss_fn(m):
        out = m(**batch)
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        return out.loss

    assert_highway(model, seeded(loss_fn), rtol=RTOL[torch.float32])
    assert hf_hwbp.last_highway_iterations(model) == L


@CHECKPOINTING
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_loss_on_attention_maps(name, checkpointing):
    model = checkpointed(gpt2() if name == "gpt2" else llama(), checkpointing)
    model.config._attn_implementation = "eager"  # maps are only returned by eager attention
    batch = ZOO[name].batch()

    def loss_fn(m):
        out = m(**batch, output_attentions=True)
        assert len(out.attentions) == L
        return out.loss + sum((i + 1) * a.pow(2).sum() for i, a in enumerate(out.attentions))

    # Llama's eager attention runs its softmax in float32 (dtype=torch.float32), so its maps and their backward round
    # to float32: at k = L autograd and Highway-BP (and the reference) agree to float32 precision only (observed
    # <= 6e-6 relative); k = 1 and the reference still agree to float64 rounding.
    assert_highway(model, seeded(loss_fn), exact_rtol=1e-10 if name == "gpt2" else 5e-5)


def test_loss_on_attention_maps_and_hidden_states_with_retain_graph():
    """retain_graph=True used to hide a silently wrong gradient here: it must give the same numbers."""
    model = gpt2()
    model.config._attn_implementation = "eager"
    batch = ZOO["gpt2"].batch()

    def loss_fn(m):
        out = m(**batch, output_attentions=True, output_hidden_states=True)
        return out.loss + out.attentions[1].pow(2).sum() + out.hidden_states[1].pow(2).mean()

    hf_hwbp.patch_model(model, k=1)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.transformer.h, seeded(loss_fn), 1)
    model.zero_grad(set_to_none=True)
    seeded(loss_fn)(model).backward(retain_graph=True)
    assert_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, expected, 1e-10)


# ----- several forwards --------------------------------------------------------------------------------------------
@CHECKPOINTING
def test_two_training_forwards_then_one_backward(checkpointing):
    model = checkpointed(gpt2(), checkpointing)
    batch, other = ZOO["gpt2"].batch(1), ZOO["gpt2"].batch(2)

    def contrastive(m):
        a = m(**batch, output_hidden_states=True)
        b = m(**other, output_hidden_states=True)
        return a.loss + 0.5 * b.loss + (a.hidden_states[-1] - b.hidden_states[-1]).pow(2).mean()

    assert_highway(model, seeded(contrastive))


# ----- mixed train / eval layers -----------------------------------------------------------------------------------
@CHECKPOINTING
@pytest.mark.parametrize("eval_layer", [0, L - 1])
def test_layers_in_mixed_train_eval_mode_follow_the_definition(eval_layer, checkpointing):
    """Some layers in eval mode (no dropout there), the others training: Highway-BP over the whole stack."""
    model = checkpointed(gpt2(), checkpointing)
    model.transformer.h[eval_layer].eval()
    batch = ZOO["gpt2"].batch()
    assert_highway(model, seeded(lambda m: m(**batch).loss))
    assert hf_hwbp.last_highway_iterations(model) == L


def test_every_layer_in_eval_mode_is_exact_backprop():
    model = gpt2().eval()
    batch = ZOO["gpt2"].batch()
    exact = grads_of(model, lambda m: m(**batch).loss)
    hf_hwbp.patch_model(model, k=0)
    assert_close(grads_of(model, lambda m: m(**batch).loss), exact, 0.0)


# ----- group size with side paths ------------------------------------------------------------------------------------
def test_groups_with_side_inputs_and_side_outputs():
    model = EncoderThenGPT2().double().train()
    model.decoder.config._attn_implementation = "eager"
    source, target = torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 6))

    def loss_fn(m):
        out = m.decoder(target, labels=target, encoder_hidden_states=m.encoder(source), output_attentions=True)
        return out.loss + out.attentions[1].pow(2).sum()

    hf_hwbp.patch_model(model, k=1, layers=model.decoder.transformer.h, group_size=2)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.decoder.transformer.h, seeded(loss_fn), 1, group_size=2)
    assert_close(grads_of(model, seeded(loss_fn)), expected, 1e-10)


# ----- the adaptive stop ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-3])
def test_adaptive_stop_against_a_criterion_computed_here(tol):
    model = gpt2(n_layer=6)
    batch = ZOO["gpt2"].batch()

    def converged(previous: list[torch.Tensor], current: list[torch.Tensor]) -> bool:
        # ||delta^(n+1) - delta^(n)|| / ||delta^(n+1)|| over every state i = 0..L of the stack
        change = torch.cat([(c - p).reshape(-1) for p, c in zip(previous, current)]).norm()
        return bool(change <= tol * torch.cat([c.reshape(-1) for c in current]).norm())

    loss_fn = seeded(lambda m: m(**batch).loss)
    ran: list[int] = []
    expected = reference_highway_grads(model, model.transformer.h, loss_fn, 6, stop=converged, iterations=ran)
    hf_hwbp.patch_model(model, k=6, tol=tol)
    assert_close(grads_of(model, loss_fn), expected, 1e-10)
    assert hf_hwbp.last_highway_iterations(model) == ran[0]
    assert 1 <= ran[0] < 6  # the stop ended the iterations early


# ----- what cannot be routed raises before any number exists --------------------------------------------------------
class StashingBlock(nn.Module):
    """A residual block that keeps an inner tensor on itself, where a loss can read it behind the hooks' back."""

    def __init__(self, width: int, reads=None):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.stash = None
        self.__dict__["hidden_parameter"] = reads  # not registered: invisible to module.parameters()

    def forward(self, h):
        inner = torch.tanh(self.linear(h))
        if self.hidden_parameter is not None:
            inner = inner * self.hidden_parameter
        self.stash = inner
        return h + inner


class StashingModel(nn.Module):
    def __init__(self, width: int = 6, skip: int | None = None, hidden_parameter: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, width)
        self.shared = nn.Parameter(torch.rand(width)) if hidden_parameter else None
        self.layers = nn.ModuleList([StashingBlock(width, self.shared) for _ in range(L)])
        self.head = nn.Linear(width, 1)
        self.skip = skip

    def forward(self, x):
        h = self.embed(x)
        for i, layer in enumerate(self.layers):
            if i != self.skip:
                h = layer(h)
        return self.head(h).pow(2).sum()


@pytest.mark.parametrize("stashing", [[0], [0, 2]], ids=["first-block", "upper-block"])
def test_unrouted_side_output_raises(stashing):
    model = StashingModel().double()
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    x = torch.randn(4, 3, dtype=torch.float64)
    loss = model(x) + sum(model.layers[i].stash.pow(2).sum() for i in stashing)
    with pytest.raises(RuntimeError, match="does not route") as info:
        loss.backward()
    assert "exact_backprop" in str(info.value)


def test_parameter_read_behind_the_layers_back_raises():
    model = StashingModel(hidden_parameter=True).double()
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with pytest.raises(RuntimeError, match="neither one of its layers' parameters nor passed") as info:
        model(torch.randn(4, 3, dtype=torch.float64))
    assert "argument" in str(info.value)


class HandingOnBlock(nn.Module):
    """Returns, next to its output, a tensor that the next layers read: from its parameters only (as T5's position
    bias) or from its hidden state too."""

    def __init__(self, width: int, from_hidden: bool):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.bias = nn.Parameter(torch.rand(width))
        self.from_hidden = from_hidden

    def forward(self, h, carried=None):
        if carried is None:
            carried = self.bias.tanh() * (h.tanh() if self.from_hidden else 1)
        return h + torch.tanh(self.linear(h)) * carried, carried


class HandingOnModel(nn.Module):
    def __init__(self, from_hidden: bool, width: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, width)
        self.layers = nn.ModuleList([HandingOnBlock(width, from_hidden) for _ in range(L)])
        self.head = nn.Linear(width, 1)

    def forward(self, x, first: int = 0):
        h, carried = self.embed(x), None
        for i, layer in enumerate(self.layers):
            h, new = layer(h, carried)
            carried = new if i >= first else None
        return self.head(h).pow(2).sum()


@pytest.mark.parametrize("from_hidden", [False, True], ids=["from-parameters", "from-h0"])
def test_a_tensor_handed_on_by_an_earlier_layer(from_hidden):
    """Made by the first layer from its parameters (T5's position bias, in the zoo) or from h_0 too: routed as a side
    input of the layers above, then into the first layer. Made from the hidden state of a layer above the first:
    raises, before any forward finishes."""
    model = HandingOnModel(from_hidden=from_hidden).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    exact = grads_of(model, lambda m: m(x))
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.layers, lambda m: m(x), 1)
    assert_close(grads_of(model, lambda m: m(x)), expected, 1e-10)
    hf_hwbp.set_highway_k(model, L)
    assert_close(grads_of(model, lambda m: m(x)), exact, 1e-10)
    if not from_hidden:
        return
    model = HandingOnModel(from_hidden=True).double()
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with pytest.raises(RuntimeError, match="depends on that layer's hidden state") as info:
        model(x, first=1)  # layer 1 makes it from its hidden state, layer 2 reads it
    assert "unpatch_model" in str(info.value)


@pytest.mark.parametrize("skip", [0, 1, L - 1], ids=["first", "middle", "last"])
def test_layers_skipped_by_layerdrop_leave_the_stack_of_that_forward(skip):
    """A forward that skips a layer (LayerDrop) runs Highway-BP over the layers it executed, in order."""
    model = StashingModel(skip=skip).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    executed = [layer for i, layer in enumerate(model.layers) if i != skip]
    exact = grads_of(model, lambda m: m(x))
    hf_hwbp.patch_model(model, k=1, layers=model.layers)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, executed, lambda m: m(x), 1)
    assert_close(grads_of(model, lambda m: m(x)), expected, 1e-12)
    assert hf_hwbp.last_highway_iterations(model) == 1
    hf_hwbp.set_highway_k(model, L - 1)  # the executed stack's depth: exact
    assert_close(grads_of(model, lambda m: m(x)), exact, 1e-12)
    model.skip = None  # the next forward runs every layer again
    hf_hwbp.set_highway_k(model, L)
    full = grads_of(model, lambda m: m(x))
    with hf_hwbp.exact_backprop(model):
        assert_close(full, grads_of(model, lambda m: m(x)), 1e-12)


def test_layerdrop_with_groups_raises_before_any_gradient():
    model = StashingModel(skip=1).double()
    hf_hwbp.patch_model(model, k=1, layers=model.layers, group_size=2)
    with pytest.raises(hf_hwbp.HighwayBPError, match="group_size=1"):
        model(torch.randn(4, 3, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


def test_same_module_twice_raises():
    model = StashingModel()
    with pytest.raises(ValueError, match="distinct modules") as info:
        hf_hwbp.patch_model(model, k=1, layers=nn.ModuleList([model.layers[0], model.layers[1], model.layers[0]]))
    assert "layers=" in str(info.value)
    assert not hf_hwbp.is_patched(model)


def test_double_backward_raises():
    model = gpt2()
    hf_hwbp.patch_model(model, k=1)
    loss = model(**ZOO["gpt2"].batch()).loss
    with pytest.raises(RuntimeError, match="create_graph=True") as info:
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    assert "exact_backprop" in str(info.value)


def test_stack_not_on_one_device_raises():
    model = gpt2()
    model.transformer.h[1].to("meta")  # what a device_map offload leaves behind
    with pytest.raises(ValueError, match="meta device") as info:
        hf_hwbp.patch_model(model, k=1)
    assert "device" in str(info.value)


def test_activation_checkpointing_api_and_reentrant_refusal():
    model = gpt2()
    batch = ZOO["gpt2"].batch()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    hf_hwbp.patch_model(model, k=1)
    with pytest.raises(RuntimeError, match="non-reentrant") as info:
        model(**batch)
    assert "activation_checkpointing_enable()" in str(info.value)
    with pytest.warns(FutureWarning):  # the deprecated spelling still works
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_fn = seeded(lambda m: m(**batch).loss)
    with hf_hwbp.exact_backprop(model):
        expected = reference_highway_grads(model, model.transformer.h, loss_fn, 1)
    assert_close(grads_of(model, loss_fn), expected, 1e-10)


def test_checkpointing_without_preserved_rng_state():
    """Every Highway sweep recomputes a checkpointed layer: without the forward's RNG state, dropout would draw new
    masks each time. With dropout it raises at the forward; without dropout it is exact."""
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    model = gpt2()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    hf_hwbp.patch_model(model, k=1)
    with pytest.raises(RuntimeError, match="preserve_rng_state=True"):
        model(**ZOO["gpt2"].batch())
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    batch = ZOO["gpt2"].batch()
    assert_highway(model, lambda m: m(**batch).loss)
