"""A patched model is still a model: deep copies, pickling, reference models, averaged models, dtype changes.

Every gradient is checked at k = 1 against the independent reference (tests/reference.py) and at k = L against
autograd, in float64: the copy's after the original trained, the original's after its copy trained."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from reference import reference_highway_grads
from tiny_models import ZOO, ZOO_LAYERS, one_thread  # noqa: F401 (fixture)
from torch import nn

import hf_hwbp

# k >= L here checks the Highway engine's own exactness against autograd, so exact steps run the engine (users get
# the model's own backward there: the same gradient; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("engine_at_exact_steps")

L = ZOO_LAYERS
SEED = 7
BATCH = ZOO["gpt2"].batch(1)
OTHER = ZOO["gpt2"].batch(2)


def loss_fn(model: nn.Module, batch: dict = BATCH) -> torch.Tensor:
    torch.manual_seed(SEED)  # the same dropout masks in every pass
    return model(**batch).loss


def grads_of(model: nn.Module, fn=loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    fn(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def expected_grads(model: nn.Module, k: int, fn=loss_fn) -> dict[str, torch.Tensor]:
    """Highway-BP(k) by the reference (k < L), or plain autograd (k >= L), on the model's current weights."""
    with hf_hwbp.exact_backprop(model):
        if k >= L:
            return grads_of(model, fn)
        return reference_highway_grads(model, model.transformer.h, fn, k)


def assert_close(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert actual.keys() == expected.keys()
    floor = 1e-6 * max(g.double().norm().item() for g in expected.values())
    for name in expected:
        err = (actual[name].double() - expected[name].double()).norm().item() / max(expected[name].norm().item(), floor)
        assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def assert_trains(model: nn.Module, k: int, fn=loss_fn) -> dict[str, torch.Tensor]:
    """The model's gradients are Highway-BP(k)'s, for every trainable parameter; returns them."""
    expected = expected_grads(model, k, fn)
    assert len(expected) == sum(1 for p in model.parameters() if p.requires_grad)
    got = grads_of(model, fn)
    assert_close(got, expected)
    return got


def sgd_step(model: nn.Module, lr: float = 0.05) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model, OTHER).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    model.zero_grad(set_to_none=True)


def patched(k: int = 1, **options) -> nn.Module:
    return hf_hwbp.patch_model(ZOO["gpt2"].build(), k=k, **options)


def hook_count(model: nn.Module) -> int:
    return sum(len(layer._forward_pre_hooks) + len(layer._forward_hooks) for layer in model.transformer.h)


def test_deepcopy_before_any_step_is_an_independent_patched_model():
    model = patched(k=1, tol=1e-6, group_size=1)
    clone = copy.deepcopy(model)
    state, clone_state = hf_hwbp.highway_state(model), hf_hwbp.highway_state(clone)
    assert clone_state is not state
    assert (clone_state.config.k, clone_state.config.tol, clone_state.config.group_size) == (1, 1e-6, 1)
    assert clone_state.stacks[0].layers == tuple(clone.transformer.h)
    hf_hwbp.set_highway_config(model, tol=None)
    hf_hwbp.set_highway_config(clone, tol=None)
    assert_trains(clone, k=1)  # every stack parameter of the copy gets its gradient
    assert all(p.grad is None for p in model.parameters())  # and nothing reaches the original
    assert_trains(model, k=1)
    hf_hwbp.set_highway_k(clone, L)
    assert hf_hwbp.get_highway_config(model).k == 1
    assert_trains(clone, k=L)
    assert_trains(model, k=1)


def test_deepcopy_after_steps_and_each_trains_after_the_other():
    model = patched(k=1)
    sgd_step(model)
    sgd_step(model)
    clone = copy.deepcopy(model)
    sgd_step(clone)  # the copy trains: the original's gradient is unchanged and still Highway-BP's
    assert_trains(model, k=1)
    sgd_step(model)
    sgd_step(model)  # the original trains: the copy's too
    assert_trains(clone, k=1)
    hf_hwbp.set_highway_k(model, L)
    assert_trains(model, k=L)
    assert_trains(clone, k=1)


def test_deepcopy_with_a_pending_training_forward():
    model = patched(k=1)
    expected = expected_grads(model, 1)
    pending = loss_fn(model)  # a training forward waits for its backward
    clone = copy.deepcopy(model)
    assert hf_hwbp.highway_state(clone)._forwards == [None]  # the copy starts with none
    sgd_step(clone)
    assert_trains(clone, k=1)
    model.zero_grad(set_to_none=True)
    pending.backward()
    assert_close({n: p.grad for n, p in model.named_parameters()}, expected)


@pytest.mark.parametrize("where", ["copy", "same model"])
@pytest.mark.parametrize("how", ["no_grad", "eval", "inference_mode"])
def test_forwards_that_do_not_train_leave_a_pending_forward_alone(where, how):
    model = patched(k=1)
    other = copy.deepcopy(model) if where == "copy" else model
    expected = expected_grads(model, 1)
    pending = loss_fn(model)
    if how == "no_grad":
        with torch.no_grad():
            other(**OTHER)
    elif how == "inference_mode":
        with torch.inference_mode():
            other(**OTHER)
    else:
        other.eval()
        other(**OTHER).loss.backward()  # eval mode: the model's own forward and backward
        other.train()
    model.zero_grad(set_to_none=True)
    pending.backward()
    assert_close({n: p.grad for n, p in model.named_parameters()}, expected)


def test_a_copy_patches_and_unpatches_on_its_own():
    model = patched(k=1)
    clone = copy.deepcopy(model)
    count = hook_count(model)
    hf_hwbp.unpatch_model(clone)
    assert not hf_hwbp.is_patched(clone) and hook_count(clone) == 0
    assert hf_hwbp.is_patched(model) and hook_count(model) == count
    assert_trains(model, k=1)
    assert_close(grads_of(clone), expected_grads(clone, L))  # the unpatched copy: plain backprop
    hf_hwbp.patch_model(clone, k=2)
    hf_hwbp.unpatch_model(model)
    assert_trains(clone, k=2)
    assert hook_count(model) == 0


def test_pickle_round_trip():
    model = patched(k=1)
    sgd_step(model)
    pending = loss_fn(model)  # the patch holds nothing of a pending forward: it pickles as well
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    del pending
    assert hf_hwbp.is_patched(loaded) and hf_hwbp.get_highway_config(loaded).k == 1
    assert hf_hwbp.highway_state(loaded).stacks[0].layers == tuple(loaded.transformer.h)
    assert_trains(loaded, k=1)
    assert all(p.grad is None for p in model.parameters())
    hf_hwbp.set_highway_k(loaded, L)
    assert_trains(loaded, k=L)
    hf_hwbp.unpatch_model(loaded)
    assert hook_count(loaded) == 0 and hook_count(model) > 0


def test_two_losses_of_one_forward_backpropagated_separately():
    """l1.backward(retain_graph=True); l2.backward() gives the sum of the two Highway gradients, as autograd does."""

    def two_losses(model):
        torch.manual_seed(SEED)
        out = model(**BATCH, output_hidden_states=True)
        return out.loss, out.hidden_states[1].pow(2).mean()

    def summed(model):
        l1, l2 = two_losses(model)
        return l1 + l2

    for k in (1, L):
        model = patched(k=k)
        expected = expected_grads(model, k, summed)
        l1, l2 = two_losses(model)
        l1.backward(retain_graph=True)
        l2.backward()
        assert_close({n: p.grad for n, p in model.named_parameters()}, expected)
        with pytest.raises(RuntimeError, match="second time"):  # the graph is freed by the last one, as usual
            l2.backward()


def test_averaged_model_of_a_patched_model():
    from torch.optim.swa_utils import AveragedModel, update_bn

    model = patched(k=1)
    averaged = AveragedModel(model)
    sgd_step(model)
    averaged.update_parameters(model)  # under no_grad: nothing to record
    assert hf_hwbp.is_patched(averaged.module)
    assert_trains(averaged.module, k=1)
    assert_trains(model, k=1)
    resnet = hf_hwbp.patch_model(ZOO["resnet"].build(), k=1)
    averaged = AveragedModel(resnet)
    pending = resnet(**ZOO["resnet"].batch()).loss
    update_bn([ZOO["resnet"].batch()["pixel_values"]], averaged)  # training-mode forwards without gradients
    pending.backward()
    assert all(p.grad is not None for p in resnet.parameters())


def test_dtype_changes_and_apply_after_patching():
    model = ZOO["gpt2"].build().float()
    hf_hwbp.patch_model(model, k=1)
    model.half()
    model.to(torch.float64)
    assert_trains(model, k=1)

    def reinit(module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.05)

    model.apply(reinit)
    assert_trains(model, k=1)
    assert hf_hwbp.is_patched(model) and hook_count(model) == 2 * L


def test_reference_model_loop_in_the_style_of_trl():
    """Policy forward, reference forward under no_grad (a deepcopy of the patched policy), loss from both, backward."""
    policy = patched(k=1)
    reference = copy.deepcopy(policy).eval()

    def kl_loss(model, ref_logits):
        torch.manual_seed(SEED)
        logits = model(**BATCH).logits
        return (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - ref_logits.log_softmax(-1))).sum()

    with torch.no_grad():
        ref_logits = reference(**BATCH).logits
    expected = expected_grads(policy, 1, lambda m: kl_loss(m, ref_logits))
    for _ in range(2):
        policy.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        logits = policy(**BATCH).logits
        with torch.no_grad():
            ref = reference(**BATCH).logits  # between the policy's forward and its backward
        loss = (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - ref.log_softmax(-1))).sum()
        loss.backward()
        assert_close({n: p.grad for n, p in policy.named_parameters()}, expected)
    assert all(p.grad is None for p in reference.parameters())


def test_dpo_trainer_with_a_patched_policy(tmp_path):
    """TRL's DPOTrainer: the reference loaded from the local checkpoint (ref_model=None) and a deepcopy of the
    patched policy train the policy identically; and the policy really trains with Highway-BP."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_hwbp.examples.data import train_bpe_tokenizer

    words = "the cat sat on a mat while a dog ran far away from home and back again".split()
    g = torch.Generator().manual_seed(0)

    def sentence(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    tokenizer = train_bpe_tokenizer([sentence(8) for _ in range(64)], vocab_size=300)
    rows = {"prompt": [sentence(4) for _ in range(8)], "chosen": [" " + sentence(3) for _ in range(8)]}
    rows["rejected"] = [" " + sentence(3) for _ in range(8)]
    data = Dataset.from_dict(rows)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=L, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "policy")

    def train(ref: str, k: int | None) -> dict[str, torch.Tensor]:
        policy = GPT2LMHeadModel.from_pretrained(tmp_path / "policy")
        if k is not None:
            hf_hwbp.patch_model(policy, k=k)
        args = trl.DPOConfig(output_dir=str(tmp_path / ref), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=32,
                             seed=0, disable_tqdm=True)  # fmt: skip
        ref_model = copy.deepcopy(policy) if ref == "copy" else None
        trainer = trl.DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=data,
                                 processing_class=tokenizer)  # fmt: skip
        trainer.train()
        if k is not None:
            assert hf_hwbp.last_highway_iterations(policy) == k
        return {n: p.detach().clone() for n, p in policy.named_parameters()}

    from_checkpoint, from_copy, exact = train("checkpoint", 1), train("copy", 1), train("checkpoint", None)
    assert all(torch.equal(from_checkpoint[n], from_copy[n]) for n in from_copy)
    assert any(not torch.allclose(from_checkpoint[n], exact[n]) for n in exact)  # k = 1 is not backprop
