"""The "which k for which goal" table: measured gap and step cost of each method in every benchmark set-up.

Reads the summaries written by benchmarks/bench_training.py (``results/quality/benchmark``) and
benchmarks/bench_finetune.py (``results/quality/finetune``) and writes ``<output>`` (markdown): per set-up and
method, the mean final-loss gap to backprop with the worst seed, whether the set-up's target (``target_pct``: the
largest final-loss gap that counts as "as good as backprop") holds on every seed, the noise floor,
the step-cost ratio to backprop (interleaved wall time where measured, else the runs' CPU time) and the steps needed
to reach backprop's final loss.

    python -m benchmarks.quality_report --summaries results/quality/benchmark results/quality/finetune \\
        --output results/quality/which_k.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(summary: dict) -> list[dict]:
    """One flat row per (set-up, method) of a bench_training / bench_finetune summary."""
    rows = []
    for task, data in summary["tasks"].items():
        for method, row in data["methods"].items():
            if method == "backprop":
                continue
            gap, acc = row["gap_pct"], row["acc_gap_points"]
            ratio = row.get("interleaved_ratio")
            rows.append(
                {
                    "setup": task,
                    "method": method,
                    "n": gap["n"],
                    "gap_mean": gap["mean"],
                    "gap_worst": gap["max"],
                    "acc_mean": acc["mean"] if acc["n"] else None,
                    "acc_worst": acc["min"] if acc["n"] else None,
                    "target": row["target_pct"],
                    "met": row["meets_target"],
                    "acc_met": row["meets_acc_target"],
                    "noise_floor": data["noise_floor_pct"],
                    "noise_floor_acc": data.get("noise_floor_acc_points"),
                    "step_ratio": ratio if ratio is not None else row["cpu_step_ratio"]["mean"],
                    "ratio_kind": "interleaved" if ratio is not None else "CPU",
                    "reached": row["reached_backprop_final"],
                    "steps_to": row["steps_to_backprop_final"]["mean"],
                    "fidelity_all": row.get("fidelity", {}).get("all"),
                }
            )
    return rows


def _floor(row: dict) -> str:
    """The noise floor in the unit of the set-up's target (accuracy points for classification)."""
    if row["acc_mean"] is not None and row["noise_floor_acc"] is not None:
        return f"±{row['noise_floor_acc']:.2f} pt"
    return "-" if row["noise_floor"] is None else f"±{row['noise_floor']:.2f} %"


def markdown(rows: list[dict]) -> str:
    header = (
        "| set-up | method | seeds | final-loss gap: mean (worst seed) | target met on every seed | noise floor |"
        " step cost vs backprop | reaches backprop's final loss | median gradient cosine |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        gap = "-" if r["gap_mean"] is None else f"{r['gap_mean']:+.2f} % ({r['gap_worst']:+.2f} %)"
        if r["acc_mean"] is not None:
            gap += f"; acc {r['acc_mean']:+.2f} pt ({r['acc_worst']:+.2f})"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        if r["target"] is not None:
            met = f"{met} (<= {r['target']:g} %)"
        if r["acc_met"] is not None:  # classification: the target is the accuracy (within 1 point)
            met = f"accuracy: {'yes' if r['acc_met'] else '**no**'} (>= -1 point)"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["setup"],
                    r["method"],
                    str(r["n"]),
                    gap,
                    met,
                    _floor(r),
                    "-" if r["step_ratio"] is None else f"{r['step_ratio']:.2f} ({r['ratio_kind']})",
                    f"{r['reached']}" + ("" if r["steps_to"] is None else f", step {r['steps_to']:.0f}"),
                    "-" if r["fidelity_all"] is None else f"{r['fidelity_all']:.4f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summaries", nargs="+", type=Path, default=[Path("results/quality/benchmark")])
    parser.add_argument("--output", type=Path, default=Path("results/quality/which_k.md"))
    args = parser.parse_args(argv)
    rows = []
    for folder in args.summaries:
        path = folder / "summary.json"
        if path.exists():
            rows += rows_of(json.loads(path.read_text()))
    text = markdown(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
