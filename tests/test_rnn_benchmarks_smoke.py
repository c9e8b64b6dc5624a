"""Tiny runs of benchmarks/bench_rnn.py and benchmarks/bench_rnn_quality.py: outputs written and sane."""

from __future__ import annotations

import importlib
import json
import math

import pytest


def _load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def test_bench_rnn_quality_smoke(tmp_path):
    pytest.importorskip("sklearn")
    bench = _load("bench_rnn_quality")
    common = ["--output_dir", str(tmp_path), "--hidden_size", "8", "--batch_size", "4", "--seeds", "0"]
    summary = bench.main(
        ["--tasks", "digits", "charlm", "--methods", "backprop", "k1", "--max_steps", "4", "--eval_every", "2"] + common
    )
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    expected = {(task, method) for task in ("digits", "charlm") for method in ("backprop", "k1")}
    assert {(r["task"], r["method"]) for r in runs} == expected
    for r in runs:
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert math.isfinite(r["final_val"])
    assert summary["digits"]["backprop"]["gap"] == [0.0]
    assert 0 <= summary["digits"]["k1"]["final"][0] <= 100
    # the step-time mode, then a summary that converts steps into time
    bench.main(["--tasks", "digits", "--methods", "backprop", "k1", "--timing_rounds", "1"] + common)
    timing = json.loads((tmp_path / "timing.jsonl").read_text().splitlines()[-1])
    assert set(timing["median_step_s"]) == {"backprop", "k1"} and all(v > 0 for v in timing["median_step_s"].values())
    summary = bench.main(["--summarize_only", "--output_dir", str(tmp_path)])
    assert summary["digits"]["k1"]["step_s"] == timing["median_step_s"]["k1"]
    assert "time to backprop's final" in (tmp_path / "summary.md").read_text()
    # --resume skips what is done
    before = (tmp_path / "runs.jsonl").read_text()
    bench.main(["--tasks", "digits", "--methods", "k1", "--max_steps", "4", "--eval_every", "2", "--resume"] + common)
    assert (tmp_path / "runs.jsonl").read_text() == before


def test_bench_rnn_smoke(tmp_path):
    bench = _load("bench_rnn")
    args = ["--seq_lens", "6", "--batch_sizes", "2", "--hidden_sizes", "4", "--ks", "6", "--rounds", "1"]
    records = bench.main(args + ["--threads", "1", "--output_dir", str(tmp_path)])
    (record,) = records
    assert set(record["median_s"]) == {"nn.GRU", "k=6"} and all(v > 0 for v in record["median_s"].values())
    assert set(record["peak_mib"]) == set(record["median_s"])
    check = json.loads((tmp_path / "checks.jsonl").read_text())["check"]
    assert check["torch.float64"] < 1e-12 and check["torch.float32"] < 1e-4  # HighwayGRU(k = T) is exact
    table = (tmp_path / "summary.md").read_text()
    assert "| 1 | 6 | 2 | 4 | k=6 |" in table
    # a configuration measured twice shows one row (the quieter measurement)
    bench.main(args + ["--threads", "1", "--memory", "false", "--check", "false", "--output_dir", str(tmp_path)])
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "summary.md").read_text().count("| 1 | 6 | 2 | 4 | k=6 |") == 1


def test_bench_rnn_lstm_smoke(tmp_path):
    bench = _load("bench_rnn")
    args = ["--cell", "lstm", "--seq_lens", "6", "--batch_sizes", "2", "--hidden_sizes", "4", "--ks", "1", "6"]
    # no memory probes here (each is a fresh process): the GRU smoke test covers them
    (record,) = bench.main(
        args + ["--rounds", "1", "--threads", "1", "--memory", "false", "--output_dir", str(tmp_path)]
    )
    assert record["cell"] == "lstm" and set(record["median_s"]) == {"nn.LSTM", "k=1", "k=6"}
    check = json.loads((tmp_path / "checks.jsonl").read_text())["check"]
    assert check["torch.float64"] < 1e-12 and check["torch.float32"] < 1e-4  # HighwayLSTM(k = T) is exact
    table = (tmp_path / "summary.md").read_text()
    assert "ratio to nn.LSTM" in table and "| 1 | 6 | 2 | 4 | k=1 |" in table


def test_bench_rnn_quality_lstm_smoke(tmp_path):
    bench = _load("bench_rnn_quality")
    common = ["--cell", "lstm", "--output_dir", str(tmp_path), "--hidden_size", "8", "--batch_size", "4"]
    summary = bench.main(
        ["--tasks", "charlm", "--methods", "backprop", "k1", "--max_steps", "2", "--eval_every", "2", "--seeds", "0"]
        + common
    )
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {(r["cell"], r["method"]) for r in runs} == {("lstm", "backprop"), ("lstm", "k1")}
    assert math.isfinite(summary["charlm"]["k1"]["final"][0])
    assert runs[0]["curve"][-1]["val"] != runs[1]["curve"][-1]["val"]  # k1 really trained with Highway-BP


def test_bench_rnn_map_grid_smoke(tmp_path):
    """--grid quick with its sizes overridden: both cells, k = 1 and 2, 1 and 2 threads, the map table and JSON."""
    bench = _load("bench_rnn")
    args = ["--grid", "quick", "--seq_lens", "6", "--batch_sizes", "2", "--hidden_sizes", "4", "--rounds", "1"]
    records = bench.main(args + ["--memory", "false", "--clock", "cpu", "--output_dir", str(tmp_path)])
    assert sorted((r["cell"], r["threads"]) for r in records) == [("gru", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)]
    assert all(r["clock"] == "cpu" and len(r["loadavg_before"]) == 3 for r in records)
    assert {frozenset(r["median_s"]) for r in records} == {
        frozenset({"nn.GRU", "k=1", "k=2"}),
        frozenset({"nn.LSTM", "k=1", "k=2"}),
    }
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["threads"], r["T"], r["B"], r["H"]) for r in summary] == [(1, 6, 2, 4), (2, 6, 2, 4)]
    for row in summary:
        assert {"gru k=1", "gru k=2", "lstm k=1", "lstm k=2", "nn.GRU ms", "nn.LSTM ms"} <= set(row)
        assert all(row[key] > 0 for key in ("gru k=1", "lstm k=2"))
    table = (tmp_path / "summary.md").read_text()
    assert "## Map" in table and "## nn.GRU" in table and "## nn.LSTM" in table
    map_section = table[table.index("## Map") :]
    assert map_section.count("| 1 | 6 | 2 | 4 | ") == 1 and map_section.count("| 2 | 6 | 2 | 4 | ") == 1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_profile_rnn_smoke(tmp_path, cell):
    profile = _load("profile_rnn")
    output = tmp_path / "profile.jsonl"
    args = ["--cell", cell, "--seq_len", "6", "--batch", "2", "--hidden", "4", "--rounds", "1", "--clock", "cpu"]
    record = profile.main(args + ["--threads", "1", "--output", str(output)])
    assert json.loads(output.read_text())["parts_s"] == record["parts_s"]
    assert "Highway step (forward + backward)" in record["parts_s"] and "parameter + input grads" in record["parts_s"]
    assert all(v >= 0 for v in record["parts_s"].values()) and record["machine"]["P_ms"] > 0
