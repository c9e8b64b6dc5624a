"""HighwayConfig: validation, JSON round trip (like PEFT configs), the command line (HighwayArguments) round trip."""

from __future__ import annotations

import json

import pytest
from trainer_helpers import tiny_gpt2
from transformers import HfArgumentParser

from hf_hwbp import HighwayConfig, patch_model
from hf_hwbp.arguments import HighwayArguments, HighwayTrainingArguments
from hf_hwbp.config import AUTO_DEFAULT_TOL, CONFIG_NAME

CONFIGS = [
    HighwayConfig(),
    HighwayConfig(k=0, group_size=2, fidelity_steps=10),
    HighwayConfig(k="auto"),
    HighwayConfig(k="auto", tol=1e-5, k_schedule="exact_last", exact_last_steps=3),
    HighwayConfig(k=1, k_schedule="step", k_step_every=7, k_max=4),
    HighwayConfig(k=3, tol=0.25),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_json_round_trip(tmp_path, config):
    assert HighwayConfig.from_dict(json.loads(config.to_json_string())) == config
    path = config.save_pretrained(tmp_path / "saved")
    assert path.endswith(CONFIG_NAME)
    assert HighwayConfig.from_pretrained(tmp_path / "saved") == config
    assert HighwayConfig.from_pretrained(path) == config


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_command_line_round_trip(config):
    (args,) = HfArgumentParser(HighwayArguments).parse_args_into_dataclasses(config.to_cli_args())
    assert args.highway_config == config
    (args,) = HfArgumentParser(HighwayArguments).parse_args_into_dataclasses(["--hwbp_config", config.to_json_string()])
    assert args.highway_config == config


def test_flags_and_config_file_combine(tmp_path):
    HighwayConfig(k=1, tol=0.5).save_pretrained(tmp_path)
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
    assert HighwayConfig().k == HighwayArguments().highway_config.k == 2


@pytest.mark.parametrize(
    "settings, error, message",
    [
        (dict(k=-1), ValueError, "k must be >= 0"),
        (dict(k="two"), TypeError, "k must be an int >= 0"),
        (dict(k=True), TypeError, "k must be an int >= 0"),
        (dict(tol=0.0), ValueError, "tol must be a float > 0"),
        (dict(group_size=0), ValueError, "group_size must be an int >= 1"),
        (dict(k_schedule="cosine"), ValueError, "Unknown k_schedule 'cosine'"),
        (dict(k_schedule="step", k="auto"), ValueError, "no 'step' schedule"),
        (dict(k_max=3), ValueError, "k_max is used by the 'step' schedule only"),
        (dict(k_schedule="exact_last"), ValueError, "needs exact_last_steps >= 1"),
        (dict(fidelity_steps=-2), ValueError, "fidelity_steps must be an int >= 0"),
    ],
)
def test_bad_settings(settings, error, message):
    with pytest.raises(error, match=message):
        HighwayConfig(**settings)


def test_auto_gets_a_tolerance_and_the_engine_options_stay_narrow():
    assert HighwayConfig(k="auto").tol == AUTO_DEFAULT_TOL
    with pytest.raises(TypeError, match=r"Unknown Highway-BP setting\(s\) \['kk'\]"):
        HighwayConfig.from_dict({"kk": 1})
    with pytest.raises(TypeError, match="k_schedule: training settings, applied by HighwayCallback"):
        patch_model(tiny_gpt2(), k=2, k_schedule="step")
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        patch_model(tiny_gpt2(), k="auto")


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


def test_patch_model_takes_a_config_as_peft_takes_its_own():
    """patch_model(model, HighwayConfig(...)) is patch_model(model, k=..., tol=..., group_size=...); not both."""
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

    config = HighwayConfig(k=1, group_size=2, k_schedule="exact_last", exact_last_steps=5)
    by_config, g1 = grads(lambda m: hf_hwbp.patch_model(m, config))
    _, g2 = grads(lambda m: hf_hwbp.patch_model(m, k=1, group_size=2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert hf_hwbp.get_highway_config(by_config) == HighwayConfig(k=1, group_size=2)  # the engine fields
    with pytest.raises(TypeError, match=r"a HighwayConfig and the keyword\(s\) \['tol'\].*config.updated\(tol=...\)"):
        hf_hwbp.patch_model(by_config, config, tol=1e-3)
    with pytest.raises(ValueError, match="k='auto' is a training setting"):
        hf_hwbp.patch_model(by_config, HighwayConfig(k="auto"))
