"""HighwayTrainer / HighwayTrainingArguments / k schedules, on tiny random models (CPU, seconds each)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from trainer_helpers import (
    N_LAYER,
    GradRecorder,
    LogCapture,
    StepRecorder,
    make_args,
    reference_grads,
    rel_err,
    repetitive_data,
    tiny_gpt2,
    tiny_llama,
    train_entries,
)
from transformers import (
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)

from hf_hwbp import (
    HighwayTrainer,
    HighwayTrainingArguments,
    HighwayTrainingConfig,
    check_lora_targets,
    highway_state,
    is_patched,
    patch_model,
)
from hf_hwbp.schedules import (
    SCHEDULE_NAMES,
    CallableSchedule,
    ConstantSchedule,
    ExactLastSchedule,
    StepSchedule,
)
from hf_hwbp.training_config import AUTO_DEFAULT_TOL


# ----- schedules (pure) ---------------------------------------------------------------------------------------------
def test_schedule_names():
    assert SCHEDULE_NAMES == ("constant", "step", "exact_last")


def test_constant_schedule():
    s = ConstantSchedule(3)
    assert [s(i) for i in range(5)] == [3] * 5
    assert not s.exact_at(4)
    with pytest.raises(ValueError):
        ConstantSchedule(-1)


def test_step_schedule():
    s = StepSchedule(1, every=3, k_max=4)
    assert [s(i) for i in range(14)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 4]
    assert [StepSchedule(0, every=1)(i) for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="every"):
        StepSchedule(1, every=0)
    with pytest.raises(ValueError, match="k_max"):
        StepSchedule(3, every=2, k_max=2)
    with pytest.raises(ValueError, match="step"):
        s(-1)


def test_exact_last_schedule():
    s = ExactLastSchedule(2, last_steps=3, total_steps=10, exact_k=4)
    assert [s(i) for i in range(10)] == [2] * 7 + [4] * 3
    assert [s.exact_at(i) for i in range(10)] == [False] * 7 + [True] * 3
    nested = ExactLastSchedule(StepSchedule(0, every=2), last_steps=1, total_steps=5, exact_k=6)
    assert [nested(i) for i in range(5)] == [0, 0, 1, 1, 6]
    with pytest.raises(ValueError, match="last_steps"):
        ExactLastSchedule(2, last_steps=0, total_steps=10, exact_k=4)


def test_named_schedules_from_the_training_config():
    def schedule(**settings):
        return HighwayTrainingConfig(**settings).schedule(num_blocks=4, total_steps=5)

    assert isinstance(schedule(k=2), ConstantSchedule) and schedule(k=2)(7) == 2
    step = schedule(k=1, k_schedule="step", k_step_every=2)
    assert [step(i) for i in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]  # k_max defaults to num_blocks
    assert schedule(k=6, k_schedule="step", k_step_every=2)(0) == 6  # a start above num_blocks is fine
    last = schedule(k=1, k_schedule="exact_last", exact_last_steps=2)
    assert [last(i) for i in range(5)] == [1, 1, 1, 4, 4] and [last.exact_at(i) for i in range(5)] == [0, 0, 0, 1, 1]
    assert [schedule(k="auto")(i) for i in range(2)] == [4, 4]  # auto starts at the number of blocks
    assert HighwayTrainingConfig(k=1, k_schedule="step", k_step_every=3).describe_schedule() == (
        "step: k = 1 + step // 3, at most the number of Highway blocks"
    )


def test_callable_schedule_checks_values():
    s = CallableSchedule(lambda step: step // 2)
    assert [s(i) for i in range(5)] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match=r"k_schedule\(1\) returned -1"):
        CallableSchedule(lambda step: -1)(1)
    with pytest.raises(TypeError, match=r"k_schedule\(0\) returned 1.5"):
        CallableSchedule(lambda step: 1.5)(0)
    with pytest.raises(TypeError):
        CallableSchedule(3)


# ----- arguments ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hwbp_k=-1), "hwbp_k must be >= 0"),
        (dict(hwbp_k="-1"), "hwbp_k must be >= 0"),
        (dict(hwbp_k="two"), "hwbp_k must be an int >= 0"),
        (dict(hwbp_k=1.5), "hwbp_k must be an int >= 0"),
        (dict(hwbp_k_schedule="cosine"), "Unknown hwbp_k_schedule 'cosine'"),
        (dict(hwbp_k="auto", hwbp_tol=0.0), "hwbp_tol must be a float > 0"),
        (dict(hwbp_tol=-1e-3), "hwbp_tol must be a float > 0"),
        (dict(hwbp_group_size=0), "hwbp_group_size must be an int >= 1"),
        (dict(hwbp_fidelity_steps=-1), "hwbp_fidelity_steps must be an int >= 0"),
        (dict(hwbp_k_schedule="step", hwbp_k_step_every=0), "hwbp_k_step_every must be an int >= 1"),
        (dict(hwbp_k_schedule="step", hwbp_k=3, hwbp_k_max=2), r"hwbp_k_max \(2\) must be >= hwbp_k \(3\)"),
        (dict(hwbp_k_schedule="step", hwbp_k="auto"), "no 'step' schedule"),
        (dict(hwbp_k_max=3), "hwbp_k_max is used by hwbp_k_schedule='step' only"),
        (dict(hwbp_k_schedule="exact_last"), "needs hwbp_exact_last_steps >= 1"),
        (dict(hwbp_exact_last_steps=3), "used by hwbp_k_schedule='exact_last' only"),
        (
            dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
            "only in its non-reentrant form",
        ),
    ],
)
def test_bad_arguments_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_arguments_normalize(tmp_path):
    assert make_args(tmp_path).highway_config.k == 2
    assert make_args(tmp_path, hwbp_k="3").highway_config.k == 3
    auto = make_args(tmp_path, hwbp_k="auto").highway_config
    assert auto.k == "auto" and auto.tol == AUTO_DEFAULT_TOL
    assert make_args(tmp_path, hwbp_k="Auto", hwbp_tol=1e-5).highway_config.tol == 1e-5
    # Checkpointing kwargs that do not choose a form get the non-reentrant one (the one Highway-BP supports).
    checkpointed = make_args(
        tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"preserve_rng_state": False}
    )
    assert checkpointed.activation_checkpointing_kwargs == {"preserve_rng_state": False, "use_reentrant": False}
    plain = make_args(
        tmp_path,
        use_highway_bp=False,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    assert plain.activation_checkpointing_kwargs == {"use_reentrant": True}  # plain backprop: left alone


def test_hf_argument_parser(tmp_path):
    parser = HfArgumentParser(HighwayTrainingArguments)
    common = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu"]
    (args,) = parser.parse_args_into_dataclasses(
        common
        + ["--hwbp_k", "auto", "--hwbp_tol", "1e-4", "--hwbp_k_schedule", "exact_last", "--hwbp_exact_last_steps", "5"]
    )
    config = args.highway_config
    assert (config.k, config.tol, config.k_schedule, config.exact_last_steps) == ("auto", 1e-4, "exact_last", 5)
    (args,) = parser.parse_args_into_dataclasses(
        common + ["--hwbp_k", "1", "--hwbp_k_schedule", "step", "--hwbp_k_step_every", "10", "--hwbp_k_max", "3"]
    )
    config = args.highway_config
    assert (config.k, config.k_step_every, config.k_max, args.use_highway_bp) == (1, 10, 3, True)
    (args,) = parser.parse_args_into_dataclasses(common + ["--no_use_highway_bp", "--hwbp_fidelity_steps", "7"])
    assert (args.use_highway_bp, args.highway_config.k, args.highway_config.fidelity_steps) == (False, 2, 7)
    help_text = parser.format_help()
    for name in ("--hwbp_k ", "--hwbp_tol", "--hwbp_group_size", "--hwbp_k_schedule", "--hwbp_fidelity_steps"):
        assert name in help_text
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(common + ["--hwbp_k_schedule", "bogus"])


# ----- training -----------------------------------------------------------------------------------------------------
def test_loss_falls_and_k_is_logged(tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, max_steps=40, learning_rate=1e-2, lr_scheduler_type="constant", hwbp_k=2)
    capture = LogCapture()
    recorder = StepRecorder()
    trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(), callbacks=[capture, recorder])
    assert not is_patched(model)  # patched when training begins
    trainer.train()
    assert not is_patched(model)  # and unpatched when it ends
    assert recorder.k == {step: 2 for step in range(1, 41)}
    entries = train_entries(trainer)
    seen = [log for log in capture.logs if "loss" in log]
    assert len(seen) == 40 and all(log["hwbp_k"] == 2 and log["hwbp_iterations"] == 2 for log in seen)
    assert [e["step"] for e in entries] == list(range(1, 41))
    assert all(e["hwbp_k"] == 2 and e["hwbp_iterations"] == 2 for e in entries)
    first, last = entries[0]["loss"], sum(e["loss"] for e in entries[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_exact_last_schedule_applied(tmp_path):
    recorder = StepRecorder()
    args = make_args(
        tmp_path, max_steps=5, hwbp_k=1, hwbp_tol=1e-12, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=2
    )
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(), callbacks=[recorder])
    trainer.train()
    assert recorder.k == {1: 1, 2: 1, 3: 1, 4: N_LAYER, 5: N_LAYER}
    assert recorder.tol == {1: 1e-12, 2: 1e-12, 3: 1e-12, 4: None, 5: None}  # exact steps drop the adaptive stop
    assert [e["hwbp_k"] for e in train_entries(trainer)] == [1, 1, 1, N_LAYER, N_LAYER]


def test_callable_schedule_and_auto_k(tmp_path):
    recorder = StepRecorder()
    trainer = HighwayTrainer(
        model=tiny_gpt2(),
        args=make_args(tmp_path, max_steps=5),
        train_dataset=repetitive_data(),
        callbacks=[recorder],
        k_schedule=lambda step: step % 3,
    )
    trainer.train()
    assert recorder.k == {1: 0, 2: 1, 3: 2, 4: 0, 5: 1}
    assert [e["hwbp_iterations"] for e in train_entries(trainer)] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="not both"):
        HighwayTrainer(model=tiny_gpt2(), args=make_args(tmp_path, hwbp_k_schedule="step"), k_schedule=lambda step: 1)

    # "auto": up to the number of blocks, stopping adaptively (a loose tol stops before exact)
    recorder = StepRecorder()
    args = make_args(tmp_path, max_steps=3, hwbp_k="auto", hwbp_tol=0.5)
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(), callbacks=[recorder])
    trainer.train()
    assert set(recorder.k.values()) == {N_LAYER} and set(recorder.tol.values()) == {0.5}
    entries = train_entries(trainer)
    assert all(e["hwbp_k"] == N_LAYER for e in entries)
    assert all(1 <= e["hwbp_iterations"] < N_LAYER for e in entries), entries


def test_fidelity_logged_without_changing_training(tmp_path):
    def run(fidelity_steps):
        model = tiny_gpt2(dropout=0.1)
        args = make_args(tmp_path, max_steps=4, logging_steps=3, hwbp_k=1, hwbp_fidelity_steps=fidelity_steps)
        trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data())
        trainer.train()
        return model, trainer

    model, trainer = run(2)
    reference, _ = run(0)
    # Same dropout masks and the same gradients: the measurement leaves training bit-for-bit unchanged.
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    fidelity = [e for e in trainer.state.log_history if "hwbp_fidelity/cosine" in e]
    assert [e["step"] for e in fidelity] == [2, 4]
    assert "loss" not in fidelity[0]  # step 2 has no training entry (logging_steps=3): an entry of its own
    for e in fidelity:
        assert e["hwbp_fidelity/k"] == 1 and e["hwbp_fidelity/iterations"] == 1
        assert 0.5 < e["hwbp_fidelity/cosine"] <= 1 + 1e-9
        assert 1e-6 < e["hwbp_fidelity/rel_error"] < 1
        blocks = [e[f"hwbp_fidelity/block_{j}_rel_error"] for j in range(N_LAYER)]
        # k=1: the top two blocks get their exact gradient, the lower ones do not
        assert blocks[-1] < 1e-5 and blocks[-2] < 1e-5 and blocks[0] > 1e-6, blocks
        assert all(f"hwbp_fidelity/block_{j}_cosine" in e for j in range(N_LAYER))


def test_gradient_accumulation_and_clipping(tmp_path):
    data = repetitive_data(n=4)
    reference = reference_grads(1, data)
    ref_norm = torch.sqrt(sum(g.pow(2).sum() for g in reference.values())).item()

    def run(batch, accumulation, max_grad_norm):
        recorder = GradRecorder()
        model = tiny_gpt2(dtype=torch.float64)
        args = make_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=max_grad_norm,
            optim="sgd",
            learning_rate=0.1,
            hwbp_k=1,
        )
        trainer = HighwayTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
        trainer.train()
        (entry,) = train_entries(trainer)
        assert entry["hwbp_k"] == 1 and entry["hwbp_iterations"] == 1
        return model, recorder.grads[0], entry["grad_norm"]

    full, full_grads, full_norm = run(4, 1, 0.0)
    accumulated, acc_grads, acc_norm = run(1, 4, 0.0)
    for name, g in reference.items():
        assert rel_err(full_grads[name], g) < 1e-10, name
        assert rel_err(acc_grads[name], g) < 1e-10, name
    for p, q in zip(full.parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert math.isclose(full_norm, ref_norm, rel_tol=1e-9) and math.isclose(acc_norm, ref_norm, rel_tol=1e-9)

    _, clipped_grads, clipped_norm = run(2, 2, 1e-3)  # max_grad_norm scales the Highway gradient
    assert math.isclose(clipped_norm, ref_norm, rel_tol=1e-9)  # the logged norm is the one before clipping
    clipped_total = torch.sqrt(sum(g.pow(2).sum() for g in clipped_grads.values())).item()
    assert math.isclose(clipped_total, 1e-3, rel_tol=1e-3)
    for name, g in reference.items():
        assert rel_err(clipped_grads[name] * (ref_norm / clipped_total), g) < 1e-8, name


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    def grads(**overrides):
        recorder = GradRecorder()
        args = make_args(tmp_path, max_steps=2, max_grad_norm=0.0, hwbp_k=1, **overrides)
        model = tiny_gpt2(dtype=torch.float64)
        HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(n=8), callbacks=[recorder]).train()
        return model, recorder.grads

    _, reference = grads()
    model, checkpointed = grads(
        activation_checkpointing=True, activation_checkpointing_kwargs={"preserve_rng_state": False}
    )
    assert model.transformer.h[0].gradient_checkpointing
    for step in range(2):
        for name, g in reference[step].items():
            assert rel_err(checkpointed[step][name], g) < 1e-12, (step, name)


def test_evaluation_runs_without_highway(tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    data = repetitive_data()
    recorded_at_eval = []

    class RecordedForwards(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            recorded_at_eval.append(highway_state(model).recorded_forwards if is_patched(model) else None)

    trainer = HighwayTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[RecordedForwards()]
    )
    trainer.train()
    assert len([e for e in trainer.state.log_history if "eval_loss" in e]) == 2
    assert recorded_at_eval == [2, 4]  # one Highway record per training micro-batch, none for the evaluations

    assert not is_patched(model)  # unpatched at the end of training
    metrics = trainer.evaluate()
    assert recorded_at_eval == [2, 4, None]
    plain = copy.deepcopy(model)
    plain.eval()
    ids = torch.tensor([row["input_ids"] for row in data[:8]])
    labels = torch.tensor([row["labels"] for row in data[:8]])
    with torch.no_grad():
        expected = plain(input_ids=ids, labels=labels).loss.item()
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, max_steps=4, bf16=True, hwbp_k=1, hwbp_fidelity_steps=2)
    trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data())
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    entries = train_entries(trainer)
    assert all(math.isfinite(e["loss"]) and e["hwbp_iterations"] == 1 for e in entries)
    fidelity = [e for e in entries if "hwbp_fidelity/cosine" in e]
    assert [e["step"] for e in fidelity] == [2, 4] and all(e["hwbp_fidelity/cosine"] > 0.5 for e in fidelity)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_plain_backprop_option(tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, max_steps=2, use_highway_bp=False, hwbp_fidelity_steps=1)
    trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data())
    trainer.train()
    assert not is_patched(model)
    assert not any(key.startswith("hwbp") for e in trainer.state.log_history for key in e)

    # A model patched by the caller still trains with ordinary backprop when use_highway_bp=False.
    data = repetitive_data(n=4)
    patched = patch_model(tiny_gpt2(dtype=torch.float64), k=0)
    recorder = GradRecorder()
    args = make_args(tmp_path, max_steps=1, use_highway_bp=False, max_grad_norm=0.0)
    HighwayTrainer(model=patched, args=args, train_dataset=data, callbacks=[recorder]).train()
    exact = reference_grads(N_LAYER, data)  # k = number of blocks: exact backprop
    assert all(rel_err(recorder.grads[0][n], g) < 1e-10 for n, g in exact.items())


def test_trainer_settings_replace_an_existing_patch_for_the_run(tmp_path):
    model = patch_model(tiny_gpt2(), k=0, tol=0.5, group_size=3)
    recorder = StepRecorder()
    args = make_args(tmp_path, max_steps=2, hwbp_k=3, hwbp_group_size=2)
    HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(), callbacks=[recorder]).train()
    assert (recorder.k, recorder.tol, recorder.group_size) == ({1: 3, 2: 3}, {1: None, 2: None}, {1: 2, 2: 2})
    config = highway_state(model).config  # the caller's patch is back after training
    assert (config.k, config.tol, config.group_size) == (0, 0.5, 3)

    recorder = StepRecorder()
    args = make_args(tmp_path, max_steps=1, hwbp_k="auto")
    HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(), callbacks=[recorder]).train()
    assert (recorder.k, recorder.tol, recorder.group_size) == ({1: N_LAYER}, {1: AUTO_DEFAULT_TOL}, {1: 1})
    assert highway_state(model).config.group_size == 3


def test_plain_training_arguments_get_highway_defaults(tmp_path):
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data())
    trainer.train()
    assert [e["hwbp_k"] for e in train_entries(trainer)] == [2, 2]
    assert [e["hwbp_iterations"] for e in train_entries(trainer)] == [2, 2]


# ----- LoRA ---------------------------------------------------------------------------------------------------------
def test_lora_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, max_steps=10, learning_rate=1e-2, hwbp_k=1, hwbp_fidelity_steps=5)
    recorder = StepRecorder()
    trainer = HighwayTrainer(model=model, args=args, train_dataset=repetitive_data(), callbacks=[recorder])
    trainer.train()
    assert recorder.k == {step: 1 for step in range(1, 11)}  # the PEFT model's base model was patched
    entries = train_entries(trainer)
    assert all(e["hwbp_iterations"] == 1 for e in entries)
    assert entries[-1]["loss"] < entries[0]["loss"]
    fidelity = [e for e in entries if "hwbp_fidelity/cosine" in e]  # over the LoRA parameters only
    assert [e["step"] for e in fidelity] == [5, 10] and all(e["hwbp_fidelity/cosine"] > 0.5 for e in fidelity)
    lora = [n for n in before if "lora_" in n]
    assert len(lora) == 4 * N_LAYER  # A and B of q_proj and v_proj in every layer
    after = dict(model.named_parameters())
    for name, value in before.items():
        if "lora_" in name:
            assert not torch.equal(after[name], value), f"LoRA weight {name} did not change"
        else:
            assert torch.equal(after[name], value), f"base weight {name} changed"


def test_check_lora_targets(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    matched = check_lora_targets(model, ["q_proj", "v_proj"])
    assert len(matched) == 2 * N_LAYER and all(n.endswith(("q_proj", "v_proj")) for n in matched)
    assert len(check_lora_targets(model, r".*\.0\.self_attn\.q_proj")) == 1
    with pytest.raises(ValueError, match=r"\['vv_proj'\] match no module of LlamaForCausalLM.*v_proj"):
        check_lora_targets(model, ["q_proj", "vv_proj"])
    with pytest.raises(ValueError, match="regex 'q_proj' matches no module"):
        check_lora_targets(model, "q_proj")  # a string is a full-match regex in PEFT
    with pytest.raises(ValueError, match="c_attn"):  # GPT-2 names its projections differently
        check_lora_targets(tiny_gpt2(), ["q_proj"])

    # PEFT silently skips a target that matches nothing when another one matches: the trainer refuses it.
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "vv_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'default'.*\['vv_proj'\]"):
        HighwayTrainer(model=peft_model, args=make_args(tmp_path), train_dataset=repetitive_data())
    # When nothing matches PEFT raises itself (NoMatchingPeftModuleError, a ValueError) naming the targets.
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["qq_proj"]))


def test_highway_flags_read_back_and_changes_take_effect(tmp_path):
    args = HighwayTrainingArguments(output_dir=str(tmp_path), hwbp_k=1, report_to="none")
    assert args.hwbp_k == 1 and args.highway_config.k == 1 and args.hwbp_tol is None  # not given: None
    args.hwbp_k = 3  # set after construction: the next read resolves it
    assert args.highway_config.k == 3
    (parsed,) = HfArgumentParser(HighwayTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--hwbp_k", "auto"]
    )
    assert parsed.hwbp_k == "auto" and parsed.highway_config.tol == AUTO_DEFAULT_TOL
    help_text = " ".join(HfArgumentParser(HighwayTrainingArguments).format_help().split())
    assert "hwbp_config['k'] (default 2). --hwbp_tol" in help_text  # one default per flag, not argparse's None too
    args.hwbp_k = -1
    with pytest.raises(ValueError, match="hwbp_k must be >= 0"):
        _ = args.highway_config


def test_a_malformed_config_file_names_the_flag_and_the_file(tmp_path):
    path = tmp_path / "hwbp.json"
    path.write_text('{"k": 2,}')
    with pytest.raises(ValueError, match=r"--hwbp_config.*hwbp\.json.*not valid JSON"):
        HighwayTrainingArguments(output_dir=str(tmp_path), hwbp_config=str(path))


@pytest.mark.parametrize(
    "settings, message, logged_k",
    [
        (
            dict(hwbp_k=9),
            f"k=9 is more than the {N_LAYER} Highway blocks of transformer.h ({N_LAYER} x GPT2Block): "
            f"it is clamped to {N_LAYER}",
            N_LAYER,
        ),
        (dict(hwbp_k=1, hwbp_group_size=8), f"all {N_LAYER} layers of transformer.h into one Highway block", 1),
    ],
)
def test_settings_that_do_nothing_are_named_and_logs_show_what_ran(tmp_path, caplog, settings, message, logged_k):
    args = make_args(tmp_path, max_steps=1, **settings)
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(n=4))
    with caplog.at_level("INFO", logger="hf_hwbp"):
        trainer.train()
    assert caplog.text.count(message) == 1  # said once, by the patch
    assert train_entries(trainer)[0]["hwbp_k"] == min(logged_k, trainer.highway_callback.num_blocks)


# ----- exact steps, as users get them (the model's own backward) ------------------------------------------------------
class WeightsAndGrads(TrainerCallback):
    """The weights at the start of every optimizer step and the gradient the optimizer then sees."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def backprop_grads(weights: dict[str, torch.Tensor], data: list[dict]) -> dict[str, torch.Tensor]:
    """Ordinary backprop on an unpatched model holding ``weights``, over the whole of ``data`` (one batch)."""
    model = tiny_gpt2(dtype=torch.float64)
    model.load_state_dict(weights, strict=False)
    model.train()
    ids = torch.tensor([row["input_ids"] for row in data])
    labels = torch.tensor([row["labels"] for row in data])
    model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "settings, exact_steps",
    [
        (dict(hwbp_k=N_LAYER + 5), [0, 1, 2]),  # a constant k >= L (clamped to L)
        (dict(hwbp_k=2, hwbp_k_schedule="step", hwbp_k_step_every=1), [2]),  # k = 2, 3, then L
        (dict(hwbp_k=1, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=2), [1, 2]),
    ],
    ids=["k>=L", "step-reaches-L", "exact_last"],
)
def test_exact_steps_under_the_trainer_are_backprop(tmp_path, settings, exact_steps):
    """With the package's defaults: every step the schedule makes exact trains with backprop's gradient at the
    weights of that step, is logged as L iterations, and the steps before it are not backprop."""
    data = repetitive_data(n=4)  # one batch: every step sees the whole data set
    recorder = WeightsAndGrads()
    args = make_args(tmp_path, max_steps=3, optim="sgd", learning_rate=0.1, max_grad_norm=0.0, **settings)
    trainer = HighwayTrainer(model=tiny_gpt2(dtype=torch.float64), args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    entries = train_entries(trainer)
    for step in range(3):
        exact = backprop_grads(recorder.weights[step], data)
        error = max(rel_err(recorder.grads[step][n], g) for n, g in exact.items())
        if step in exact_steps:
            assert error < 1e-12, (step, error)
            assert entries[step]["hwbp_k"] == N_LAYER and entries[step]["hwbp_iterations"] == N_LAYER
        else:
            assert error > 1e-6, (step, error)  # a Highway step (k < L) is not backprop here
            assert entries[step]["hwbp_k"] < N_LAYER


def test_encoder_decoder_with_one_stack_exact(tmp_path):
    """BART with a 2-layer encoder and a 4-layer decoder at the default k = 2: the encoder's stack is exact, the
    decoder's is Highway-BP(2); the trained step equals the independent recursion over both stacks."""
    from reference import reference_highway_grads
    from transformers import BartConfig, BartForConditionalGeneration

    def bart():
        torch.manual_seed(0)
        config = BartConfig(
            vocab_size=24, d_model=16, encoder_layers=2, decoder_layers=4, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2,
        )  # fmt: skip
        return BartForConditionalGeneration(config).double()

    rows = [{"input_ids": [(i + 3 * j) % 20 + 3 for j in range(8)], "labels": [(i * j) % 20 + 3 for j in range(6)]}
            for i in range(4)]  # fmt: skip
    recorder = GradRecorder()
    args = make_args(tmp_path, max_steps=1, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)
    trainer = HighwayTrainer(model=bart(), args=args, train_dataset=rows, callbacks=[recorder])
    trainer.train()
    (entry,) = train_entries(trainer)
    assert (entry["hwbp_k"], entry["hwbp_iterations"]) == (2, 2)

    reference = bart()
    batch = {key: torch.tensor([row[key] for row in rows]) for key in ("input_ids", "labels")}
    stacks = [list(reference.model.encoder.layers), list(reference.model.decoder.layers)]  # two stacks
    expected = reference_highway_grads(reference, stacks, lambda m: m(**batch).loss, k=2)
    exact = backprop_of(bart(), batch)
    for name, g in expected.items():
        if not name.endswith("k_proj.bias"):  # its gradient is zero (softmax ignores it): rounding noise only
            assert rel_err(recorder.grads[0][name], g) < 1e-10, name
    encoder = [n for n in expected if ".encoder.layers." in n]
    decoder = [n for n in expected if ".decoder.layers.0." in n]
    assert max(rel_err(recorder.grads[0][n], exact[n]) for n in encoder) > 1e-4  # the decoder's k = 2 reaches it
    assert max(rel_err(recorder.grads[0][n], exact[n]) for n in decoder) > 1e-4


def backprop_of(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_fidelity_and_card_at_exact_steps(tmp_path):
    args = make_args(
        tmp_path, max_steps=2, hwbp_k=1, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=1, hwbp_fidelity_steps=1
    )
    trainer = HighwayTrainer(model=tiny_gpt2(dtype=torch.float64), args=args, train_dataset=repetitive_data(n=4))
    trainer.train()
    first, last = [e for e in trainer.state.log_history if "hwbp_fidelity/cosine" in e]
    assert first["hwbp_fidelity/k"] == 1 and first["hwbp_fidelity/rel_error"] > 1e-4
    assert last["hwbp_fidelity/k"] == N_LAYER and last["hwbp_fidelity/iterations"] == N_LAYER
    assert last["hwbp_fidelity/rel_error"] < 1e-12 and last["hwbp_fidelity/cosine"] > 1 - 1e-12
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"k=1 at step 1; k={N_LAYER} at step 2" in card and f"cosine {last['hwbp_fidelity/cosine']:.6f}" in card


# ----- what the logs say --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, k", [(dict(), 2), (dict(hwbp_k="auto"), N_LAYER), (dict(hwbp_k=0), 0)])
def test_the_patch_is_logged_with_the_k_of_the_first_step(tmp_path, caplog, settings, k):
    trainer = HighwayTrainer(model=tiny_gpt2(), args=make_args(tmp_path, max_steps=1, **settings),
                             train_dataset=repetitive_data(n=4))  # fmt: skip
    with caplog.at_level("INFO", logger="hf_hwbp"):
        trainer.train()
    patched = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Highway-BP(k=")]
    assert len(patched) == 1 and patched[0].startswith(f"Highway-BP(k={k}) on GPT2LMHeadModel:"), patched


def test_a_run_that_is_all_exact_steps_says_so(tmp_path, caplog):
    args = make_args(tmp_path, max_steps=3, hwbp_k=1, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=5)
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(n=4))
    with caplog.at_level("WARNING", logger="hf_hwbp"):
        trainer.train()
    assert "every step of this run is exact backprop (exact_last_steps=5 is not below the run's 3" in caplog.text
    assert [e["hwbp_k"] for e in train_entries(trainer)] == [N_LAYER] * 3
    # A run with Highway steps left says nothing of the kind.
    caplog.clear()
    args = make_args(tmp_path, max_steps=3, hwbp_k=1, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=2)
    with caplog.at_level("WARNING", logger="hf_hwbp"):
        HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(n=4)).train()
    assert "every step of this run" not in caplog.text
