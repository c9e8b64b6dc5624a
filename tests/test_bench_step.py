"""benchmarks/bench_step.py runs end to end and writes its table (a smoke run: tiny batch, one round)."""

from __future__ import annotations

import importlib
import json

import pytest


def _load():
    return importlib.import_module("benchmarks.bench_step")


def test_bench_step_smoke(tmp_path):
    bench = _load()
    rows = bench.main(
        [
            "--models",
            "gpt2",
            "--ks",
            "0",
            "1",
            "--rounds",
            "1",
            "--batch_size",
            "1",
            "--seq_len",
            "8",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert [r["method"] for r in rows] == ["backprop", "k=0", "k=1"]
    assert all(r["step_s"] > 0 and r["peak_mib"] >= 0 for r in rows)
    saved = json.loads((tmp_path / "bench_step.json").read_text())
    assert len(saved["rows"]) == 3
    assert "| gpt2 (L=8) | k=1 |" in (tmp_path / "bench_step.md").read_text()


def test_bench_step_rejects_negative_k(tmp_path):
    with pytest.raises(SystemExit):
        _load().main(["--ks", "-1", "--output_dir", str(tmp_path)])
