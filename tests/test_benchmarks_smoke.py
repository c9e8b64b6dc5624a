"""Tiny --smoke runs of benchmarks/bench_fidelity.py and benchmarks/bench_training.py: outputs written and sane."""

from __future__ import annotations

import importlib
import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_bench_fidelity_smoke(tmp_path):
    bench = _load("bench_fidelity")
    records = bench.main(["--smoke", "--models", "gpt2", "vit", "--output_dir", str(tmp_path)])
    for name in ("fidelity.jsonl", "fidelity.json", "fidelity.md", "fidelity_vs_k.png", "per_block.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert {(r["model"], r["depth"], r["state"]) for r in records} == {
        (m, d, s) for m in ("gpt2", "vit") for d in (2, 3) for s in ("init", "trained")
    }
    for r in records:
        ks = [x["k"] for x in r["results"]]
        assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == r["depth"]  # k > L skipped, k = L kept
        exact = r["results"][-1]
        assert exact["cosine"] > 1 - 1e-9 and exact["rel_error"] < 1e-9  # float64: exact at k = L
        assert all(c > 1 - 1e-9 for c in exact["per_block_cosine"])
        assert len(exact["per_block_cosine"]) == r["depth"]
        # k = 0 is an approximation; the top block is always exact (its delta is d for every k)
        assert r["results"][0]["rel_error"] > 1e-6
        assert all(x["per_block_cosine"][-1] > 1 - 1e-9 for x in r["results"])
        assert all(-1 <= x["cosine"] <= 1 + 1e-12 and math.isfinite(x["rel_error"]) for x in r["results"])
    assert "k=L" in (tmp_path / "fidelity.md").read_text()


def test_bench_training_smoke(tmp_path):
    bench = _load("bench_training")
    summary = bench.main(
        [
            "--smoke",
            "--tasks",
            "gpt2",
            "vit",
            "--methods",
            "backprop",
            "k0",
            "k1",
            "--timing_rounds",
            "1",
            "--timing_steps",
            "1",
            "--output_dir",
            str(tmp_path),
        ]
    )
    outputs = ("runs.jsonl", "timing.jsonl", "machine.jsonl", "summary.json", "summary.md")
    outputs += ("loss_curves.png", "gaps.png")
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0, name
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {(r["task"], r["method"]) for r in runs} == {
        (t, m) for t in ("gpt2", "vit") for m in ("backprop", "k0", "k1")
    }
    for r in runs:
        assert math.isfinite(r["final_val_loss"]) and r["median_step_s"] > 0
        assert [p["step"] for p in r["curve"]] == [0, 3, 6]
    # same init and same data for every method: identical initial validation loss
    for task in ("gpt2", "vit"):
        initial = {r["initial_val_loss"] for r in runs if r["task"] == task}
        assert len(initial) == 1
        rows = summary["tasks"][task]["methods"]
        assert rows["backprop"]["gap_pct"]["mean"] == 0.0
        assert rows["backprop"]["cpu_step_ratio"]["mean"] == 1.0
        assert "interleaved_ratio" in rows["k1"]
    assert summary["tasks"]["vit"]["methods"]["k0"]["final_val_acc"]["n"] == 1
    # --resume skips what is done (nothing new written), and the summary can be rebuilt alone
    before = (tmp_path / "runs.jsonl").read_text()
    bench.main(["--smoke", "--tasks", "vit", "--methods", "k0", "--resume", "--output_dir", str(tmp_path)])
    assert (tmp_path / "runs.jsonl").read_text() == before
    assert bench.main(["--summarize_only", "--output_dir", str(tmp_path)])["tasks"].keys() == {"gpt2", "vit"}


# ----- gradient policies of the quality benchmarks (benchmarks/_grad_policy.py) -----------------------------------
def _policy():
    return _load("_grad_policy"), _load("_bench_common")


def _tiny_lm(common, name: str = "gpt2"):
    import torch

    model = common.build_model(name, 3, hidden=16, heads=2, vocab_size=50, block_size=8, seed=0, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids, ids)


def _autograd_grads(model, batch, common, k=None):
    """Gradients of a fresh copy of ``model`` (exact autograd, or Highway-BP(k) through hf_hwbp.patch_model)."""
    import copy

    import hf_hwbp

    clone = copy.deepcopy(model)
    if k is not None:
        hf_hwbp.patch_model(clone, k)
    common.loss_of(clone, batch).backward()
    return {n: p.grad.clone() for n, p in clone.named_parameters()}


def test_parse_method_and_groups():
    policy, common = _policy()
    m = policy.parse_method("k2_exact_input")
    assert (m.k, m.base, m.swap_groups, m.hybrid) == (2, "highway", ("tok_emb", "pos_emb"), True)
    assert policy.parse_method("backprop").needs_highway is False
    assert policy.parse_method("backprop_noise2").noise == "matched"
    assert policy.parse_method("backprop_noise@0.05").noise_rel == 0.05
    assert policy.parse_method("k1_warm50").warm_steps == 50 and not policy.parse_method("k1_warm50").hybrid
    assert policy.parse_method("k2_exact_input").library_cost_proxy() == "k3"
    auto = policy.parse_method("auto_tol1e-3")
    assert (auto.tol, auto.base, auto.k >= 1000) == (1e-3, "highway", True)
    with pytest.raises(ValueError, match="must be > 0"):
        policy.parse_method("auto_tol0")
    for bad in ("k", "kx", "backprop_hw_pos", "k2_exact", "sgd", "auto_tol"):
        with pytest.raises(ValueError, match="unknown method"):
            policy.parse_method(bad)
    model, _ = _tiny_lm(common)
    groups = {n: policy.group_of(n) for n, _ in model.named_parameters()}
    assert groups["transformer.wte.weight"] == "tok_emb" and groups["transformer.wpe.weight"] == "pos_emb"
    assert groups["transformer.h.2.mlp.c_fc.weight"] == "block_2" and groups["transformer.ln_f.weight"] == "head"
    llama, _ = _tiny_lm(common, "llama")
    llama_groups = {policy.group_of(n) for n, _ in llama.named_parameters()}
    assert llama_groups == {"tok_emb", "block_0", "block_1", "block_2", "head"}  # RoPE: no position embedding


def test_group_fidelity_known_vectors():
    import torch

    policy, _ = _policy()
    names = ["transformer.wpe.weight", "transformer.h.0.w"]
    highway = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0])]
    exact = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    report = policy.group_fidelity(names, highway, exact)
    assert report["pos_emb"]["cosine"] == pytest.approx(2**-0.5)
    assert report["pos_emb"]["norm_ratio"] == pytest.approx(2**0.5)
    assert report["pos_emb"]["rel_error"] == pytest.approx(1.0)
    assert report["block_0"] == {"cosine": pytest.approx(1.0), "norm_ratio": pytest.approx(1.0), "rel_error": 0.0}
    # all: <h, e> = 1 + 9, |h|^2 = 2 + 9, |e|^2 = 1 + 9
    assert report["all"]["cosine"] == pytest.approx(10 / (11 * 10) ** 0.5)


def test_gradient_step_mixes_the_two_gradients_per_group():
    import copy

    policy, common = _policy()
    model, batch = _tiny_lm(common)
    exact = _autograd_grads(model, batch, common)
    highway = _autograd_grads(model, batch, common, k=1)
    assert not torch_equal(exact["transformer.wpe.weight"], highway["transformer.wpe.weight"])

    def applied(method: str, monitor: bool = False):
        spec = policy.parse_method(method)
        clone = policy.prepare_model(copy.deepcopy(model), spec)
        stepper = policy.GradientStep(clone, spec, seed=0)
        _, report = stepper.step(lambda m: common.loss_of(m, batch), monitor=monitor)
        applied.iterations = stepper.iterations
        return {n: p.grad for n, p in clone.named_parameters()}, report

    grads, report = applied("k1_exact_input", monitor=True)
    for name, g in grads.items():
        expected = exact[name] if policy.group_of(name) in policy.INPUT_GROUPS else highway[name]
        assert torch_close(g, expected), name
    assert report["pos_emb"]["cosine"] < 1 - 1e-6 and report["block_2"]["cosine"] > 1 - 1e-12  # top block exact
    grads, _ = applied("backprop_hw1_pos")
    for name, g in grads.items():
        assert torch_close(g, highway[name] if policy.group_of(name) == "pos_emb" else exact[name]), name
    grads, _ = applied("backprop_noise1")  # exact + a random error with the norm of k1's error, per tensor
    for name, g in grads.items():
        err = (g - exact[name]).norm().item()
        assert err == pytest.approx((highway[name] - exact[name]).norm().item(), rel=1e-9, abs=1e-12), name
    assert not torch_close(grads["transformer.wpe.weight"], highway["transformer.wpe.weight"])
    grads, _ = applied("k1_warm5")  # step 0 < 5 warm-up steps: exact backprop
    assert all(torch_close(g, exact[n]) for n, g in grads.items())
    assert applied.iterations == []  # no Highway pass ran
    grads, _ = applied("auto_tol1e-30")  # the adaptive stop never triggers: all 3 iterations, exact backprop
    assert applied.iterations == [3] and all(torch_close(g, exact[n]) for n, g in grads.items())
    applied("auto_tol0.5")  # a loose tolerance stops early
    assert 1 <= applied.iterations[0] < 3


def torch_close(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_bench_training_clips_gradients(tmp_path):
    """A set-up's max_grad_norm reaches the optimizer: clipped to 1e-12, AdamW's steps (g / (|g| + eps)) vanish."""
    bench = _load("bench_training")
    args = ["--smoke", "--tasks", "gpt2", "--methods", "backprop", "k1", "--steps", "4", "--eval_every", "4"]
    clipped = bench.main(args + ["--max_grad_norm", "1e-12", "--output_dir", str(tmp_path / "clipped")])
    free = bench.main(args + ["--max_grad_norm", "0", "--output_dir", str(tmp_path / "free")])
    for summary in (clipped, free):
        assert summary["tasks"]["gpt2"]["hparams"]["max_grad_norm"] in (1e-12, 0)
    runs = {
        name: [json.loads(line) for line in (tmp_path / name / "runs.jsonl").read_text().splitlines()]
        for name in ("clipped", "free")
    }
    for r in runs["clipped"]:
        assert abs(r["final_val_loss"] - r["initial_val_loss"]) < 1e-3
    for r in runs["free"]:
        assert r["initial_val_loss"] - r["final_val_loss"] > 1e-2


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_paired_stats_known_inputs():
    bench = _load("bench_training")
    stats = bench.paired_stats({0: 1.1, 1: 0.9, 3: 7.0}, {0: 1.0, 1: 1.0, 2: 5.0})
    assert stats["by_seed"] == {0: pytest.approx(10.0), 1: pytest.approx(-10.0)}  # seeds 2, 3 unpaired
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(0.0) and stats["std"] == pytest.approx(200**0.5)
    half = 12.7062047 * 200**0.5 / 2**0.5  # Student t(0.975, df=1)
    assert stats["ci95"] == [pytest.approx(-half, rel=1e-4), pytest.approx(half, rel=1e-4)]
    absolute = bench.paired_stats({0: 95.0, 1: 97.5}, {0: 96.0, 1: 96.0}, relative=False)
    assert absolute["by_seed"] == {0: -1.0, 1: 1.5} and absolute["min"] == -1.0
    assert bench.target_pct("k1") == 3.0 and bench.target_pct("k2_exact_input") == 1.0
    assert bench.target_pct("backprop_noise2") is None


def test_diagnose_k_stall_smoke(tmp_path):
    diag = _load("diagnose_k_stall")
    curve = [{"step": 0, "val_loss": 7.0}, {"step": 10, "val_loss": 6.2}, {"step": 20, "val_loss": 5.4}]
    assert diag.steps_to(curve, 6.0) == 20 and diag.steps_to(curve, 5.0) is None and diag.loss_at(curve, 10) == 6.2
    assert diag._stalled({"delay_to_5.5": 30}) and not diag._stalled({"delay_to_5.5": 20})
    assert diag._stalled({"delay_to_5.5": None, "steps_to_5.5": None, "backprop_reached": True})
    assert not diag._stalled({"delay_to_5.5": None, "steps_to_5.5": None, "backprop_reached": False})
    summary = diag.main(
        ["--smoke", "--setups", "gpt2", "--methods", "backprop", "k1_exact_pos", "--seeds", "0"]
        + ["--max_steps", "4", "--eval_every", "2", "--monitor_every", "2", "--output_dir", str(tmp_path)]
    )
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["method"], r["steps_run"]) for r in runs] == [("backprop", 4), ("k1_exact_pos", 4)]
    assert runs[0]["fidelity"] == []  # no Highway pass to compare
    assert [e["step"] for e in runs[1]["fidelity"]] == [1, 3]
    assert {"all", "tok_emb", "pos_emb", "block_0", "block_1", "head"} <= runs[1]["fidelity"][0].keys()
    assert runs[1]["fidelity"][0]["block_1"]["cosine"] > 1 - 1e-6  # the top block's gradient is exact at any k
    row = summary["gpt2"]["methods"]["k1_exact_pos"]
    assert row["per_seed"][0]["loss_at_end"] == pytest.approx(runs[1]["final_val_loss"])
    assert summary["gpt2"]["methods"]["backprop"]["gap_at_end_pct"]["mean"] == 0.0
    for name in ("summary.md", "summary.json", "curves_gpt2.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bench_finetune_smoke(tmp_path):
    finetune = _load("bench_finetune")
    docs = finetune.stdlib_docstring_documents(max_files=5)
    assert docs and all(isinstance(text, str) and text for text in docs.values())
    argv = ["--smoke", "--models", "gpt2", "--modes", "lora", "--methods", "backprop", "k1", "--seeds", "0"]
    argv += ["--pretrain_steps", "2", "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path)]
    summary = finetune.main(argv)
    (checkpoint,) = (tmp_path / "ckpt").iterdir()
    written = checkpoint.stat().st_mtime_ns
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in runs] == ["backprop", "k1"]
    assert runs[0]["initial_val_loss"] == runs[1]["initial_val_loss"]  # same checkpoint, same adapters' init
    assert all(0 < r["trainable_params"] < r["num_params"] / 5 for r in runs)  # LoRA adapters only
    assert {g for e in runs[1]["fidelity"] for g in e} == {"step", "all", "block_0", "block_1"}  # no embeddings
    assert summary["tasks"]["gpt2_lora"]["methods"]["k1"]["gap_pct"]["n"] == 1
    finetune.main(argv + ["--resume"])  # the checkpoint is reused, nothing is re-run
    assert checkpoint.stat().st_mtime_ns == written
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2


def test_quality_report_judges_classification_by_accuracy():
    """ViT-like set-ups: the target and the noise floor are in accuracy points; language models: in loss %."""
    report = _load("quality_report")

    def row(gap_max, acc_min=None, loss_met=None, acc_met=None):
        acc = {"n": 0} if acc_min is None else {"n": 5, "mean": acc_min / 2, "min": acc_min}
        return {
            "gap_pct": {"n": 5, "mean": gap_max / 2, "max": gap_max},
            "acc_gap_points": acc,
            "target_pct": None if acc_min is not None else 1.0,
            "meets_target": loss_met,
            "meets_acc_target": acc_met,
            "interleaved_ratio": 1.7,
            "cpu_step_ratio": {"mean": 1.6},
            "reached_backprop_final": "5/5",
            "steps_to_backprop_final": {"mean": 290},
            "fidelity": {"all": 0.99},
        }

    summary = {
        "tasks": {
            "lm": {"methods": {"k2": row(0.2, loss_met=True)}, "noise_floor_pct": 0.34},
            "vit": {
                "methods": {"k2": row(13.4, acc_min=-0.83, acc_met=True), "k1": row(40.6, -1.67, acc_met=False)},
                "noise_floor_pct": 44.3,
                "noise_floor_acc_points": 1.67,
            },
        }
    }
    lines = report.markdown(report.rows_of(summary)).splitlines()[2:]
    lm, vit_k2, vit_k1 = lines
    assert "yes (<= 1 %)" in lm and "±0.34 %" in lm
    assert "accuracy: yes (>= -1 point)" in vit_k2 and "±1.67 pt" in vit_k2 and "44.30" not in vit_k2
    assert "accuracy: **no** (>= -1 point)" in vit_k1
