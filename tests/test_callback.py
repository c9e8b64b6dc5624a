"""HighwayCallback under Trainer, Seq2SeqTrainer, a compute_loss-overriding Trainer and TRL's SFTTrainer.

Gradients are compared with HighwayTrainer (same seed, data order and schedule) and, for the first step, with
single-process Highway-BP on the same batch through patch_model alone (trainer_helpers.reference_grads).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from trainer_helpers import (
    N_LAYER,
    GradRecorder,
    LogCapture,
    StepRecorder,
    make_args,
    quiet_cpu_settings,
    reference_grads,
    rel_err,
    repetitive_data,
    tiny_gpt2,
    train_entries,
)
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments

import hf_hwbp
from hf_hwbp import (
    HighwayBPError,
    HighwayCallback,
    HighwayConfig,
    HighwayTrainer,
    HighwayTrainingConfig,
    add_highway_callback,
    is_patched,
    patch_model,
)
from hf_hwbp.arguments import HighwayArguments

STEP_SCHEDULE = {"k": 0, "k_schedule": "step", "k_step_every": 1}  # k = 0, 1, 2 for steps 1, 2, 3


class ManualLossTrainer(Trainer):
    """Overrides compute_loss the way TRL's trainers do: its own forward without labels and its own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"])
        # float32 like transformers' own causal-LM loss (which upcasts half-precision logits, and downcasts float64)
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]).float()
        targets = labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
        loss = loss / count
        return (loss, outputs) if return_outputs else loss


def plain_args(tmp_path, arguments_class=TrainingArguments, **overrides):
    settings = dict(
        **quiet_cpu_settings(tmp_path / "out"),
        max_steps=3,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        seed=0,
    )
    settings.update(overrides)
    return arguments_class(**settings)


def run(trainer_class, tmp_path, arguments_class=TrainingArguments, data=None):
    """Three optimizer steps of a float64 GPT-2 with k = 0, 1, 2; the gradients of every step and the trainer."""
    recorder = GradRecorder()
    model = tiny_gpt2(dtype=torch.float64)
    data = data or repetitive_data(n=4)  # one batch of 4 rows: every step sees the whole data set
    if trainer_class is HighwayTrainer:
        args = make_args(
            tmp_path, max_steps=3, optim="sgd", learning_rate=0.1, max_grad_norm=0.0, hwbp_config=STEP_SCHEDULE
        )
        trainer = HighwayTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    else:
        args = plain_args(tmp_path, arguments_class)
        callbacks = [HighwayCallback(HighwayTrainingConfig(**STEP_SCHEDULE)), recorder]
        trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer, recorder.grads, model


@pytest.fixture(scope="module")
def highway_trainer_run(tmp_path_factory):
    return run(HighwayTrainer, tmp_path_factory.mktemp("highway_trainer"))


@pytest.mark.parametrize(
    "trainer_class, arguments_class, tolerance",
    [
        (Trainer, TrainingArguments, 0.0),  # the same operations: bit-identical
        (Seq2SeqTrainer, Seq2SeqTrainingArguments, 0.0),
        (ManualLossTrainer, TrainingArguments, 1e-12),  # another loss expression: float64 rounding only
    ],
)
def test_callback_gives_highway_trainer_gradients(
    tmp_path, highway_trainer_run, trainer_class, arguments_class, tolerance
):
    expected_trainer, expected, _ = highway_trainer_run
    trainer, grads, model = run(trainer_class, tmp_path, arguments_class)
    assert len(grads) == len(expected) == 3
    for step in range(3):
        for name, g in expected[step].items():
            assert rel_err(grads[step][name], g) <= tolerance, (step, name)
    assert [e["hwbp_k"] for e in train_entries(trainer)] == [0, 1, 2]
    assert [e["hwbp_iterations"] for e in train_entries(trainer)] == [0, 1, 2]
    assert [e["hwbp_k"] for e in train_entries(expected_trainer)] == [0, 1, 2]
    assert not is_patched(model)  # unpatched at the end of training


def test_first_step_is_highway_bp_of_the_batch(highway_trainer_run):
    # Independent check of step 1 (k = 0): its batch is the whole data set (the mean loss does not depend on the
    # order of the rows), recomputed through patch_model alone.
    _, grads, _ = highway_trainer_run
    data = repetitive_data(n=4)
    expected = reference_grads(0, data)
    exact = reference_grads(N_LAYER, data)
    assert max(rel_err(grads[0][n], g) for n, g in expected.items()) < 1e-10
    assert max(rel_err(grads[0][n], g) for n, g in exact.items()) > 1e-3  # k = 0 is not backprop here


def test_resume_continues_the_schedule(tmp_path):
    def train(resume=None):
        recorder = StepRecorder()
        args = plain_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=4, optim="adamw_torch")
        config = HighwayTrainingConfig(k=0, k_schedule="step", k_step_every=2, k_max=3)
        callbacks = [HighwayCallback(config), recorder]
        trainer = Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=repetitive_data(), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, recorder

    expected = {step: min((step - 1) // 2, 3) for step in range(1, 9)}
    trainer, recorder = train()
    assert recorder.k == expected
    losses = {e["step"]: e["loss"] for e in train_entries(trainer)}
    resumed, recorder = train(resume=str(tmp_path / "out" / "checkpoint-4"))
    assert recorder.k == {step: expected[step] for step in range(5, 9)}
    entries = [e for e in train_entries(resumed) if e["step"] > 4]
    assert {e["step"]: e["hwbp_k"] for e in entries} == {step: expected[step] for step in range(5, 9)}
    for e in entries:
        assert e["loss"] == pytest.approx(losses[e["step"]], rel=1e-5), e


def test_integrations_see_the_values_when_the_callback_comes_first(tmp_path):
    def trainer_with_integration(callbacks):
        args = plain_args(tmp_path, max_steps=2)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(), callbacks=callbacks)
        integration = LogCapture()  # where report_to integrations sit: right after DefaultFlowCallback
        trainer.callback_handler.callbacks.insert(1, integration)
        return trainer, integration

    # Passed in callbacks=[...], the callback runs after the integrations: they get the log before it is completed.
    trainer, integration = trainer_with_integration([HighwayCallback(HighwayTrainingConfig(k=1))])
    trainer.train()
    assert [e["hwbp_k"] for e in train_entries(trainer)] == [1, 1]  # log_history (trainer_state.json) has them
    assert not any("hwbp_k" in log for log in integration.logs)
    # add_highway_callback puts it ahead of them.
    trainer, integration = trainer_with_integration([])
    add_highway_callback(trainer, HighwayTrainingConfig(k=1))
    trainer.train()
    seen = [log for log in integration.logs if "loss" in log]
    assert [(log["hwbp_k"], log["hwbp_iterations"]) for log in seen] == [(1, 1), (1, 1)]


def test_sft_trainer_with_highway_arguments(tmp_path):
    trl = pytest.importorskip("trl")
    import datasets

    from hf_hwbp.examples.data import train_bpe_tokenizer

    @dataclass
    class HighwaySFTConfig(HighwayArguments, trl.SFTConfig):
        pass

    tokenizer = train_bpe_tokenizer(["highway backpropagation along the residual path"] * 20, 300)
    rows = [[(i + 3 * j) % 16 for j in range(12)] for i in range(4)]
    data = datasets.Dataset.from_dict({"input_ids": rows})

    class RecordingSFTTrainer(trl.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.batches.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return super().training_step(model, inputs, num_items_in_batch)

    def sft(**highway):
        recorder = GradRecorder()
        args = plain_args(tmp_path, HighwaySFTConfig, max_steps=1, bf16=False, **highway)  # SFTConfig's default: bf16
        model = tiny_gpt2(dtype=torch.float64)
        trainer = RecordingSFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[HighwayCallback(), recorder],  # settings from the arguments
        )
        trainer.batches = []
        trainer.train()
        return trainer, recorder.grads[0]

    trainer, grads = sft(hwbp_k=1)
    assert [(e["hwbp_k"], e["hwbp_iterations"]) for e in train_entries(trainer)] == [(1, 1)]
    # The batch SFT built (after its own preprocessing and collation), recomputed through patch_model alone.
    (batch,) = trainer.batches
    reference = patch_model(tiny_gpt2(dtype=torch.float64), k=1).train()
    # The Trainer normalizes the summed token loss by the label count it sees (num_items_in_batch: unshifted
    # labels), the model's own mean by the shifted ones: the reference uses the Trainer's count.
    count = (batch["labels"] != -100).sum()
    reference(**batch, num_items_in_batch=count).loss.backward()
    exact = tiny_gpt2(dtype=torch.float64).train()
    exact(**batch, num_items_in_batch=count).loss.backward()
    # transformers computes causal-LM losses in float32 (logits cast), and SFT's compute_loss runs its own forward:
    # float32 rounding (~1e-7) separates the two; Highway-BP(1) and backprop differ by far more here.
    assert max(rel_err(grads[n], p.grad) for n, p in reference.named_parameters()) < 1e-5
    assert max(rel_err(grads[n], p.grad) for n, p in exact.named_parameters()) > 1e-2

    trainer, _ = sft(use_highway_bp=False)
    assert not any(key.startswith("hwbp") for e in trainer.state.log_history for key in e)


def test_settings_from_two_places_must_agree(tmp_path):
    with pytest.raises(ValueError, match="in one place"):
        HighwayTrainer(
            model=tiny_gpt2(),
            args=make_args(tmp_path, hwbp_k=2),
            train_dataset=repetitive_data(),
            highway_config=HighwayTrainingConfig(k=1),
        )
    # The same settings twice are fine.
    HighwayTrainer(model=tiny_gpt2(), args=make_args(tmp_path, hwbp_k=1), highway_config={"k": 1})


def fresh_gpt2():
    return tiny_gpt2()


def test_model_init(tmp_path):
    recorder = StepRecorder()
    args = plain_args(tmp_path, max_steps=2)
    callbacks = [HighwayCallback(HighwayConfig(k=1)), recorder]  # an engine config: those settings at every step
    trainer = Trainer(model_init=fresh_gpt2, args=args, train_dataset=repetitive_data(), callbacks=callbacks)
    trainer.train()
    assert recorder.k == {1: 1, 2: 1}
    assert [e["hwbp_iterations"] for e in train_entries(trainer)] == [1, 1]


class ShadowModelTrainer(Trainer):
    """Computes its loss with another model than the one it gives its callbacks (which is never trained)."""

    shadow = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self.shadow, inputs, return_outputs, num_items_in_batch)


def test_a_step_without_highway_backward_raises(tmp_path):
    trainer = ShadowModelTrainer(
        model=tiny_gpt2(),
        args=plain_args(tmp_path, max_steps=1),
        train_dataset=repetitive_data(),
        callbacks=[HighwayCallback()],
    )
    trainer.shadow = tiny_gpt2(seed=1)
    with pytest.raises(HighwayBPError, match="optimizer step 1 ran no Highway backward"):
        trainer.train()


def test_callback_arguments(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'k'"):
        HighwayCallback(k=2)  # settings go in a HighwayConfig
    with pytest.raises(TypeError, match=r"HighwayTrainingConfig \(or a HighwayConfig\), a dict or None"):
        HighwayCallback(2)
    with pytest.raises(TypeError, match=r"Unknown Highway-BP setting\(s\) \['kk'\]"):
        HighwayCallback({"kk": 2})
    with pytest.raises(ValueError, match="has its own HighwayCallback"):
        HighwayTrainer(model=tiny_gpt2(), args=make_args(tmp_path), callbacks=[HighwayCallback()])


class IterationReader(TrainerCallback):
    """A user's callback: reads the public hf_hwbp.last_highway_iterations after every optimizer step."""

    def __init__(self):
        self.seen: list[int | None] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(hf_hwbp.last_highway_iterations(model))


@pytest.mark.parametrize("trainer_class", [Trainer, HighwayTrainer])
def test_a_user_callback_reads_the_iterations_of_the_last_backward(tmp_path, trainer_class):
    reader = IterationReader()
    if trainer_class is HighwayTrainer:
        args = make_args(tmp_path, max_steps=3, hwbp_config=STEP_SCHEDULE)
        trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(n=4), callbacks=[reader])
    else:
        callbacks = [HighwayCallback(HighwayTrainingConfig(**STEP_SCHEDULE)), reader]
        trainer = Trainer(
            model=tiny_gpt2(), args=plain_args(tmp_path), train_dataset=repetitive_data(n=4), callbacks=callbacks
        )
    trainer.train()
    assert reader.seen == [0, 1, 2]  # k = 0, 1, 2: the callback's own count did not consume the public value
    assert [e["hwbp_iterations"] for e in train_entries(trainer)] == [0, 1, 2]


@pytest.mark.parametrize(
    "config",
    [HighwayTrainingConfig(k=N_LAYER), HighwayTrainingConfig(k=1, k_schedule="exact_last", exact_last_steps=3)],
    ids=["k=L", "exact_last"],
)
def test_exact_steps_under_the_callback_train_as_backprop(tmp_path, config):
    """With the package's defaults a plain Trainer whose every step is exact trains exactly as without the callback
    (the model's own backward), logs L iterations per step, and its step check does not mistake the exact steps
    (which record no Highway forward) for a loss computed with another model."""

    def train(callbacks):
        recorder = GradRecorder()
        trainer = Trainer(
            model=tiny_gpt2(dtype=torch.float64),
            args=plain_args(tmp_path),
            train_dataset=repetitive_data(n=4),
            callbacks=[*callbacks, recorder],
        )
        trainer.train()
        return trainer, recorder.grads

    trainer, grads = train([HighwayCallback(config)])
    _, expected = train([])
    for step in range(3):  # the same operations as without the callback: bit for bit
        assert all(torch.equal(grads[step][name], g) for name, g in expected[step].items()), step
    assert [(e["hwbp_k"], e["hwbp_iterations"]) for e in train_entries(trainer)] == [(N_LAYER, N_LAYER)] * 3
