"""HighwayConfig (the engine's settings) and HighwayTrainingConfig (a training run's): validation, JSON round trip
(like PEFT configs), the command line (HighwayArguments) round trip, and where each setting belongs."""

from __future__ import annotations

import json

import pytest
from trainer_helpers import tiny_gpt2
from transformers import HfArgumentParser

from hf_hwbp import HighwayConfig, HighwayTrainingConfig, patch_model
from hf_hwbp.arguments import HighwayArguments, HighwayTrainingArguments
from hf_hwbp.config import CONFIG_NAME, ENGINE_FIELDS
from hf_hwbp.schedules import SCHEDULES, ExactLastSchedule, StepSchedule
from hf_hwbp.training_config import AUTO_DEFAULT_TOL

CONFIGS = [
    HighwayTrainingConfig(),
    HighwayTrainingConfig(k=0, group_size=2, fidelity_steps=10),
    HighwayTrainingConfig(k="auto"),
    HighwayTrainingConfig(k="auto", tol=1e-5, k_schedule="exact_last", exact_last_steps=3),
    HighwayTrainingConfig(k=1, k_schedule="step", k_step_every=7, k_max=4),
    HighwayTrainingConfig(k=3, tol=0.25, backend="sequential"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_json_round_trip(tmp_path, config):
    assert HighwayTrainingConfig.from_dict(json.loads(config.to_json_string())) == config
    path = config.save_pretrained(tmp_path / "saved")
    assert path.endswith(CONFIG_NAME)
    assert HighwayTrainingConfig.from_pretrained(tmp_path / "saved") == config
    assert HighwayTrainingConfig.from_pretrained(path) == config


def test_engine_config_round_trip_and_its_fields(tmp_path):
    config = HighwayConfig(k=3, tol=0.5, group_size=2, backend="sequential")
    config.save_pretrained(tmp_path)
    assert HighwayConfig.from_pretrained(tmp_path) == config
    assert tuple(config.to_dict()) == ENGINE_FIELDS  # what a patched model's backward reads, nothing else
    # A training file is no engine config: it names the settings that belong to the training configuration.
    HighwayTrainingConfig(k=1, k_schedule="exact_last", exact_last_steps=2).save_pretrained(tmp_path / "training")
    with pytest.raises(TypeError, match=r"\['exact_last_steps', 'fidelity_steps', 'k_max', .*HighwayTrainingConfig"):
        HighwayConfig.from_pretrained(tmp_path / "training")
    # ... and an engine file is a training configuration with the default schedule.
    assert HighwayTrainingConfig.from_pretrained(tmp_path) == HighwayTrainingConfig(**config.to_dict())


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_command_line_round_trip(config):
    (args,) = HfArgumentParser(HighwayArguments).parse_args_into_dataclasses(config.to_cli_args())
    assert args.highway_config == config
    (args,) = HfArgumentParser(HighwayArguments).parse_args_into_dataclasses(["--hwbp_config", config.to_json_string()])
    assert args.highway_config == config


def test_flags_and_config_file_combine(tmp_path):
    HighwayTrainingConfig(k=1, tol=0.5).save_pretrained(tmp_path)
    parser = HfArgumentParser(HighwayTrainingArguments)
    common = ["--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(common + ["--hwbp_config", str(tmp_path / CONFIG_NAME)])
    assert (args.highway_config.k, args.highway_config.tol) == (1, 0.5)
    # A flag beats the same entry of hwbp_config (a command-line flag beats a config file); the rest stays.
    (args,) = parser.parse_args_into_dataclasses(
        common + ["--hwbp_config", str(tmp_path / CONFIG_NAME), "--hwbp_k", "3"]
    )
    assert (args.highway_config.k, args.highway_config.tol) == (3, 0.5)
    # Folded into hwbp_config: the arguments' own JSON gives them back, and a copy resolves the same way.
    again = HighwayTrainingArguments(**{**json.loads(args.to_json_string()), "output_dir": str(tmp_path / "out")})
    assert again.highway_config == args.highway_config and args.hwbp_k == 3  # reads back as set
    help_text = parser.format_help()
    assert "--hwbp_config" in help_text and "--hwbp_k_schedule" in help_text and "(default 2)" in help_text


def test_one_default_k():
    assert HighwayConfig().k == HighwayTrainingConfig().k == HighwayArguments().highway_config.k == 2


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k="two"), TypeError, "k must be an int >= 0"),
        (dict(k=True), TypeError, "k must be an int >= 0"),
        (dict(tol=0.0), ValueError, "tol must be a float > 0"),
        (dict(group_size=0), ValueError, "group_size must be an int >= 1"),
        (dict(backend="parallel"), ValueError, "Unknown backend 'parallel'"),
        (dict(k_schedule="cosine"), ValueError, "Unknown k_schedule 'cosine'"),
        (dict(k_schedule="step", k="auto"), ValueError, "no 'step' schedule"),
        (dict(k_schedule="step", k_step_every=0), ValueError, "k_step_every must be an int >= 1"),
        (dict(k_schedule="step", k=3, k_max=2), ValueError, r"k_max \(2\) must be >= k \(3\)"),
        (dict(k_max=3), ValueError, "k_max is used by k_schedule='step' only"),
        (dict(k_step_every=3), ValueError, "k_step_every is used by k_schedule='step' only"),
        (dict(k_schedule="exact_last"), ValueError, "needs exact_last_steps >= 1"),
        (dict(exact_last_steps=3), ValueError, "exact_last_steps is used by k_schedule='exact_last' only"),
        (dict(fidelity_steps=-2), ValueError, "fidelity_steps must be an int >= 0"),
    ],
)
def test_bad_settings(settings, error, message):
    with pytest.raises(error, match=message):
        HighwayTrainingConfig(**settings)


def test_each_schedule_owns_its_settings():
    """The settings a schedule reads are its own; every training field is the engine's, a schedule's, or fidelity."""
    owned = {name for cls in SCHEDULES.values() for name in cls.settings}
    assert owned == {"k_step_every", "k_max", "exact_last_steps"}
    training_only = set(HighwayTrainingConfig.field_names()) - set(ENGINE_FIELDS)
    assert training_only == owned | {"k_schedule", "fidelity_steps"}
    assert StepSchedule.settings == ("k_step_every", "k_max") and ExactLastSchedule.settings == ("exact_last_steps",)


@pytest.mark.parametrize(
    "settings, steps, expected",
    [
        # (k, tol) of steps 0.. of a 5-step run on 4 blocks
        (dict(k=1), 5, [(1, None)] * 5),
        (dict(k=0, k_schedule="step", k_step_every=2), 5, [(0, None), (0, None), (1, None), (1, None), (2, None)]),
        (dict(k=1, tol=0.5, k_schedule="exact_last", exact_last_steps=2), 5, [(1, 0.5)] * 3 + [(4, None)] * 2),
        (dict(k="auto"), 2, [(4, AUTO_DEFAULT_TOL)] * 2),
        (dict(k=9), 1, [(9, None)]),  # clamped by the patch: k past the blocks is exact backprop
    ],
)
def test_engine_config_of_a_step(settings, steps, expected):
    config = HighwayTrainingConfig(group_size=1, backend="sequential", **settings)
    got = [config.engine_config(s, num_blocks=4, total_steps=5) for s in range(steps)]
    assert [(e.k, e.tol) for e in got] == expected
    assert all(isinstance(e, HighwayConfig) and (e.group_size, e.backend) == (1, "sequential") for e in got)


def test_auto_gets_the_measured_tolerance_and_the_engine_config_refuses_training_settings():
    assert AUTO_DEFAULT_TOL == 0.05  # the tolerance measured in docs/choosing_k.md
    assert HighwayTrainingConfig(k="auto").tol == AUTO_DEFAULT_TOL
    with pytest.raises(TypeError, match=r"Unknown Highway-BP setting\(s\) \['kk'\]"):
        HighwayTrainingConfig.from_dict({"kk": 1})
    with pytest.raises(TypeError, match=r"\['k_schedule'\] for HighwayConfig .*training settings: HighwayTraining"):
        HighwayConfig.from_dict({"k": 2, "k_schedule": "step"})
    with pytest.raises(TypeError, match="training settings: HighwayTrainingConfig"):
        patch_model(tiny_gpt2(), k=2, k_schedule="step")
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        patch_model(tiny_gpt2(), k="auto")
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        HighwayConfig(k="auto")


def test_bad_hwbp_config(tmp_path):
    common = dict(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="hwbp_config must be a JSON object"):
        HighwayTrainingArguments(**common, hwbp_config="{k: 2}")
    with pytest.raises(ValueError, match="no such file"):
        HighwayTrainingArguments(**common, hwbp_config="missing.json")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['steps'\]"):
        HighwayTrainingArguments(**common, hwbp_config={"steps": 3})
    with pytest.raises(ValueError, match="hwbp_k must be >= 0"):
        HighwayTrainingArguments(**common, hwbp_config={"k": 2}, hwbp_k="-1")


def test_patch_model_takes_an_engine_config():
    """patch_model(model, config=HighwayConfig(...)) is patch_model(model, k=..., tol=..., group_size=...)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_hwbp

    def grads(patch) -> list:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2, vocab_size=30, n_positions=8)).double()
        patch(model)
        ids = torch.arange(12).remainder(30).reshape(2, 6)
        model(ids, labels=ids).loss.backward()
        return model, [p.grad for p in model.parameters()]

    config = HighwayConfig(k=1, group_size=2)
    by_config, g1 = grads(lambda m: hf_hwbp.patch_model(m, config=config))
    _, g2 = grads(lambda m: hf_hwbp.patch_model(m, k=1, group_size=2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert hf_hwbp.get_highway_config(by_config) == config
