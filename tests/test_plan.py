"""The planner (hf_hwbp.plan): end to end on a tiny model, its rows against a direct measurement and the simulator,
both call forms, the command line's one-line errors, the quality evidence, the collective model and the files.

Timing is a measurement, not a test: the measured ratios are only checked against an independent measurement of
the same steps within a generous factor (never a wall-clock bound).
"""

from __future__ import annotations

import json
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import hf_hwbp
from hf_hwbp.parallel.simulate import StackCosts, best_backprop, predict
from hf_hwbp.planner import recommended_k
from hf_hwbp.planner.cli import main
from hf_hwbp.planner.predict import CollectiveFit, Link, ddp_comm_seconds, fsdp2_comm_seconds

ROOT = Path(__file__).parent.parent
BATCH, SEQ = 4, 16
# One thread: two-thread steps on a shared 2-core machine are oversubscribed (10x slower and erratic).
THREADS = 1


def tiny_gpt2(layers: int = 2) -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tf.GPT2Config(
        vocab_size=64, n_positions=SEQ, n_embd=32, n_layer=layers, n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return tf.GPT2LMHeadModel(config).train()


def tiny_batch() -> dict:
    ids = torch.randint(0, 64, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    torch.set_num_threads(THREADS)
    model, batch = tiny_gpt2(), tiny_batch()
    hf_hwbp.patch_model(model, k=3)  # the planner must leave it as it found it
    out = tmp_path_factory.mktemp("plan")
    hooks = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    result = hf_hwbp.plan(
        model, batch, ks=[0], backends=["sequential", "batched"], rounds=3, progress=False, threads=THREADS,
        output_dir=out,
    )  # fmt: skip
    left = {
        "k": hf_hwbp.get_highway_config(model).k if hf_hwbp.is_patched(model) else None,
        "training": model.training,
        "grads": sum(p.grad is not None for p in model.parameters()),
        # the batched backend's capture hooks are gone again (they would also make the model unpicklable)
        "hooks": {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks,
        "picklable": len(pickle.dumps(model)) > 0,
    }
    return model, batch, result, out, left


def _row(result, mode: str, source: str):
    return next(r for r in result.rows if r.mode == mode and r.source == source)


def _direct_ratio(model, batch, k: int, rounds: int = 5) -> float:
    """Highway-BP(k)'s step over backprop's, timed here without the planner (interleaved, medians)."""

    def step() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(**batch).loss.backward()
        return time.perf_counter() - start

    backprop, highway = [], []
    for _ in range(rounds + 1):
        hf_hwbp.unpatch_model(model)
        backprop.append(step())
        hf_hwbp.patch_model(model, k=k)
        highway.append(step())
    hf_hwbp.unpatch_model(model)
    return statistics.median(highway[1:]) / statistics.median(backprop[1:])


def test_measured_ratios_agree_with_a_direct_measurement(planned):
    model, batch, result, _, _ = planned
    assert result.ks == [0, 1]  # k = 1 added: the quality evidence's k for GPT-2 from scratch
    row = _row(result, "one device, sequential backend", "measured")
    direct = _direct_ratio(model, batch, k=1)
    assert 0.4 < row.ratio(1) / direct < 2.5, (row.ratio(1), direct)
    assert row.backprop_s > 0 and all(row.highway_s[k] > 0 for k in (0, 1))
    assert row.peak_mib["backprop"] is None or row.peak_mib["backprop"] >= 0


def test_predicted_rows_are_the_simulators_output_for_the_measured_costs(planned):
    _, _, result, _, _ = planned
    costs = StackCosts.from_json(result.costs["one device"])
    assert sorted(costs.by_batch) == sorted({BATCH, BATCH // 2, BATCH // 4})  # the map's micro-batches too
    row = _row(result, "one device", "predicted")
    assert row.backprop_s == pytest.approx(predict("gpipe", costs, 1, 1, batch=BATCH, overhead=0.0), rel=1e-12)
    for k in (0, 1):  # patch_model's engine: its parameter VJPs in one final sweep (no fused final blocks)
        expected = predict("highway", costs, 1, 1, k, batch=BATCH, fuse=False)
        assert row.highway_s[k] == pytest.approx(expected, rel=1e-12)
    measured = _row(result, "one device, sequential backend", "measured")
    errors = {v["method"]: v["error"] for v in result.validation}
    assert errors["backprop"] == pytest.approx(row.backprop_s / measured.backprop_s - 1)
    for cell in result.speedup_map:  # the map: the simulator's best schedule and Highway step per S and M
        name, seconds = best_backprop(costs, cell["S"], cell["M"], batch=BATCH)
        assert (cell["best_backprop"], cell["best_backprop_s"]) == (name, pytest.approx(seconds))
        highway = predict("highway", costs, cell["S"], cell["M"], 1, batch=BATCH)
        assert cell["speedup"]["1"] == pytest.approx(seconds / highway)
    assert {(c["S"], c["M"]) for c in result.speedup_map} == {(2, 1), (2, 2), (2, 4)}  # S <= 2 blocks, M <= 4


def test_the_model_is_left_as_it_was_found(planned):
    *_, left = planned
    assert left == {"k": 3, "training": True, "grads": 0, "hooks": True, "picklable": True}


def test_table_recommendation_and_files(planned):
    _, _, result, out, _ = planned
    text = str(result)
    assert "| one device, sequential backend | measured |" in text and "| one device | predicted |" in text
    assert "Fastest here: one device" in result.recommendation
    assert "use k = 1 (GPT-2 from scratch" in result.recommendation
    saved = json.loads((out / "plan.json").read_text())
    assert saved["recommendation"] == result.recommendation
    assert [r["mode"] for r in saved["rows"]] == [r.mode for r in result.rows]
    assert "## Predictions against measurements" in (out / "plan.md").read_text()
    assert (out / "plan_map.png").stat().st_size > 0


def test_without_matplotlib_the_plot_is_skipped_with_a_note(planned, tmp_path, monkeypatch):
    _, _, result, _, _ = planned
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    written = result.save(tmp_path)
    assert sorted(p.name for p in written) == ["plan.json", "plan.md"]
    assert any("matplotlib is not installed" in n for n in result.notes)
    assert "hf_hwbp[plots]" in (tmp_path / "plan.md").read_text()


def test_function_and_module_forms_are_one_planner(monkeypatch):
    # As in a fresh interpreter: before the submodule is imported, `hf_hwbp.plan` is the function; importing it
    # (python -m hf_hwbp.plan does) rebinds the attribute to the module, which forwards calls to the same function.
    import importlib

    import hf_hwbp.planner

    monkeypatch.delitem(sys.modules, "hf_hwbp.plan", raising=False)
    if "plan" in vars(hf_hwbp):  # set by an earlier import of the submodule
        monkeypatch.delattr(hf_hwbp, "plan")
    assert hf_hwbp.plan is hf_hwbp.planner.plan
    module = importlib.import_module("hf_hwbp.plan")
    assert hf_hwbp.plan is module and callable(module)
    with pytest.raises(ValueError, match="ks must be ints >= 0"):
        hf_hwbp.plan(None, {}, ks=[-1])
    from hf_hwbp import plan

    assert plan is module


def test_command_line_end_to_end(tmp_path):
    command = [
        sys.executable, "-m", "hf_hwbp.plan", "--model_type", "llama", "--config_overrides",
        "num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=4,num_key_value_heads=2,"
        "vocab_size=64", "--batch_size", "4", "--seq_len", "16", "--ks", "0", "--backend", "sequential", "batched",
        "--rounds", "2", "--threads", "1", "--map_microbatches", "1", "--progress", "false", "--output_dir",
        str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| one device, batched backend | measured |" in done.stdout
    assert "use k = 0 (Llama from scratch" in done.stdout  # the evidence's k for Llama: nothing added
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["ks"] == [0] and saved["setup"]["command"].startswith("python -m hf_hwbp.plan --model_type llama")
    assert (tmp_path / "plan_map.png").is_file()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--ks", "-1"], "--ks must be >= 0"),
        (["--batch_size", "x"], "invalid int value"),
        (["--backend", "fast"], "invalid choice"),
        (["--microbatches", "16", "--batch_size", "8"], "must not exceed --batch_size"),
        (["--model_type", "no_such_type"], "Unknown --model_type"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m hf_hwbp.plan: error:") and says in err
    assert "Traceback" not in err


def test_model_type_alone_builds_the_scripts_small_recipe():
    from hf_hwbp.planner.cli import build_model, example_batch, parse_args

    args = parse_args(["--model_type", "gpt2", "--batch_size", "2", "--seq_len", "8"])
    model, task = build_model(args)
    config = model.config
    assert (task, config.n_layer, config.n_embd, config.n_head, config.vocab_size) == ("causal-LM", 4, 128, 4, 2048)
    batch = example_batch(model, task, args)
    assert batch["input_ids"].shape == (2, 8) and torch.equal(batch["input_ids"], batch["labels"])


class NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, labels=None):
        return self.linear(x)


def test_a_model_patch_model_refuses_is_refused_before_timing():
    with pytest.raises(hf_hwbp.UnsupportedModelError):
        hf_hwbp.plan(NoStack(), {"x": torch.randn(2, 4)}, progress=False)


def test_the_command_line_prints_a_refusal_in_one_line(monkeypatch, capsys):
    import hf_hwbp.planner.cli as cli

    monkeypatch.setattr(cli, "_build", lambda args: (NoStack(), {"x": torch.randn(2, 4)}))
    assert main(["--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UnsupportedModelError" in err and "Traceback" not in err


def test_recommended_k_follows_the_quality_evidence():
    assert recommended_k("gpt2").k == 1
    assert recommended_k("llama").k == 0
    assert recommended_k("vit").k == 2
    assert recommended_k("gpt2", "fine_tuning").k == 0
    unknown = recommended_k("bert")
    assert unknown.k == 2 and not unknown.measured and "no quality measurement" in unknown.why
    with pytest.raises(ValueError, match="regime"):
        recommended_k("gpt2", "pretraining")


def test_collectives_are_modelled_per_bucket_and_per_unit():
    link = Link(2, "gloo", 1e-4, 1e-9, all_reduce=CollectiveFit(1e-3, 2e-9), all_gather=CollectiveFit(5e-4, 1e-9))
    mib = 2**20
    # DDP: buckets of 1 MiB, then 25 MiB: 30 MiB of gradients are 3 all-reduces
    assert ddp_comm_seconds(30 * mib, link) == pytest.approx(3 * 1e-3 + 30 * mib * 2e-9)
    # FSDP2, resharding after the forward: 2 all-gathers and 1 reduce-scatter per unit
    assert fsdp2_comm_seconds([mib, 2 * mib], link) == pytest.approx(3 * (2 * 5e-4 + 3 * mib * 1e-9))
    assert fsdp2_comm_seconds([mib], link, reshard_after_forward=False) == pytest.approx(2 * (5e-4 + mib * 1e-9))
    fit = CollectiveFit.from_two((1000, 1e-3), (11000, 2e-3))
    assert (fit.latency, fit.seconds_per_byte) == (pytest.approx(0.9e-3), pytest.approx(1e-7))


def test_per_layer_costs_from_an_example_batch_of_images():
    from hf_hwbp.parallel.calibrate import measure_stack_costs

    torch.manual_seed(0)
    config = tf.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    model = tf.ViTForImageClassification(config).train()
    batch = {"pixel_values": torch.randn(4, 1, 8, 8), "labels": torch.tensor([0, 1, 2, 0])}
    costs = measure_stack_costs(model, [2, 4], reps=1, example=batch)
    assert costs.num_layers == 2 and costs.activation_bytes_per_sample == (4 + 1) * 16 * 4  # 4 patches + [CLS]
    assert all(getattr(costs.by_batch[b], kind) > 0 for b in (2, 4) for kind in ("f", "b", "v", "w", "head_f"))


def test_overheads_fitted_on_near_free_runs_are_recovered():
    from dataclasses import replace

    from hf_hwbp.parallel.simulate import WorkCosts
    from hf_hwbp.planner.predict import fit_overheads, predict_run

    work = WorkCosts(f=1e-3, b=2e-3, v=1.2e-3, w=1.8e-3, bi=1.2e-3, bw=0.8e-3, head_f=5e-4, head_b=1e-3, add=1e-5)
    costs = StackCosts("unit", 4, 1, 1024.0, {2: work, 4: work}, latency=1e-4)
    truth = replace(costs, task_overhead=6e-4, torch_task_overhead=1.3e-3)
    runs = [{"method": "highway", "k": k, "M": m} for k in (0, 1) for m in (1, 2)]
    runs += [{"method": s, "k": None, "M": m} for s in ("pipeline", "gpipe", "zbv") for m in (1, 2)]
    for run in runs:
        run["median_s"] = predict_run(run, truth, 2, 4)
    fitted = fit_overheads(runs, costs, 2, 4)
    assert fitted["hf_hwbp"] == pytest.approx(6e-4, rel=1e-6)
    assert fitted["torch"] == pytest.approx(1.3e-3, rel=1e-6)


def test_the_overhead_copy_keeps_type_and_depth_at_width_16():
    from hf_hwbp.planner.worker import near_free_batch, near_free_copy

    model = tiny_gpt2(layers=3)
    tiny = near_free_copy(model)
    assert type(tiny) is type(model) and tiny.config.n_layer == 3
    assert (tiny.config.n_embd, tiny.config.n_head, tiny.config.vocab_size) == (16, 2, 64)
    batch = near_free_batch(tiny, 4, torch.device("cpu"))
    assert batch["input_ids"].shape == (4, 8) and tiny(**batch).loss is not None
