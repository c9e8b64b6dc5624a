"""The example scripts end to end in --smoke_test mode (in-process, a few seconds each), and their argument errors."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)

import run_clm_hwbp  # noqa: E402
import run_image_classification_hwbp  # noqa: E402

QUIET = ["--disable_tqdm", "true", "--report_to", "none"]


def _results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as f:
        return json.load(f)


def _clm(tmp_path, *args: str) -> dict:
    return run_clm_hwbp.main(["--smoke_test", "--output_dir", str(tmp_path), *QUIET, *args])


def _vit(tmp_path, *args: str) -> dict:
    return run_image_classification_hwbp.main(["--smoke_test", "--output_dir", str(tmp_path), *QUIET, *args])


# ----- causal LM ------------------------------------------------------------------------------------------------------
def test_clm_default_compare_backprop(tmp_path):
    runs = _clm(tmp_path, "--compare_backprop")
    assert set(runs) == {"highway_bp_k2", "backprop"}
    for run_dir in (tmp_path, tmp_path / "backprop"):
        results = _results(run_dir)
        assert math.isfinite(results["eval_loss"])
        assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
        assert (run_dir / "model.safetensors").exists() and (run_dir / "tokenizer.json").exists()
    png = tmp_path / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "comparison.md").read_text()
    assert "| highway_bp_k2 |" in table and "| backprop |" in table and "perplexity" in table
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["run"] for r in rows] == ["highway_bp_k2", "backprop"]
    assert rows[1]["time_vs_backprop"] == pytest.approx(1.0)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert any("hwbp_k" in entry and "hwbp_iterations" in entry for entry in state["log_history"])


def test_clm_json_args_file_and_highway_flags(tmp_path):
    args_file = tmp_path / "args.json"
    out = tmp_path / "out"
    args = {"smoke_test": True, "output_dir": str(out), "disable_tqdm": True, "hwbp_k": 0, "max_steps": 2}
    args_file.write_text(json.dumps(args))
    runs = run_clm_hwbp.main([str(args_file)])
    assert list(runs) == ["highway_bp_k0"]
    assert math.isfinite(_results(out)["eval_loss"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # the file's max_steps overrides the smoke recipe
    assert {entry["hwbp_k"] for entry in state["log_history"] if "hwbp_k" in entry} == {0}


def test_clm_train_file_and_lora(tmp_path):
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # a line of code" for i in range(400))
    train = tmp_path / "train.txt"
    train.write_text(text)
    out = tmp_path / "out"
    args = ["--train_file", str(train), "--cache_dir", str(tmp_path / "cache"), "--use_lora", "--max_steps", "2"]
    runs = run_clm_hwbp.main(["--smoke_test", "--output_dir", str(out), *QUIET, *args])
    metrics = runs["highway_bp_k2"]
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_samples"] >= 1
    assert (out / "adapter_config.json").exists()  # a PEFT model was trained and saved


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_file", "no/such/file.txt"], "does not exist"),
        (["--train_file", "data.parquet"], "csv, a json or a txt"),
        (["--model_type", "gpt-42"], "Unknown --model_type 'gpt-42'"),
        (["--model_type", "opt"], "no adapter for model_type='opt'"),
        (["--hwbp_k", "-1"], "hwbp_k must be >= 0"),
        (["--model_name_or_path", "some/model", "--config_overrides", "n_layer=2"], "--config_overrides can't"),
        (["--validation_split_percentage", "0"], "validation_split_percentage"),
        (["--use_highway_bp", "false", "--compare_backprop"], "--compare_backprop compares"),
    ],
)
def test_clm_argument_errors(tmp_path, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _clm(tmp_path, *args)
    assert not (tmp_path / "all_results.json").exists()


def test_clm_lora_targets_matching_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        _clm(tmp_path, "--use_lora", "--lora_target_modules", "c_attn,nope")
    assert not (tmp_path / "all_results.json").exists()


# ----- image classification -------------------------------------------------------------------------------------------
def test_image_classification_default_compare_backprop(tmp_path):
    runs = _vit(tmp_path, "--compare_backprop")
    assert set(runs) == {"highway_bp_k2", "backprop"}
    for run_dir in (tmp_path, tmp_path / "backprop"):
        results = _results(run_dir)
        assert math.isfinite(results["eval_loss"]) and 0.0 <= results["eval_accuracy"] <= 1.0
        assert (run_dir / "preprocessor_config.json").exists()
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "comparison.md").read_text()
    assert "| highway_bp_k2 |" in table and "| backprop |" in table and "accuracy" in table
    # k=2 < 3 layers: Highway-BP is not exact backprop, the two runs differ slightly.
    losses = [r["metrics"]["train_loss"] for r in json.loads((tmp_path / "comparison.json").read_text())]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=0.05)


def test_image_classification_train_dir(tmp_path):
    from PIL import Image

    for split, count in (("train", 6), ("val", 3)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "out"
    data = ["--train_dir", str(tmp_path / "images" / "train"), "--validation_dir", str(tmp_path / "images" / "val")]
    runs = _vit(out, *data, "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2")
    assert math.isfinite(runs["highway_bp_k2"]["eval_loss"]) and runs["highway_bp_k2"]["eval_samples"] == 6
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_dir", "no/such/folder"], "is not a folder"),
        (["--model_type", "vitt"], "Unknown --model_type 'vitt'"),
        (["--model_type", "resnet"], "no adapter for model_type='resnet'"),
        (["--hwbp_k", "-3"], "hwbp_k must be >= 0"),
        (["--config_overrides", "image_size=10,patch_size=4"], "not a multiple of patch_size"),
        (["--use_lora", "--lora_target_modules", "q_proj", "nope"], r"\[.nope.\] match no module"),
    ],
)
def test_image_classification_argument_errors(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        _vit(tmp_path, *args)
    assert not (tmp_path / "all_results.json").exists()


def test_image_classification_without_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install hf_hwbp\[vision\]"):
        _vit(tmp_path)


def test_image_classification_lora_default_targets(tmp_path):
    runs = _vit(tmp_path, "--use_lora", "--max_steps", "2")
    assert math.isfinite(runs["highway_bp_k2"]["eval_loss"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"} and config["modules_to_save"] == ["classifier"]


# ----- the embedded digits --------------------------------------------------------------------------------------------
def test_digits_split_is_deterministic_stratified_and_normalized():
    from hf_hwbp.vision_data import digits_image_classification_data

    a = digits_image_classification_data(image_size=16, num_channels=3, validation_fraction=0.2)
    b = digits_image_classification_data(image_size=16, num_channels=3, validation_fraction=0.2)
    assert len(a.train) + len(a.validation) == 1797 and len(a.label_names) == 10
    assert torch.equal(a.validation.labels, b.validation.labels) and torch.equal(a.train.images, b.train.images)
    counts = torch.bincount(a.validation.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class
    item = a.train[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0  # mean = std = 0.5
    assert len(a.train.select(range(10))) == 10
