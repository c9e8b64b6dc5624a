"""Tiny --smoke runs of scripts/bench_fidelity.py and scripts/bench_training.py: outputs written and sane."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_smoke_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    for name in ("runs.jsonl", "timing.jsonl", "machine.jsonl", "summary.json", "summary.md", "loss_curves.png"):
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
        assert rows["backprop"]["gap_to_backprop_pct"]["mean"] == 0.0
        assert rows["backprop"]["step_time_ratio"]["mean"] == 1.0
        assert "interleaved_ratio" in rows["k1"]
    assert summary["tasks"]["vit"]["methods"]["k0"]["final_val_acc"]["n"] == 1
    # --resume skips what is done (nothing new written), and the summary can be rebuilt alone
    before = (tmp_path / "runs.jsonl").read_text()
    bench.main(["--smoke", "--tasks", "vit", "--methods", "k0", "--resume", "--output_dir", str(tmp_path)])
    assert (tmp_path / "runs.jsonl").read_text() == before
    assert bench.main(["--summarize_only", "--output_dir", str(tmp_path)])["tasks"].keys() == {"gpt2", "vit"}
