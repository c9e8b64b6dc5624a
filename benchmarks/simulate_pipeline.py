"""Where layer-parallel Highway-BP beats the best pipeline-backprop schedule: validate the simulator, then map.

    python -m benchmarks.simulate_pipeline --bench results/pipeline/bench_pipeline.json [--out results/pipeline]

1. Validation. ``benchmarks/bench_pipeline.py`` measured every method on 2 ranks and, at the start of the same run,
   the per-layer costs of each kind of work and the link (``costs`` in its JSON). This script recomputes every
   method's predicted step time from those costs alone (the simulator replays torch's per-rank order for the
   backprop schedules and list-schedules the Highway graph exactly as the runtime plans it) and tabulates
   predicted against measured, without and with the per-task overheads.
   The per-task overheads (what a task costs beyond its layers' work: Python dispatch, side inputs, posting
   messages; one value for ``hf_hwbp``'s runtime, one for torch's schedules, per model) come from a separate
   ``bench_pipeline.py`` run on a model whose layers cost almost nothing (``--overhead_bench``, default
   ``results/pipeline/bench_pipeline_overhead.json``): for each of its methods, the overhead per task at which
   the simulator reproduces its measured step time; the median over the methods of a runtime is used. Nothing
   in it is fitted to the runs being validated.
2. The map. Per-layer costs of a GPT-2-small-shaped stack (12 layers, hidden 768, seq 1024, vocab 50257) and of a
   Llama-1B-shaped stack (Llama 3.2 1B: 16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, seq 2048, vocab
   128256) are the measured tiny layers' costs scaled by the ratio of forward FLOPs per sample (layers, head and
   embeddings each by their own ratio; every kind of layer work by the same factor, so the measured ratios
   between forward, backward, input-VJP and weight-VJP are kept); message bytes scale with seq x hidden over the
   measured link. One sample per micro-batch. For S in {2, 4, 8, 16, 32}, M in {1, 2, 4, 8, 16} and k in
   {0, 1, 2}: the speed-up of Highway-BP(k) over the fastest backprop schedule torch can run there (GPipe, 1F1B,
   interleaved 1F1B, interleaved zero bubble, ZBV, DualPipeV). A stack of L layers has at most L stages (2S <= L
   for the two-stages-per-rank schedules); the same blocks at L = 64 (``deep``) fill the larger S.

Writes ``<out>/simulate_pipeline.{json,md}`` and ``<out>/simulate_pipeline_map.png``.

With ``--gpu_costs <bench_gpu out>/gpu_costs.json`` (per-layer costs of the same two shapes measured on a GPU by
``benchmarks/bench_gpu.py``) it maps those instead, with an assumed link (``--link_latency_us``,
``--link_gbps``; no validation: a 2-rank GPU measurement needs two GPUs), to ``<out>/simulate_pipeline_gpu.*``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from hf_hwbp.parallel.graph import BACKPROP_SCHEDULES
from hf_hwbp.parallel.simulate import StackCosts, best_backprop, fit_task_overhead, predict

DEFAULT_OVERHEAD_BENCH = "results/pipeline/bench_pipeline_overhead.json"

STAGES = (2, 4, 8, 16, 32)
MICROBATCHES = (1, 2, 4, 8, 16)
KS = (0, 1, 2)


# ----- FLOP ratios ---------------------------------------------------------------------------------------------------
def layer_flops(arch: str, hidden: int, seq: int, intermediate: int | None = None, kv_dim: int | None = None) -> float:
    """Forward FLOPs of one layer for one sample (a multiply-add counts 2)."""
    attention_core = 4 * seq * hidden  # scores and weighted sum, per token
    if arch == "gpt2":
        per_token = 2 * 12 * hidden * hidden + attention_core
    else:
        projections = 2 * hidden * hidden + 2 * hidden * kv_dim
        per_token = 2 * (projections + 3 * hidden * intermediate) + attention_core
    return per_token * seq


def head_flops(hidden: int, vocab: int, seq: int) -> float:
    return 2 * hidden * vocab * seq


TARGETS = {
    "gpt2": {
        "name": "GPT-2-small-shaped",
        "layers": 12,
        "flops": lambda: layer_flops("gpt2", 768, 1024),
        "head": lambda: head_flops(768, 50257, 1024),
        "tokens_x_hidden": 1024 * 768,
    },
    "llama": {
        "name": "Llama-1B-shaped",
        "layers": 16,
        "flops": lambda: layer_flops("llama", 2048, 2048, 8192, 512),
        "head": lambda: head_flops(2048, 128256, 2048),
        "tokens_x_hidden": 2048 * 2048,
    },
}


def measured_flops(arch: str, notes: dict, layers_hidden: int) -> tuple[float, float]:
    h, s, v = notes["hidden"], notes["seq_len"], notes["vocab"]
    if arch == "gpt2":
        layer = layer_flops("gpt2", h, s)
    else:  # benchmarks/bench_pipeline.py's Llama: MLP 8/3 h (rounded to 8), KV heads = heads / 2 (4 heads)
        layer = layer_flops("llama", h, s, h * 8 // 3 // 8 * 8, h // 2)
    return layer, head_flops(h, v, s)


def target_costs(arch: str, measured: StackCosts, layers: int | None = None) -> StackCosts:
    target = TARGETS[arch]
    notes = measured.notes
    layer, head = measured_flops(arch, notes, notes["hidden"])
    size = notes["seq_len"] * notes["hidden"]
    ratio_activation = target["tokens_x_hidden"] / size
    per_sample = StackCosts.from_json(measured.to_json())
    largest = max(per_sample.by_batch)  # per-sample costs from the largest measured micro-batch (least overhead)
    per_sample.by_batch = {1: _per_sample(per_sample.by_batch[largest], largest)}
    num_layers = layers or target["layers"]
    name = target["name"] + ("" if layers is None else f", deep (L = {layers})")
    return per_sample.scaled(
        name,
        num_layers,
        layer=target["flops"]() / layer,
        head=target["head"]() / head,
        embed=ratio_activation,
        activation=ratio_activation,
    )


def _per_sample(costs, samples: int):
    from dataclasses import asdict

    from hf_hwbp.parallel.simulate import WorkCosts

    return WorkCosts(**{k: v / samples for k, v in asdict(costs).items()})


# ----- validation ----------------------------------------------------------------------------------------------------
def _predict_row(row: dict, costs: StackCosts, plan: StackCosts | None, world: int, batch: int, names: dict) -> float:
    method = row["method"]
    if method == "pipeline backprop":  # hf_hwbp's runtime, no micro-batches
        return predict("gpipe", costs, world, 1, batch=batch, overhead=costs.task_overhead)
    if method.startswith("highway"):
        return predict("highway", costs, world, row["M"], row["k"], batch=batch, plan_costs=plan)
    return predict(names[method.rsplit(" M=", 1)[0]], costs, world, row["M"], batch=batch)


def _runtime(method: str) -> str:
    return "torch" if method.startswith("torch") else "hf_hwbp"


def fit_overheads(bench: dict) -> dict[str, dict]:
    """Per model: the per-task overhead of each runtime, from a run on layers that cost almost nothing."""
    world, batch = bench["world_size"], bench["args"]["batch"]
    names = {v: k for k, v in _labels().items()}
    out = {}
    for model in bench["models"]:
        costs = StackCosts.from_json(model["costs"])
        plan = StackCosts.from_json(model["plan_costs"]) if "plan_costs" in model else None
        per_method = {}
        for row in model["rows"]:
            field = "torch_task_overhead" if _runtime(row["method"]) == "torch" else "task_overhead"

            def predict_with(overhead: float, row=row, field=field, costs=costs, plan=plan) -> float:
                return _predict_row(row, replace(costs, **{field: overhead}), plan, world, batch, names)

            per_method[row["method"]] = fit_task_overhead(predict_with, row["median_s"])
        out[model["model"]] = {
            "hf_hwbp": statistics.median(v for m, v in per_method.items() if _runtime(m) == "hf_hwbp"),
            "torch": statistics.median(v for m, v in per_method.items() if _runtime(m) == "torch"),
            "per_method": per_method,
            "args": {k: bench["args"][k] for k in ("hidden", "seq", "vocab", "batch", "layers")},
        }
    return out


def with_overheads(costs: StackCosts, overheads: dict | None) -> StackCosts:
    if overheads is None:
        return costs
    return replace(costs, task_overhead=overheads["hf_hwbp"], torch_task_overhead=overheads["torch"])


def validate(bench: dict, overheads: dict[str, dict] | None = None) -> list[dict]:
    rows = []
    world = bench["world_size"]
    batch = bench["args"]["batch"]
    names = {v: k for k, v in _labels().items()}
    for model in bench["models"]:
        costs = StackCosts.from_json(model["costs"])
        plan = StackCosts.from_json(model["plan_costs"]) if "plan_costs" in model else None
        calibrated = with_overheads(costs, (overheads or {}).get(model["model"]))
        for row in model["rows"]:
            bare = _predict_row(row, costs, plan, world, batch, names)
            seconds = _predict_row(row, calibrated, plan, world, batch, names)
            rows.append(
                {
                    "model": model["model"],
                    "method": row["method"],
                    "measured_s": row["median_s"],
                    "predicted_no_overhead_s": bare,
                    "error_no_overhead": bare / row["median_s"] - 1,
                    "predicted_s": seconds,
                    "error": seconds / row["median_s"] - 1,
                }
            )
    return rows


def ideal_bounds(bench: dict) -> list[dict]:
    """Per model, M and k of the 2-rank bench: Highway-BP against the best backprop schedule with no per-task
    overhead on either side and a free link (the measured layer work only). ``speedup_ideal`` is what the best
    implementation of our schedule could reach; ``speedup_bound`` divides by the busiest rank's work alone, a
    bound that no schedule of Highway-BP(k) can pass (a step lasts at least as long as any rank's work)."""
    from hf_hwbp.parallel.simulate import highway_timeline

    rows = []
    world, batch = bench["world_size"], bench["args"]["batch"]
    for model in bench["models"]:
        ideal = replace(
            StackCosts.from_json(model["costs"]),
            task_overhead=0.0,
            torch_task_overhead=0.0,
            latency=0.0,
            seconds_per_byte=0.0,
        )
        for m in sorted({row["M"] for row in model["rows"] if row.get("M")}):
            schedule, backprop_s = best_backprop(ideal, world, m, batch=batch)
            for k in sorted({row["k"] for row in model["rows"] if row["method"].startswith("highway")}):
                _, timeline = highway_timeline(ideal, world, m, k, batch=batch)
                busiest = max(timeline.busy(rank) for rank in range(world))
                rows.append(
                    {
                        "model": model["model"],
                        "M": m,
                        "k": k,
                        "highway_ideal_s": timeline.makespan,
                        "busiest_rank_work_s": busiest,
                        "best_backprop": schedule,
                        "best_backprop_ideal_s": backprop_s,
                        "speedup_ideal": backprop_s / timeline.makespan,
                        "speedup_bound": backprop_s / busiest,
                    }
                )
    return rows


def kinds_breakdown(bench: dict, overheads: dict[str, dict] | None = None) -> list[dict]:
    """Per Highway setting and rank: seconds per kind of task, measured (the bench's traced step) vs predicted."""
    from hf_hwbp.parallel.simulate import highway_timeline

    rows = []
    world, batch = bench["world_size"], bench["args"]["batch"]
    for model in bench["models"]:
        costs = with_overheads(StackCosts.from_json(model["costs"]), (overheads or {}).get(model["model"]))
        plan = StackCosts.from_json(model["plan_costs"]) if "plan_costs" in model else None
        for method, ranks in model.get("profiles", {}).items():
            row = next(r for r in model["rows"] if r["method"] == method)
            graph, timeline = highway_timeline(costs, world, row["M"], row["k"], batch, plan)
            for measured in ranks:
                predicted: dict[str, float] = {}
                for task in timeline.order[measured["rank"]]:
                    predicted[task.kind] = predicted.get(task.kind, 0.0) + timeline.end[task] - timeline.start[task]
                rows.append(
                    {
                        "model": model["model"],
                        "method": method,
                        "rank": measured["rank"],
                        "measured": {k: measured.get(k, 0.0) for k in "FHVRWE"},
                        "predicted": {k: predicted.get(k, 0.0) for k in "FHVRWE"},
                    }
                )
    return rows


def _labels() -> dict[str, str]:
    from benchmarks.bench_pipeline import SCHEDULE_LABELS

    return SCHEDULE_LABELS


# ----- the map -------------------------------------------------------------------------------------------------------
def speedup_map(costs: StackCosts) -> list[dict]:
    cells = []
    for s in STAGES:
        for m in MICROBATCHES:
            cell = {"S": s, "M": m}
            if s > costs.num_layers:
                cell["best_backprop"] = None
                cells.append(cell)
                continue
            name, backprop = best_backprop(costs, s, m, batch=m, schedules=BACKPROP_SCHEDULES)
            cell["best_backprop"], cell["best_backprop_s"] = name, backprop
            for k in KS:
                highway = predict("highway", costs, s, m, k, batch=m)
                cell[f"highway_k{k}_s"] = highway
                cell[f"speedup_k{k}"] = backprop / highway
            cells.append(cell)
    return cells


def heatmap(maps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = plt.subplots(
        len(maps), len(KS), figsize=(4.4 * len(KS), 3.9 * len(maps)), squeeze=False, layout="constrained"
    )
    norm = TwoSlopeNorm(vmin=0.25, vcenter=1.0, vmax=4.0)
    for row, entry in enumerate(maps):
        for col, k in enumerate(KS):
            ax = axes[row][col]
            grid = np.full((len(STAGES), len(MICROBATCHES)), np.nan)
            for cell in entry["cells"]:
                if cell.get("best_backprop"):
                    grid[STAGES.index(cell["S"]), MICROBATCHES.index(cell["M"])] = cell[f"speedup_k{k}"]
            image = ax.imshow(grid, cmap="RdBu", norm=norm, origin="lower", aspect="auto")
            for i in range(len(STAGES)):
                for j in range(len(MICROBATCHES)):
                    text = "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(MICROBATCHES)), MICROBATCHES)
            ax.set_yticks(range(len(STAGES)), STAGES)
            ax.set_xlabel("micro-batches M")
            ax.set_ylabel("stages S")
            ax.set_title(f"{entry['name']}\nHighway-BP k={k}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="speed-up over the best backprop schedule (>1: Highway faster)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_markdown(result: dict) -> str:
    lines = [
        "# Simulator: validation on 2 ranks, then the map",
        "",
        f"`{result['command']}`",
        "",
        "## Validation: predicted vs measured step time (2 ranks, costs measured in the same run)",
        "",
    ]
    if result.get("overheads"):
        lines += [
            f"Per-task overheads from a separate run on near-free layers (`{result['overhead_bench']}`; median "
            "over each runtime's methods, in ms):",
            "",
            "| model | hf_hwbp runtime | torch.distributed.pipelining | per method (ms) |",
            "|---|---:|---:|---|",
        ]
        for model, o in result["overheads"].items():
            each = ", ".join(f"{m}: {1e3 * v:.2f}" for m, v in o["per_method"].items())
            lines.append(f"| {model} | {1e3 * o['hf_hwbp']:.2f} | {1e3 * o['torch']:.2f} | {each} |")
        lines.append("")
    lines += [
        "| model | method | measured (s) | predicted, no overhead (s) | error | predicted (s) | error |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["validation"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['measured_s']:.3f} | {r['predicted_no_overhead_s']:.3f} | "
            f"{100 * r['error_no_overhead']:+.1f} % | {r['predicted_s']:.3f} | {100 * r['error']:+.1f} % |"
        )
    if result.get("kinds"):
        lines += [
            "",
            "Per kind of task (seconds per rank in one step, measured in the bench's traced step / predicted):",
            "",
            "| model | method | rank | F | H | V | R | W | E |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["kinds"]:
            cells = " | ".join(f"{r['measured'][k]:.3f} / {r['predicted'][k]:.3f}" for k in "FHVRWE")
            lines.append(f"| {r['model']} | {r['method']} | {r['rank']} | {cells} |")
    errors = [r["error"] for r in result["validation"]]
    if errors:
        bare = [r["error_no_overhead"] for r in result["validation"]]
        lines += [
            "",
            f"Within 10 %: {sum(abs(e) <= 0.10 for e in errors)} of {len(errors)} with the per-task overheads "
            f"(median error {100 * statistics.median(errors):+.1f} %, largest {100 * max(map(abs, errors)):.1f} %; "
            f"{sum(e < 0 for e in errors)} too low); without them {sum(abs(e) <= 0.10 for e in bare)} of "
            f"{len(bare)} (median {100 * statistics.median(bare):+.1f} %, largest {100 * max(map(abs, bare)):.1f} %).",
            "",
        ]
    else:
        lines += ["", "(no 2-rank measurement for these costs: not validated)", ""]
    if result.get("ideal"):
        lines += [
            "## The same 2-rank step with no overheads and a free link: what the targets need",
            "",
            "Highway-BP(k) against the best backprop schedule, both with the measured layer work only (no per-task "
            "overhead on either side, no message time). *ideal*: our schedule's speed-up under those conditions; "
            "*bound*: the best schedule's step divided by the busiest rank's Highway work alone, which no schedule "
            "of Highway-BP(k) can pass.",
            "",
            "| model | M | k | Highway, ideal (s) | busiest rank's work (s) | best backprop, ideal (s) | ideal"
            " | bound |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in result["ideal"]:
            lines.append(
                f"| {r['model']} | {r['M']} | {r['k']} | {r['highway_ideal_s']:.3f} | {r['busiest_rank_work_s']:.3f}"
                f" | {r['best_backprop']} {r['best_backprop_ideal_s']:.3f} | {r['speedup_ideal']:.2f} | "
                f"{r['speedup_bound']:.2f} |"
            )
        lines.append("")
    for entry in result["maps"]:
        lines += [
            f"## {entry['name']}: speed-up of Highway-BP(k) over the best backprop schedule",
            "",
            "Cells: k=0 / k=1 / k=2 speed-up (above 1: Highway-BP faster), then the best backprop schedule.",
            "",
            "| S \\ M | " + " | ".join(str(m) for m in MICROBATCHES) + " |",
            "|---|" + "---|" * len(MICROBATCHES),
        ]
        for s in STAGES:
            cells = []
            for m in MICROBATCHES:
                cell = next(c for c in entry["cells"] if c["S"] == s and c["M"] == m)
                if not cell.get("best_backprop"):
                    cells.append("n/a")
                else:
                    speed = " / ".join(f"{cell[f'speedup_k{k}']:.2f}" for k in KS)
                    cells.append(f"{speed} ({cell['best_backprop']})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", default="results/pipeline/bench_pipeline.json")
    parser.add_argument("--out", default="results/pipeline")
    parser.add_argument("--deep_layers", type=int, default=64, help="L of the deep variants (0: none)")
    parser.add_argument("--gpu_costs", default=None, help="gpu_costs.json of benchmarks/bench_gpu.py: map those")
    parser.add_argument(
        "--overhead_bench",
        default=DEFAULT_OVERHEAD_BENCH,
        help="a bench_pipeline.py run on near-free layers, for the per-task overheads ('': none)",
    )
    parser.add_argument("--link_latency_us", type=float, default=10.0, help="assumed GPU link latency")
    parser.add_argument("--link_gbps", type=float, default=100.0, help="assumed GPU link bandwidth (GB/s)")
    args = parser.parse_args()
    import sys

    result = {"command": "python -m benchmarks.simulate_pipeline " + " ".join(sys.argv[1:])}
    if args.gpu_costs:
        stem = "simulate_pipeline_gpu"
        measured = json.loads(Path(args.gpu_costs).read_text())
        result["validation"] = []
        result["link"] = {"latency_us": args.link_latency_us, "gbps": args.link_gbps, "assumed": True}
        stacks = []
        for arch, data in measured.items():
            if arch not in TARGETS:
                continue  # bench_gpu.py's bookkeeping ("seconds")
            costs = StackCosts.from_json(data)
            costs.name = f"{TARGETS[arch]['name']} (GPU-measured layers)"
            costs.latency = args.link_latency_us * 1e-6
            costs.seconds_per_byte = 1 / (args.link_gbps * 1e9)
            stacks.append(costs)
    else:
        stem = "simulate_pipeline"
        bench = json.loads(Path(args.bench).read_text())
        result["bench"] = args.bench
        overheads = None
        if args.overhead_bench and Path(args.overhead_bench).is_file():
            overheads = fit_overheads(json.loads(Path(args.overhead_bench).read_text()))
            result["overhead_bench"], result["overheads"] = args.overhead_bench, overheads
        result["validation"] = validate(bench, overheads)
        result["kinds"] = kinds_breakdown(bench, overheads)
        result["ideal"] = ideal_bounds(bench)
        stacks = []
        for model in bench["models"]:
            measured = with_overheads(StackCosts.from_json(model["costs"]), (overheads or {}).get(model["model"]))
            stacks.append(target_costs(model["model"], measured))
            if args.deep_layers:
                stacks.append(target_costs(model["model"], measured, args.deep_layers))
    maps = []
    for costs in stacks:
        maps.append({"name": costs.name, "costs": costs.to_json(), "cells": speedup_map(costs)})
        print(f"mapped {costs.name}", flush=True)
    result["maps"] = maps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(to_markdown(result) + "\n")
    heatmap(maps, out / f"{stem}_map.png")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
