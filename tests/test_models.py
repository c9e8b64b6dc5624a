"""patch_model on transformers models: exactness, the Theorem 2 recursion, and everything that must not change."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import reference_highway_grads
from tiny_models import BUILDERS, LAYERS, build, loss_of, make_batch, relative_error
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import hf_hwbp
from hf_hwbp.discovery import find_stacks

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")


def find_stack(model):
    (stack,) = find_stacks(model)
    return stack.layers, None


EXACT_RTOL = 1e-10  # float64: the Highway sums differ from autograd's only in rounding (~1e-15 relative)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: report the model's own names
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _autograd_grads(model: torch.nn.Module, batch: dict, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch, **kwargs).backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    """Per parameter, ||a - b|| <= rtol * ||b||. Parameters whose exact gradient vanishes (attention key
    biases: softmax ignores a shift) are held to rtol times 1e-6 of the largest gradient norm instead."""
    assert actual.keys() == expected.keys()
    floor = 1e-6 * max(g.double().norm().item() for g in expected.values())
    for name in expected:
        a, b = actual[name].double(), expected[name].double()
        err = (a - b).norm().item() / max(b.norm().item(), floor)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_exact_at_k_ge_L_for_every_adapter(name):
    model = build(name)
    batch = make_batch(name)
    exact = _autograd_grads(model, batch)
    hf_hwbp.patch_model(model, k=LAYERS)
    for k in (LAYERS, LAYERS + 5):
        hf_hwbp.set_highway_k(model, k)
        _assert_grads_close(_autograd_grads(model, batch), exact, EXACT_RTOL)
        assert hf_hwbp.last_highway_iterations(model) == LAYERS


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "qwen3-lm", "vit-cls", "gpt2-base"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_k_below_L_matches_independent_recursion(name, k):
    model = build(name)
    batch = make_batch(name)
    layers, _ = find_stack(model)
    expected = reference_highway_grads(model, layers, lambda m: loss_of(m, batch), k)
    hf_hwbp.patch_model(model, k=k)
    _assert_grads_close(_autograd_grads(model, batch), expected, EXACT_RTOL)
    assert hf_hwbp.last_highway_iterations(model) == k
    # and it is not exact backprop (the test would be empty if the recursion were trivial here)
    hf_hwbp.unpatch_model(model)
    exact = _autograd_grads(model, batch)
    assert max(relative_error(expected[n], exact[n]) for n in exact) > 1e-6


def _lora_llama() -> torch.nn.Module:
    model = build("llama-lm")
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


def test_lora_exact_and_only_adapters_get_gradients():
    model = _lora_llama()
    batch = make_batch("llama-lm")
    exact = _autograd_grads(model, batch)
    assert exact and all("lora_" in n for n in exact)
    hf_hwbp.patch_model(model, k=LAYERS)
    assert hf_hwbp.is_patched(model) and hf_hwbp.is_patched(model.get_base_model())
    _assert_grads_close(_autograd_grads(model, batch), exact, EXACT_RTOL)
    for k in (0, 1):
        layers, _ = find_stack(model.get_base_model())
        with hf_hwbp.exact_backprop(model):  # the reference runs on the plain model
            expected = reference_highway_grads(model, layers, lambda m: loss_of(m, batch), k)
        hf_hwbp.set_highway_k(model, k)
        got = _autograd_grads(model, batch)
        assert all("lora_" in n for n in got)
        _assert_grads_close(got, expected, EXACT_RTOL)


def test_hidden_state_losses_follow_the_intermediate_form():
    """A loss on output_hidden_states: exact at k = L, and the intermediate-loss form of docs/algorithm.md below."""
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")

    def loss_fn(m):
        out = m(**batch, output_hidden_states=True)
        return out.loss + sum(0.1 * (i + 1) * h.pow(2).mean() for i, h in enumerate(out.hidden_states[:-1]))

    model.zero_grad()
    loss_fn(model).backward()
    exact = _grads(model)
    layers, _ = find_stack(model)
    expected_k1 = reference_highway_grads(model, layers, loss_fn, 1)
    hf_hwbp.patch_model(model, k=LAYERS)
    model.zero_grad()
    loss_fn(model).backward()
    _assert_grads_close(_grads(model), exact, EXACT_RTOL)
    hf_hwbp.set_highway_k(model, 1)
    model.zero_grad()
    loss_fn(model).backward()
    _assert_grads_close(_grads(model), expected_k1, EXACT_RTOL)


def test_hidden_state_inside_a_group_raises():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    hf_hwbp.patch_model(model, k=1, group_size=2)
    out = model(**batch, output_hidden_states=True)
    (out.loss + out.hidden_states[2].sum()).backward()  # h_2 is a group boundary: supported
    out = model(**batch, output_hidden_states=True)
    with pytest.raises(RuntimeError, match="inside a group"):
        (out.loss + out.hidden_states[1].sum()).backward()


def _highway_nodes(tensor: torch.Tensor) -> list:
    """The Highway-BP autograd nodes in a tensor's graph."""
    found, pending, seen = [], [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "_Exit" in node.name() or "_StackEntry" in node.name():
            found.append(node)
        pending.extend(fn for fn, _ in node.next_functions)
    return found


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm", "vit-cls"])
def test_forward_is_unchanged_in_train_and_eval(name):
    model = build(name, dtype=torch.float32)
    if name == "gpt2-lm":  # with dropout: same RNG stream, same masks
        model = GPT2LMHeadModel(GPT2Config(**{**model.config.to_dict(), "resid_pdrop": 0.1, "embd_pdrop": 0.1}))
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(name).items()}
    reference = copy.deepcopy(model)
    hf_hwbp.patch_model(model, k=1)
    for train in (True, False):
        model.train(train)
        reference.train(train)
        torch.manual_seed(5)
        a = model(**batch).logits
        torch.manual_seed(5)
        b = reference(**batch).logits
        assert torch.equal(a, b)
    model.eval()
    out = model(**batch)
    assert out.logits.grad_fn is not None and not _highway_nodes(out.logits)  # eval: the model's own graph
    model.train()
    assert _highway_nodes(model(**batch).logits)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.grad_fn is None
    assert hf_hwbp.highway_state(model)._forwards == [None]  # the patch holds nothing between forwards


def test_state_dict_named_parameters_and_save_load_round_trip(tmp_path):
    model = build("llama-lm", dtype=torch.float32)
    before_keys = list(model.state_dict().keys())
    before_names = [n for n, _ in model.named_parameters()]
    before_modules = [n for n, _ in model.named_modules()]
    hf_hwbp.patch_model(model, k=2)
    assert list(model.state_dict().keys()) == before_keys
    assert [n for n, _ in model.named_parameters()] == before_names
    assert [n for n, _ in model.named_modules()] == before_modules
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hf_hwbp.is_patched(loaded)
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    batch = make_batch("llama-lm")
    model.eval()
    loaded.eval()
    assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def _hook_counts(layers) -> list[tuple[int, int]]:
    return [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in layers]


def test_patch_unpatch_repatch_and_settings():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    layers, _ = find_stack(model)
    plain = _hook_counts(layers)
    exact = _autograd_grads(model, batch)
    hf_hwbp.patch_model(model, k=1)
    patched = _hook_counts(layers)
    assert patched != plain
    hf_hwbp.patch_model(model, k=3, tol=1e-4)  # patching again updates, never stacks
    assert _hook_counts(layers) == patched
    config = hf_hwbp.get_highway_config(model)
    assert (config.k, config.tol, config.group_size) == (3, 1e-4, 1)
    hf_hwbp.set_highway_config(model, k=0, tol=None)
    assert hf_hwbp.get_highway_config(model).k == 0
    highway_k0 = _autograd_grads(model, batch)
    assert max(relative_error(highway_k0[n], exact[n]) for n in exact) > 1e-3
    hf_hwbp.unpatch_model(model)
    assert _hook_counts(layers) == plain and not hf_hwbp.is_patched(model)
    _assert_grads_close(_autograd_grads(model, batch), exact, 0.0)
    hf_hwbp.unpatch_model(model)  # no-op
    hf_hwbp.patch_model(model, k=LAYERS)
    _assert_grads_close(_autograd_grads(model, batch), exact, EXACT_RTOL)
    with hf_hwbp.exact_backprop(model):
        _assert_grads_close(_autograd_grads(model, batch), exact, 0.0)


def test_gradient_checkpointing_non_reentrant_is_exact_and_reentrant_raises():
    model = build("llama-lm")
    batch = make_batch("llama-lm")
    exact = _autograd_grads(model, batch)
    hf_hwbp.patch_model(model, k=1)
    highway_k1 = _autograd_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_grads_close(_autograd_grads(model, batch), highway_k1, EXACT_RTOL)
    hf_hwbp.set_highway_k(model, LAYERS)
    _assert_grads_close(_autograd_grads(model, batch), exact, EXACT_RTOL)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="non-reentrant"):
        loss_of(model, batch)


def test_torch_compile_gives_the_same_gradients():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    exact = _autograd_grads(model, batch)
    hf_hwbp.patch_model(model, k=1)
    eager_k1 = _autograd_grads(model, batch)
    compiled = torch.compile(model, backend="aot_eager")
    _assert_grads_close(_autograd_grads(compiled, batch), eager_k1, EXACT_RTOL)
    hf_hwbp.set_highway_k(compiled, LAYERS)
    _assert_grads_close(_autograd_grads(compiled, batch), exact, EXACT_RTOL)


def test_a_forward_is_released_with_its_graph_and_several_can_wait():
    """A training forward's record belongs to its autograd graph: dropping the loss frees it (no backward needed),
    the patch holds none of it, and two forwards can wait for their backwards in any order."""
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    hf_hwbp.patch_model(model, k=2)
    patch = hf_hwbp.highway_state(model)
    first = loss_of(model, batch)
    (entry,) = [n for n in _highway_nodes(first) if "_StackEntry" in n.name()]
    record = weakref.ref(entry.record)
    block_output = weakref.ref(entry.record.outputs[0])
    del entry
    assert patch._forwards == [None]
    second = loss_of(model, batch)
    expected = _autograd_grads(model, batch)  # also a forward and a backward in between
    second.backward()
    model.zero_grad(set_to_none=True)
    first.backward()  # the older forward still trains, with its own record
    _assert_grads_close(_grads(model), expected, EXACT_RTOL)
    gc.collect()
    assert block_output() is None  # its backward released what it recorded
    del first, second
    gc.collect()
    assert record() is None
    unused = loss_of(model, batch)
    (entry,) = [n for n in _highway_nodes(unused) if "_StackEntry" in n.name()]
    record = weakref.ref(entry.record)
    del entry, unused
    gc.collect()
    assert record() is None  # never backpropagated: released with its graph


def test_second_backward_raises_the_usual_error():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    hf_hwbp.patch_model(model, k=1)
    loss = loss_of(model, batch)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    with pytest.raises(RuntimeError, match=r"\(l1 \+ l2\)\.backward\(\)"):  # a graph with nothing saved above
        loss = model(**batch, output_hidden_states=True).hidden_states[2].sum()
        loss.backward()
        loss.backward()


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm"])
def test_bf16_autocast(name):
    """Under CPU bf16 autocast: k = L tracks autograd to bf16 precision, k = 1 tracks the reference."""
    model = build(name, dtype=torch.float32)
    batch = make_batch(name)

    def loss_fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_of(m, batch)

    model.zero_grad()
    loss_fn(model).backward()
    exact = _grads(model)
    layers, _ = find_stack(model)
    expected_k1 = reference_highway_grads(model, layers, loss_fn, 1)
    hf_hwbp.patch_model(model, k=LAYERS)
    model.zero_grad()
    loss_fn(model).backward()
    got = _grads(model)
    assert all(g.dtype == torch.float32 for g in got.values())
    # bf16 has an 8-bit mantissa; the two sides round the same products in a different order
    _assert_grads_close(got, exact, 2e-2)
    hf_hwbp.set_highway_k(model, 1)
    model.zero_grad()
    loss_fn(model).backward()
    _assert_grads_close(_grads(model), expected_k1, 2e-2)
    assert max(relative_error(expected_k1[n], exact[n]) for n in exact) > 5e-2  # k=1 is distinguishable


@pytest.mark.parametrize("name", ["gpt2-lm", "llama-lm"])
def test_generate_with_kv_cache(name):
    model = build(name, dtype=torch.float32)
    reference = copy.deepcopy(model).eval()
    hf_hwbp.patch_model(model, k=2)
    prompt = make_batch(name)["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(prompt, **kwargs)
    assert torch.equal(model.eval().generate(prompt, **kwargs), expected)
    assert torch.equal(model.train().generate(prompt, **kwargs), expected)  # no dropout here: same tokens


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k=1.5), TypeError, "k must be an int"),
        (dict(k="2"), TypeError, "k must be an int"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(k=2, group_size=0), ValueError, "group_size"),
        (dict(k=2, tol=0.0), ValueError, "tol"),
        (dict(k=2, tol="small"), TypeError, "tol"),
        (dict(k=2, steps=3), TypeError, r"Unknown Highway-BP setting\(s\) \[.steps.\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = build("gpt2-lm")
    with pytest.raises(error, match=match):
        hf_hwbp.patch_model(model, **kwargs)
    assert not hf_hwbp.is_patched(model)


def test_bad_arguments_on_a_patched_model_keep_the_old_settings():
    model = build("gpt2-lm")
    hf_hwbp.patch_model(model, k=2)
    with pytest.raises(ValueError):
        hf_hwbp.set_highway_k(model, -3)
    assert hf_hwbp.get_highway_config(model).k == 2
    with pytest.raises(ValueError, match="not patched"):
        hf_hwbp.highway_state(build("llama-lm"))


def test_layers_must_be_module_lists():
    bert = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=37))
    with pytest.raises(TypeError, match="ModuleList"):
        hf_hwbp.patch_model(bert, k=2, layers=list(bert.encoder.layer))
    with pytest.raises(TypeError, match="ModuleList"):
        hf_hwbp.patch_model(bert, k=2, layers=bert.encoder)
