"""The example scripts end to end on tiny settings (in-process, seconds each), their arguments and their outputs."""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)

import run_clm_hwbp  # noqa: E402
import run_image_classification_hwbp  # noqa: E402

from hf_hwbp import HighwayTrainer  # noqa: E402

QUIET = ["--disable_tqdm", "true", "--report_to", "none"]
TINY_CLM = [
    *("--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--block_size", "32", "--warmup_steps", "0"),
    *("--max_steps", "4", "--max_train_samples", "32", "--max_eval_samples", "8", "--logging_steps", "1"),
    *("--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--eval_steps", "2"),
]
TINY_VIT = [
    "--config_overrides",
    "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "intermediate_size=32",
    *("--max_steps", "4", "--max_train_samples", "64", "--max_eval_samples", "32", "--logging_steps", "1"),
    *("--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16"),
    *("--eval_strategy", "steps", "--eval_steps", "2", "--warmup_steps", "0"),
]


def _results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as f:
        return json.load(f)


def _clm(tmp_path, *args: str) -> dict:
    return run_clm_hwbp.main(["--output_dir", str(tmp_path), *QUIET, *TINY_CLM, *args])


def _vit(tmp_path, *args: str) -> dict:
    return run_image_classification_hwbp.main(["--output_dir", str(tmp_path), *QUIET, *TINY_VIT, *args])


def _help_defaults(script, argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """``--help``'s "(default: ...)" of every option, for the command line ``argv``."""
    monkeypatch.setenv("COLUMNS", "100000")  # one line per option: no wrapping inside long defaults
    with pytest.raises(SystemExit):
        script.parse_args([*argv, "--help"])
    text = capsys.readouterr().out
    defaults = {}
    for block in re.split(r"\n  (?=--)", text):
        name = re.match(r"--(\w+)", block)
        value = re.search(r"\(default:\s+(.*?)\)\s*$", " ".join(block.split()))
        if name and value:
            defaults[name.group(1)] = value.group(1)
    return defaults


def _applied(parsed: tuple, name: str):
    for args in parsed:
        if hasattr(args, name):
            return getattr(args, name)
    raise AttributeError(name)


# ----- arguments: defaults, --help, a user's flags -------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, argv",
    [
        (run_clm_hwbp, []),
        (run_clm_hwbp, ["--train_file", "{text_file}"]),
        (run_clm_hwbp, ["--model_name_or_path", "some/model"]),
        (run_image_classification_hwbp, []),
        (run_image_classification_hwbp, ["--model_type", "vit"]),
    ],
)
def test_help_shows_the_defaults_that_are_applied(script, argv, capsys, monkeypatch, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text("some text\n")
    argv = [arg.format(text_file=text_file) for arg in argv]
    shown = _help_defaults(script, argv, capsys, monkeypatch)
    parsed = script.parse_args(argv)
    expected = script.script_defaults({flag.lstrip("-"): value for flag, value in zip(argv[::2], argv[1::2])})
    for name, value in expected.items():
        assert shown[name] == str(value), (name, shown[name], value)
        applied = _applied(parsed, name)
        applied = getattr(applied, "value", applied)  # enums (lr_scheduler_type, eval_strategy) by their value
        assert str(applied) == str(value), (name, applied, value)
    if argv and argv[0] in ("--model_name_or_path", "--model_type"):
        assert shown["learning_rate"] == "5e-05" and _applied(parsed, "learning_rate") == 5e-05  # run_clm's
        assert "model_type" not in expected
    else:
        assert float(shown["learning_rate"]) == _applied(parsed, "learning_rate") == 1e-3  # the embedded recipe
    assert shown["save_strategy"] == "no" and str(_applied(parsed, "save_strategy").value) == "no"  # no checkpoints


def test_a_user_flag_beats_the_embedded_recipe(tmp_path):
    text = tmp_path / "my.txt"
    text.write_text("a line of text\n" * 50)
    # A user's first command: a file, 3 epochs, no model. The recipe's model and learning rate apply (they are
    # defaults); its duration does not override the user's: epochs, no max_steps.
    model_args, data_args, training_args, *_ = run_clm_hwbp.parse_args(
        ["--train_file", str(text), "--num_train_epochs", "3"]
    )
    assert training_args.num_train_epochs == 3 and training_args.max_steps == -1
    assert model_args.model_type == "gpt2" and data_args.validation_split_percentage == 5  # run_clm's, for files
    model_args, _, training_args, *_ = run_clm_hwbp.parse_args(
        ["--learning_rate", "5e-4", "--config_overrides", "n_layer=2", "--lr_scheduler_type", "linear"]
    )
    assert training_args.learning_rate == 5e-4 and model_args.config_overrides == "n_layer=2"
    assert training_args.lr_scheduler_type == "linear"
    # An arguments file too: what it gives wins, the defaults fill in the rest.
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"output_dir": str(tmp_path), "learning_rate": 2e-4, "hwbp_k": 0}))
    _, _, training_args, *_ = run_clm_hwbp.parse_args([str(args_file)])
    assert training_args.learning_rate == 2e-4 and training_args.highway_config.k == 0
    assert training_args.lr_scheduler_type == "cosine"  # from the recipe


def test_any_model_type_from_scratch_gets_the_small_recipe(tmp_path):
    model_args, _, training_args, *_ = run_clm_hwbp.parse_args(["--model_type", "llama"])
    assert training_args.learning_rate == 1e-3 and training_args.lr_scheduler_type == "cosine"
    assert "num_hidden_layers=4" in model_args.config_overrides and "hidden_size=128" in model_args.config_overrides
    model_args, *_ = run_clm_hwbp.parse_args(["--model_type", "llama", "--config_overrides", "num_hidden_layers=2"])
    assert model_args.config_overrides == "num_hidden_layers=2"  # the user's replaces the recipe's
    # --save_steps asks for checkpoints: the recipe's save_strategy "no" gives way.
    for script, model in ((run_clm_hwbp, []), (run_clm_hwbp, ["--model_name_or_path", "some/model"])):
        _, _, training_args, *_ = script.parse_args([*model, "--save_steps", "4"])
        assert training_args.save_strategy == "steps" and training_args.save_steps == 4
        _, _, training_args, *_ = script.parse_args(model)
        assert training_args.save_strategy == "no", model  # fine-tuning too: no checkpoints unless asked for


def test_clm_llama_from_scratch_says_what_it_builds(tmp_path, caplog):
    argv = [arg for arg in TINY_CLM]
    del argv[argv.index("--config_overrides") : argv.index("--config_overrides") + 2]
    with caplog.at_level("WARNING"):
        metrics = run_clm_hwbp.main(
            ["--output_dir", str(tmp_path), *QUIET, *argv, "--model_type", "llama", "--max_steps", "1"]
        )
    assert math.isfinite(metrics["eval_loss"])
    built = re.search(r"Building a llama model from scratch: 4 layers, ([\d.]+)M parameters", caplog.text)
    assert built and float(built.group(1)) < 2  # the small recipe, not Llama's 6.7B default
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 128


# ----- causal LM ------------------------------------------------------------------------------------------------------
def test_clm_embedded_default_with_compare_backprop(tmp_path, capsys):
    """The defaults: k = 2 on the tiny 2-layer model makes every step exact, so the Highway-BP run is backprop's; the
    comparison writes both runs, their interleaved step times with the load, and a plot over the whole run."""
    out = tmp_path / "model"
    argv = [arg for arg in TINY_CLM]
    for flag in ("--logging_steps", "--eval_steps"):  # the recipe's: ratios of the run
        i = argv.index(flag)
        del argv[i : i + 2]
    metrics = run_clm_hwbp.main(
        ["--output_dir", str(out), *QUIET, *argv, "--compare_backprop", "--comparison_timing_rounds", "3"]
    )
    assert math.isfinite(metrics["eval_loss"]) and metrics["perplexity"] == pytest.approx(
        math.exp(metrics["eval_loss"])
    )
    comparison = tmp_path / "model-comparison"
    baseline = comparison / "backprop"
    for run_dir in (out, baseline):
        assert (run_dir / "model.safetensors").exists() and (run_dir / "tokenizer.json").exists()
        assert math.isfinite(_results(run_dir)["eval_loss"])
    # The output folder (what push_to_hub uploads) holds the Highway-BP model only.
    assert not any((out / name).exists() for name in ("backprop", "comparison.md", "loss_curves.png"))
    assert (comparison / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (comparison / "comparison.md").read_text()
    assert "| highway_bp_k2 |" in table and "| backprop |" in table and "docs/algorithm.md" in table
    assert not re.findall(r"\]\(\.\./", table)  # no link leaves the repository
    saved = json.loads((comparison / "comparison.json").read_text())
    assert [r["run"] for r in saved["runs"]] == ["highway_bp_k2", "backprop"]
    # k = 2 >= 2 layers: every step is exact, the model's own backward: the two runs train alike.
    assert saved["runs"][0]["metrics"]["train_loss"] == pytest.approx(saved["runs"][1]["metrics"]["train_loss"], 1e-9)
    state = json.loads((out / "trainer_state.json").read_text())
    entries = [e for e in state["log_history"] if "loss" in e]
    assert len(entries) == 4 and all(e["hwbp_k"] == 2 and e["hwbp_iterations"] == 2 for e in entries)
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e][:4] == [1, 2, 3, 4]  # eval_steps 0.1 of 4
    # Step time: interleaved rounds, each method's times, the load; the table gives medians, spread and ratio.
    timing = saved["step_time"]
    assert timing["rounds"] == 3 and set(timing["seconds"]) == {"highway_bp_k2", "backprop"}
    assert all(len(times) == 3 and min(times) > 0 for times in timing["seconds"].values())
    assert len(timing["load_average_before"]) == len(timing["load_average_after"]) == 3
    assert "3 rounds, the methods interleaved" in table and "load average (1, 5, 15 min)" in table
    assert re.search(r"\| backprop \| [\d.]+ \| [\d.]+ - [\d.]+ \| 1\.00x \| 1\.00 - 1\.00 \|", table)
    card = (out / "README.md").read_text()
    assert "hf_hwbp" in card and "Highway-BP" in card and "| k (Highway iterations) | 2 |" in card
    assert "trained from scratch on the embedded corpus" in card and "None dataset" not in card
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32  # --block_size 32
    assert json.loads((out / "hwbp_config.json").read_text())["k"] == 2
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (
        f"Done: the model, its card and metrics are in {out} (README.md, all_results.json, hwbp_config.json); the "
        f"comparison with backprop in {comparison} (comparison.md, loss_curves.png)."
    )


def test_comparison_plot_spans_the_run_in_colours_of_its_own():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_hwbp.examples.comparison import RunResult, plot_runs

    def run(name, offset):
        history = [{"step": 10, "loss": 2.0 + offset}, {"step": 20, "loss": 1.5 + offset}]
        history += [{"step": 20, "eval_loss": 1.6 + offset, "eval_accuracy": 0.7}]  # one evaluation only
        return RunResult(name, "out", {}, history)

    fig = plot_runs(plt, [run("highway_bp_k2", 0.1), run("backprop", 0.0)], "title")
    loss_ax, diff_ax, accuracy_ax = fig.axes
    for ax in fig.axes:
        assert ax.get_xlim() == (0.0, 20.0)  # the whole run, not the logged points' neighbourhood
    assert accuracy_ax.get_ylim() == (0.0, 1.0)
    run_colours = {line.get_color() for line in loss_ax.get_lines()}
    differences = [line for line in diff_ax.get_lines() if line.get_label() in ("train loss", "eval loss")]
    difference_colours = {line.get_color() for line in differences}
    assert len(difference_colours) == 2 and not difference_colours & run_colours
    plt.close(fig)


def test_clm_embedded_corpus_goes_through_datasets():
    from hf_hwbp.examples.data import reference_manual_datasets, train_bpe_tokenizer

    raw = reference_manual_datasets(0.1)
    assert set(raw) == {"train", "validation"} and raw["train"].column_names == ["text"]
    assert len(raw["train"]) > 5 * len(raw["validation"]) > 0
    tokenizer = train_bpe_tokenizer(raw["validation"]["text"], 300)
    ids = tokenizer(raw["validation"]["text"][:2])["input_ids"]
    assert all(row[-1] == tokenizer.eos_token_id for row in ids)  # documents stay separated after group_texts


def test_clm_json_args_file_and_highway_flags(tmp_path):
    args_file = tmp_path / "args.json"
    out = tmp_path / "out"
    args = {flag.lstrip("-"): value for flag, value in zip(TINY_CLM[::2], TINY_CLM[1::2])}
    args = {name: int(value) if value.isdigit() else value for name, value in args.items()}  # JSON types
    args.update(output_dir=str(out), disable_tqdm=True, report_to="none", hwbp_k=0, max_steps=2)
    args_file.write_text(json.dumps(args))
    run_clm_hwbp.main([str(args_file)])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert {entry["hwbp_k"] for entry in state["log_history"] if "hwbp_k" in entry} == {0}


def test_clm_train_file_and_lora(tmp_path):
    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # a line of code" for i in range(400))
    train = tmp_path / "train.txt"
    train.write_text(text)
    out = tmp_path / "out"
    metrics = _clm(out, "--train_file", str(train), "--cache_dir", str(tmp_path / "cache"), "--use_lora")
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_samples"] >= 1
    assert (out / "adapter_config.json").exists()  # a PEFT model was trained and saved


def test_lora_from_scratch_loads_offline(tmp_path, monkeypatch):
    """The random base of a LoRA run from scratch is saved beside the adapter, which names it: the trained model
    loads with AutoPeftModelForCausalLM, without the hub, and computes what the trained model computes."""
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "out"
    trained = {}

    class Keep(HighwayTrainer):
        def save_model(self, *args, **kwargs):
            trained["model"] = self.model
            return super().save_model(*args, **kwargs)

    monkeypatch.setattr(run_clm_hwbp, "HighwayTrainer", Keep)
    _clm(out, "--use_lora", "--lora_target_modules", "c_attn", "--max_steps", "2")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base_model").resolve())
    assert (out / "base_model" / "model.safetensors").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the adapter's path to its base does not depend on the working directory
    loaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    model = trained["model"].eval()
    ids = torch.arange(12).remainder(model.config.vocab_size).reshape(2, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize(
    "script, args, message",
    [
        (run_clm_hwbp, ["--train_file", "no/such/file.txt"], "does not exist"),
        (run_clm_hwbp, ["--train_file", "data.parquet"], "csv, a json or a txt"),
        (run_clm_hwbp, ["--model_type", "gpt-42"], "Unknown --model_type 'gpt-42'"),
        (run_clm_hwbp, ["--hwbp_k", "-1"], "hwbp_k must be >= 0"),
        (run_clm_hwbp, ["--hwbp_k_schedule", "cosine"], r"argument --hwbp_k_schedule\S*: invalid choice: 'cosine'"),
        (run_clm_hwbp, ["--max_steps", "many"], r"argument --max_steps\S*: invalid int value: 'many'"),
        (run_clm_hwbp, ["--model_name_or_path", "m", "--config_overrides", "n_layer=2"], "--config_overrides can't"),
        (run_clm_hwbp, ["--validation_split_percentage", "0"], "validation_split_percentage"),
        (run_clm_hwbp, ["--use_highway_bp", "false", "--compare_backprop"], "--compare_backprop compares"),
        (run_clm_hwbp, ["--config_overrides", "n_layers=2"], "--config_overrides:"),
        (run_clm_hwbp, ["--use_lora", "--lora_target_modules", "c_attn,nope"], r"\['nope'\] match no module"),
        (run_image_classification_hwbp, ["--train_dir", "no/such/folder"], "is not a folder"),
        (run_image_classification_hwbp, ["--model_type", "vitt"], "Unknown --model_type 'vitt'"),
        (run_image_classification_hwbp, ["--hwbp_k", "-3"], "hwbp_k must be >= 0"),
        (run_image_classification_hwbp, ["--hwbp_tol", "small"], r"argument --hwbp_tol\S*: invalid float value"),
        (run_image_classification_hwbp, ["--config_overrides", "image_size=10,patch_size=4"], "not a multiple"),
        (run_image_classification_hwbp, ["--use_lora", "--lora_target_modules", "q_proj", "nope"], "match no module"),
    ],
)
def test_bad_flag_values_are_one_line_usage_errors(tmp_path, capsys, script, args, message):
    """As argparse reports its own: exit status 2 and one line on stderr naming the script, also for a value refused
    by an arguments class, a combination of flags, or the data or model it cannot work with."""
    argv = list(TINY_CLM if script is run_clm_hwbp else TINY_VIT)
    if "--config_overrides" in args or "--model_type" in args:  # these cases are about the model flags themselves
        i = argv.index("--config_overrides")
        del argv[i : i + 2]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--output_dir", str(tmp_path), *QUIET, *argv, *args])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    prog = os.path.basename(script.__file__)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "all_results.json").exists()


@pytest.mark.parametrize("script", [run_clm_hwbp, run_image_classification_hwbp])
def test_launch_and_config_errors_come_before_anything_is_built(tmp_path, script, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(script, "set_seed", lambda *a, **k: built.append("set_seed"))  # the first step after checks
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(out), *QUIET, "--layer_parallel"])
    assert "--layer_parallel trains one pipeline stage per process" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"k": 1,,}')
    with pytest.raises(SystemExit):
        script.main(["--output_dir", str(out), *QUIET, "--hwbp_config", str(bad)])
    assert re.search(r"--hwbp_config.*bad\.json.*not valid JSON", capsys.readouterr().err)
    assert built == [] and not out.exists()


def test_model_types_outside_the_zoo_warn_instead_of_refusing():
    """A type outside the tested zoo is left to patch_model (discovery, or its clear error), with a warning."""
    from transformers.testing_utils import CaptureLogger

    from hf_hwbp.examples import models

    with CaptureLogger(models.logger) as captured:
        assert models.check_highway_supported("bloom", True, "causal-LM") is False
    assert "model_type='bloom' is not in Highway-BP's tested zoo" in captured.out
    assert "--use_highway_bp false" in captured.out
    with CaptureLogger(models.logger) as captured:
        assert models.check_highway_supported("gpt2", True, "causal-LM") is True
        assert models.check_highway_supported("bloom", False, "causal-LM") is False
    assert captured.out == ""


# ----- image classification -------------------------------------------------------------------------------------------
def test_image_classification_default_compare_backprop(tmp_path):
    out = tmp_path / "vit"
    metrics = _vit(out, "--compare_backprop", "--comparison_timing_rounds", "2")
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    comparison = tmp_path / "vit-comparison"
    for run_dir in (out, comparison / "backprop"):
        assert (run_dir / "preprocessor_config.json").exists() and math.isfinite(_results(run_dir)["eval_loss"])
    assert not (out / "backprop").exists() and (comparison / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    table = (comparison / "comparison.md").read_text()
    assert "| highway_bp_k2 |" in table and "| backprop |" in table and "accuracy" in table
    # k = 2 < 3 layers: Highway-BP is not exact backprop, the two runs differ slightly.
    saved = json.loads((comparison / "comparison.json").read_text())
    losses = [r["metrics"]["train_loss"] for r in saved["runs"]]
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=0.05)
    assert saved["step_time"]["rounds"] == 2 and "2 rounds, the methods interleaved" in table
    processor = json.loads((out / "preprocessor_config.json").read_text())  # the image processor built from config
    assert processor["size"] == {"height": 8, "width": 8} and processor["image_mean"] == [0.5]
    card = (out / "README.md").read_text()  # the embedded data set is named, not "an unknown dataset"
    assert "trained from scratch on the embedded data set (scikit-learn's handwritten digits" in card
    assert "unknown dataset" not in card


class RecordingTrainer(HighwayTrainer):
    """Keeps the labels of the training set the script hands over."""

    seen_labels: list[int] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:
            RecordingTrainer.seen_labels = [int(item["labels"]) for item in self.train_dataset]


def test_image_folders_are_shuffled_before_selecting(tmp_path, monkeypatch):
    from PIL import Image

    for split, count in (("train", 8), ("val", 3)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (12, 12, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.setattr(run_image_classification_hwbp, "HighwayTrainer", RecordingTrainer)
    out = tmp_path / "out"
    data = ["--train_dir", str(tmp_path / "images" / "train"), "--validation_dir", str(tmp_path / "images" / "val")]
    metrics = _vit(out, *data, "--cache_dir", str(tmp_path / "cache"), "--max_train_samples", "6", "--max_steps", "2")
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_samples"] == 6
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "cat", "1": "dog"}
    # imagefolder lists the cats first: the first 6 rows are all cats, a shuffled subset has both classes.
    assert len(RecordingTrainer.seen_labels) == 6 and set(RecordingTrainer.seen_labels) == {0, 1}


TINY_IMAGE_MODELS = {
    "deit": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "intermediate_size=32",
    "dinov2": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "mlp_ratio=2",
    "resnet": "num_channels=1,embedding_size=8,hidden_sizes=[8,16],depths=[2,2],layer_type=basic",  # list values
    "beit": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "intermediate_size=32",
    "ijepa": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "intermediate_size=32",
    "vit_msn": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,num_attention_heads=2,"
    "intermediate_size=32",
    "swin": "image_size=8,patch_size=2,num_channels=1,embed_dim=8,depths=[2,2],num_heads=[2,2],window_size=2",
    "swinv2": "image_size=8,patch_size=2,num_channels=1,embed_dim=8,depths=[2,2],num_heads=[2,2],window_size=2",
    # stages of down-sampling models: the residual blocks inside each stage are the stacks (a stage's first layer
    # stays outside when it down-samples: depth 3 leaves 2 blocks)
    "convnext": "num_channels=1,num_stages=2,patch_size=2,hidden_sizes=[8,16],depths=[2,2]",
    "convnextv2": "num_channels=1,num_stages=2,patch_size=2,hidden_sizes=[8,16],depths=[2,2]",
    "bit": "num_channels=1,embedding_size=8,hidden_sizes=[8,16],depths=[3,3],num_groups=2",
    "regnet": "num_channels=1,embedding_size=8,hidden_sizes=[8,16],depths=[3,3],groups_width=8",
    "cvt": "num_channels=1,embed_dim=[8,8,16],depth=[2,2,3],num_heads=[1,1,2]",
    "pvt": "image_size=16,num_channels=1,num_encoder_blocks=2,depths=[2,2],sequence_reduction_ratios=[2,1],"
    "hidden_sizes=[8,16],patch_sizes=[4,2],strides=[4,2],num_attention_heads=[1,2],mlp_ratios=[2,2]",
    "poolformer": "num_channels=1,num_encoder_blocks=2,hidden_sizes=[8,16],depths=[2,2],patch_sizes=[3,3],"
    "strides=[2,2],padding=[1,1]",
    "hiera": "image_size=[8,8],num_channels=1,patch_size=[3,3],patch_stride=[2,2],patch_padding=[1,1],embed_dim=8,"
    "depths=[2,3],num_heads=[1,2],query_stride=[2,2],num_query_pool=1,masked_unit_size=[2,2]",
}


def test_every_advertised_image_model_type_trains_from_scratch(tmp_path):
    from hf_hwbp.examples import highway_model_types

    advertised = highway_model_types(run_image_classification_hwbp.MODEL_TYPES)
    assert set(advertised) == {"vit", *TINY_IMAGE_MODELS}  # vit: the default runs above
    steps = ["--max_steps", "1", "--max_train_samples", "16", "--max_eval_samples", "16", "--eval_strategy", "no"]
    for model_type, overrides in TINY_IMAGE_MODELS.items():
        out = tmp_path / model_type
        argv = ["--output_dir", str(out), *QUIET, "--model_type", model_type, "--config_overrides", overrides, *steps]
        assert math.isfinite(run_image_classification_hwbp.main(argv)["eval_loss"]), model_type
        assert json.loads((out / "config.json").read_text())["model_type"] == model_type


def test_image_recipe_follows_the_images(tmp_path, caplog):
    """Your images from scratch: the size of the first image, and RGB whatever the first image is: a folder that
    mixes grayscale and colour images (a grayscale one first) trains a 3-channel model on every image's colours."""
    from PIL import Image

    for label in ("cat", "dog"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        Image.fromarray(torch.randint(0, 256, (13, 13), dtype=torch.uint8).numpy(), mode="L").save(folder / "0.png")
        for i in range(1, 4):
            Image.fromarray(torch.randint(0, 256, (13, 13, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), *QUIET, "--train_dir", str(tmp_path / "images"), "--train_val_split", "0.25"]
    with caplog.at_level("WARNING"):
        run_image_classification_hwbp.main([*argv, "--max_steps", "1", "--cache_dir", str(tmp_path / "cache")])
    config = json.loads((out / "config.json").read_text())
    assert (config["num_channels"], config["image_size"]) == (3, 12)  # RGB; 13 x 13 -> 12 (patches of 4)
    assert "From scratch on your images: num_channels=3,image_size=12 (RGB: every image converted" in caplog.text
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]


def test_image_classification_without_scikit_learn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install hf_hwbp\[vision\]"):
        _vit(tmp_path)


def test_image_classification_lora_default_targets(tmp_path):
    metrics = _vit(tmp_path, "--use_lora", "--max_steps", "2")
    assert math.isfinite(metrics["eval_loss"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj"} and config["modules_to_save"] == ["classifier"]


def test_digits_split_is_deterministic_and_stratified():
    from hf_hwbp.examples.vision_data import digits_datasets

    a, b = digits_datasets(0.2), digits_datasets(0.2)
    assert len(a["train"]) + len(a["validation"]) == 1797
    assert a["validation"]["label"] == b["validation"]["label"] and a["train"]["label"] == b["train"]["label"]
    counts = torch.bincount(torch.tensor(a["validation"]["label"]), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of each class
    assert a["train"].features["label"].names == [str(i) for i in range(10)]
    image = a["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
