"""The batched backend (HighwayConfig.backend) in patch_model's path: same gradients as the sequential engine
(float64: k = 0, 1, 2 against tests/reference.py, exact at k >= L against autograd), returned through autograd,
batched from the first step (the patch installs the backend), and a logged fall-back to sequential for what it
cannot batch. Every test checks which path ran: the sequential fall-back gives the same gradients."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import hf_hwbp
from hf_hwbp import batched, batched_adapter
from hf_hwbp.config import HighwayConfig

sys.path.insert(0, str(Path(__file__).parent))
from reference import reference_highway_grads  # noqa: E402

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.usefixtures("engine_at_exact_steps")]
LAYERS = 3


def tiny(arch: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=LAYERS, n_head=2)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
        model = tf.LlamaForCausalLM(config)
    model.config._attn_implementation = attn
    return model.double().train()


def layers_of(model):
    base = model.transformer if hasattr(model, "transformer") else model.model
    return list(base.h if hasattr(base, "h") else base.layers)


IDS = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))


def loss_of(model):
    return model(input_ids=IDS, labels=IDS).loss


def reference(model, k: int, layers=layers_of) -> dict[str, torch.Tensor]:
    """tests/reference.py's Highway-BP(k) gradients of a copy of ``model``."""
    twin = copy.deepcopy(model)
    want = reference_highway_grads(twin, layers(twin), loss_of, k)
    return {n: g for n, g in want.items() if g is not None}


def grads_of(model, steps: int = 1) -> dict[str, torch.Tensor]:
    """The gradients of the last of ``steps`` backwards."""
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def said(monkeypatch):
    """The backend's log lines of this test."""
    lines: list[str] = []
    monkeypatch.setattr(batched_adapter, "_said", set())
    monkeypatch.setattr(batched_adapter.logger, "warning", lambda message, *a, **kw: lines.append(message))
    monkeypatch.setattr(batched_adapter.logger, "info", lambda message, *a, **kw: lines.append(message))
    return lines


@pytest.fixture
def batched_calls(monkeypatch):
    """How many batched parameter VJPs ran (one per batched stack backward)."""
    calls = []
    original = batched.BatchedStack.param_grads

    def counting(self, delta, params):
        calls.append(len(params))
        return original(self, delta, params)

    monkeypatch.setattr(batched.BatchedStack, "param_grads", counting)
    return calls


def assert_close(got: dict, want: dict, rtol: float = 1e-10):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].norm().clamp_min(1e-30)
        assert float((got[name] - want[name]).norm() / scale) <= rtol, name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_batched_equals_the_reference(arch, k, said, batched_calls):
    model = tiny(arch)
    want = reference(model, k)
    hf_hwbp.patch_model(model, k, backend="batched")
    got = grads_of(model)
    block_params = [p for layer in layers_of(model) for p in layer.parameters()]
    assert batched_calls == [len(block_params)], said  # the first step ran batched, for every block parameter
    assert any("as one call per iteration" in line for line in said)
    assert_close(got, want)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_at_k_equal_depth_is_exact_backprop(arch, batched_calls):
    model = tiny(arch, seed=2)
    want = grads_of(copy.deepcopy(model))  # unpatched: autograd
    hf_hwbp.patch_model(model, LAYERS, backend="batched")
    got = grads_of(model)
    assert len(batched_calls) == 1
    assert_close(got, want)


def test_gradients_come_through_autograd_hooks_and_accumulate(batched_calls):
    model = tiny("gpt2")
    reference = copy.deepcopy(model)
    hf_hwbp.patch_model(reference, 1, backend="sequential")
    hf_hwbp.patch_model(model, 1, backend="batched")
    seen = []
    weight = layers_of(model)[1].mlp.c_fc.weight
    weight.register_hook(lambda g: seen.append(g.clone()))
    model.zero_grad(set_to_none=True)
    (loss_of(model) + loss_of(model)).backward()  # two forwards, one backward: the gradients add up
    assert len(batched_calls) == 2 and len(seen) >= 1  # one batched backward per forward
    reference.zero_grad(set_to_none=True)
    (loss_of(reference) + loss_of(reference)).backward()
    want = layers_of(reference)[1].mlp.c_fc.weight.grad
    assert float((weight.grad - want).norm() / want.norm()) <= 1e-10


def test_active_dropout_falls_back_with_a_log_line(said, batched_calls):
    model = tiny("gpt2")
    layers_of(model)[1].mlp.dropout.p = 0.1
    hf_hwbp.patch_model(model, 1, backend="batched")
    torch.manual_seed(5)
    grads_of(model)
    assert not batched_calls
    assert any("falls back to sequential" in line and "dropout" in line for line in said)


def test_functional_attention_dropout_falls_back_with_the_sequential_gradients(said, batched_calls):
    """Llama's attention dropout is a float applied by a function, not a dropout module: the forward's random
    numbers show it, and the step runs sequentially (a recomputation would draw other masks)."""

    def seeded_grads(model):
        torch.manual_seed(5)
        return grads_of(model)

    model = tiny("llama")
    model.config.attention_dropout = 0.3
    for layer in layers_of(model):
        layer.self_attn.attention_dropout = 0.3
    sequential = hf_hwbp.patch_model(copy.deepcopy(model), 1, backend="sequential")
    hf_hwbp.patch_model(model, 1, backend="batched")
    assert_close(seeded_grads(model), seeded_grads(sequential))
    assert not batched_calls
    assert any("falls back to sequential" in line and "random numbers" in line for line in said)


def _hook_counts(model) -> list[tuple[int, int]]:
    return [(len(layer._forward_pre_hooks), len(layer._forward_hooks)) for layer in layers_of(model)]


def test_the_backend_is_installed_when_chosen_and_removed_with_the_patch(said, batched_calls):
    model = tiny("gpt2")
    unpatched = _hook_counts(model)
    hf_hwbp.patch_model(model, 1)  # 'auto': sequential on CPU, no capture
    sequential = _hook_counts(model)
    hf_hwbp.set_highway_config(model, backend="batched")
    assert [(a + 1, b + 1) for a, b in sequential] == _hook_counts(model)  # the capture's pre-hook and hook
    grads_of(model)
    assert len(batched_calls) == 1  # the first step after choosing the backend ran batched
    hf_hwbp.set_highway_config(model, backend="sequential")
    assert _hook_counts(model) == sequential
    grads_of(model)
    assert len(batched_calls) == 1
    hf_hwbp.patch_model(model, 1, backend="batched")
    hf_hwbp.unpatch_model(model)
    assert _hook_counts(model) == unpatched


def test_auto_is_sequential_on_cpu_and_says_so(said, batched_calls):
    model = tiny("llama")
    hf_hwbp.patch_model(model, 1)  # backend="auto" by default
    grads_of(model)
    assert not batched_calls
    assert any("'auto' runs" in line and "sequentially on cpu" in line for line in said)


def test_sdpa_attention_runs_batched(said, batched_calls):
    model = tiny("llama", attn="sdpa")
    want = reference(model, 1)
    hf_hwbp.patch_model(model, 1, backend="batched")
    assert_close(grads_of(model), want)
    assert len(batched_calls) == 1, said


def test_lora_gpt2_runs_batched_with_the_reference_gradients(said, batched_calls):
    peft = pytest.importorskip("peft")
    model = tiny("gpt2")
    config = peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    model = peft.get_peft_model(model, config)
    for p in model.parameters():  # LoRA's B starts at 0: give it values so every gradient path is exercised
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    want = reference(model, 1, lambda twin: layers_of(twin.base_model.model))
    hf_hwbp.patch_model(model, 1, backend="batched")
    got = grads_of(model)
    assert len(batched_calls) == 1, said
    assert_close(got, want)


def test_backend_setting_is_validated_and_parsed():
    assert HighwayConfig().backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        HighwayConfig(backend="parallel")
    from hf_hwbp.arguments import HighwayArguments

    (args,) = tf.HfArgumentParser(HighwayArguments).parse_args_into_dataclasses(["--hwbp_backend", "batched"])
    assert args.highway_config.backend == "batched"


def test_highway_trainer_with_the_batched_backend(tmp_path, said, batched_calls):
    """HighwayTrainer (SGD, float64): every step's gradients equal the sequential backend's, and every step ran
    batched."""
    from trainer_helpers import GradRecorder, make_args, repetitive_data, tiny_gpt2

    from hf_hwbp.trainer import HighwayTrainer

    def train(backend: str):
        recorder = GradRecorder()
        args = make_args(
            tmp_path / backend, max_steps=3, optim="sgd", learning_rate=0.1, max_grad_norm=0.0,
            hwbp_config={"k": 1, "backend": backend},
        )  # fmt: skip
        model = tiny_gpt2(dtype=torch.float64)
        HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(n=4), callbacks=[recorder]).train()
        return recorder.grads

    want = train("sequential")
    assert not batched_calls
    got = train("batched")
    assert len(batched_calls) == 3, said  # every step ran batched
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert_close(g, w)


def test_side_outputs_fall_back_with_the_sequential_gradients(said, batched_calls):
    """A loss that reads the attention maps (side outputs) runs sequentially, with a log line, same gradients."""

    def loss_with_attentions(model):
        out = model(input_ids=IDS, labels=IDS, output_attentions=True)
        return out.loss + sum(a.pow(2).sum() for a in out.attentions)

    def grads(model):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            loss_with_attentions(model).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = tiny("gpt2")
    sequential = hf_hwbp.patch_model(copy.deepcopy(model), 1, backend="sequential")
    hf_hwbp.patch_model(model, 1, backend="batched")
    assert_close(grads(model), grads(sequential))
    assert not batched_calls
    assert any("falls back to sequential" in line and "side outputs" in line for line in said)
