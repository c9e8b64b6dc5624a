"""Why does Highway-BP(2) sometimes stall on GPT-2? Chaos (any perturbation) or bias (input-side gradients)?

On the set-up where the stall was seen (results/training: GPT-2, 6 layers, width 128, batch 8, lr 1e-3) every
method starts from the same init and sees the same batches; the learning-rate schedule is the 1,500-step one, run
for the first ``--max_steps`` steps (the stall is at steps 80-200). Methods (see benchmarks/_grad_policy.py):

- perturbations of backprop: ``backprop_f64`` (rounding-size), ``backprop_noise2`` (a random error with the norm
  of Highway-BP(2)'s error on every tensor at every step), ``backprop_hw2_pos`` (exact, except the position
  embeddings get Highway-BP(2)'s gradient: the bias alone);
- Highway-BP with exact input-side gradients: ``k2_exact_pos``, ``k2_exact_input``;
- plain ``k1``, ``k2``, ``k4`` and ``backprop``; and Llama (RoPE, no learned positions) with backprop and k2.

Highway methods record the per-group fidelity (token/position embeddings, each block, head) every
``--monitor_every`` steps. Runs append to ``<output_dir>/runs.jsonl`` (``--resume`` skips finished ones);
``--summarize_only`` rebuilds ``summary.md``, ``summary.json`` and the plots.

    python -m benchmarks.diagnose_k_stall --output_dir results/quality/diagnosis --resume
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks._bench_common import append_jsonl, read_jsonl, spread, start_runs
from benchmarks._grad_policy import parse_method
from benchmarks.bench_training import SMOKE, TASK_DEFAULTS, Task, train_one

GPT2_METHODS = [
    "backprop",
    "k2",
    "backprop_f64",
    "backprop_noise2",
    "backprop_hw2_pos",
    "k2_exact_pos",
    "k2_exact_input",
    "k1",
    "k4",
]
LLAMA_METHODS = ["backprop", "k2", "k2_exact_input", "backprop_noise2"]
THRESHOLDS = (6.0, 5.5, 5.0)


def steps_to(curve: list[dict], threshold: float) -> int | None:
    """The first evaluated step with validation loss <= threshold (None: not reached)."""
    for point in curve[1:]:
        if point["val_loss"] <= threshold:
            return point["step"]
    return None


def _upto(curve: list[dict], last_step: int) -> list[dict]:
    """The curve up to ``last_step`` (runs of different lengths are compared on their common part)."""
    return [p for p in curve if p["step"] <= last_step]


def loss_at(curve: list[dict], step: int) -> float | None:
    for point in curve:
        if point["step"] == step:
            return point["val_loss"]
    return None


def summarize(output_dir: Path) -> dict:
    """Per (set-up, method): per-seed val loss at checkpoints, steps to thresholds, paired gap to backprop."""
    runs = {(r["task"], r["method"], r["seed"]): r for r in read_jsonl(output_dir / "runs.jsonl")}
    summary: dict = {}
    for task in sorted({t for t, _, _ in runs}):
        methods = [m for m in dict.fromkeys(m for t, m, _ in runs if t == task)]
        seeds = sorted({s for t, _, s in runs if t == task})
        last_step = min(r["steps_run"] for (t, _, _), r in runs.items() if t == task)
        eval_every = next(r["hparams"]["eval_every"] for (t, _, _), r in runs.items() if t == task)
        rows = {}
        for method in methods:
            per_seed = {}
            for seed in seeds:
                r = runs.get((task, method, seed))
                base = runs.get((task, "backprop", seed))
                if r is None:
                    continue
                entry = {
                    "loss_at_200": loss_at(r["curve"], 200),
                    "loss_at_end": loss_at(r["curve"], last_step),
                    **{f"steps_to_{t}": steps_to(_upto(r["curve"], last_step), t) for t in THRESHOLDS},
                }
                if base is not None:
                    b = loss_at(base["curve"], last_step)
                    entry["gap_at_end_pct"] = 100 * (entry["loss_at_end"] - b) / b
                    s_r, s_b = entry["steps_to_5.5"], steps_to(_upto(base["curve"], last_step), 5.5)
                    entry["delay_to_5.5"] = None if s_r is None or s_b is None else s_r - s_b
                    entry["backprop_reached"] = s_b is not None
                    entry["backprop_steps_to_5.5"] = s_b
                per_seed[seed] = entry
            gaps = [e["gap_at_end_pct"] for e in per_seed.values() if "gap_at_end_pct" in e]
            # a run that never reached 5.5 counts as reaching it just after the last step (a lower bound)
            delays = [
                e["delay_to_5.5"]
                if e["delay_to_5.5"] is not None
                else last_step + eval_every - e["backprop_steps_to_5.5"]
                for e in per_seed.values()
                if "delay_to_5.5" in e and (e["delay_to_5.5"] is not None or e["backprop_reached"])
            ]
            rows[method] = {
                "per_seed": per_seed,
                "gap_at_end_pct": spread(gaps),
                "delay_to_5.5": spread(delays),
                "stalled": sum(1 for e in per_seed.values() if _stalled(e)),
                "n": len(per_seed),
                "fidelity": _fidelity_profile([runs[(task, method, s)] for s in seeds if (task, method, s) in runs]),
            }
        summary[task] = {"seeds": seeds, "last_step": last_step, "eval_every": eval_every, "methods": rows}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(_markdown(summary))
    _plot(runs, summary, output_dir)
    return summary


def _stalled(entry: dict) -> bool:
    """Reached validation loss 5.5 >= 30 steps after backprop did, or not at all while backprop did."""
    if "delay_to_5.5" not in entry:
        return False
    if entry["delay_to_5.5"] is None:
        return entry["steps_to_5.5"] is None and entry.get("backprop_reached", False)
    return entry["delay_to_5.5"] >= 30


def _fidelity_profile(runs: list[dict], window: tuple[int, int] = (50, 250)) -> dict:
    """Median over seeds and monitored steps in ``window`` of each group's cosine and norm ratio."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for entry in r.get("fidelity", []):
            if not window[0] <= entry["step"] <= window[1]:
                continue
            for group, stats in entry.items():
                if group == "step":
                    continue
                for key in ("cosine", "norm_ratio", "rel_error"):
                    values.setdefault(group, {}).setdefault(key, []).append(stats[key])
    return {g: {key: statistics.median(v) for key, v in d.items()} for g, d in values.items()}


def _markdown(summary: dict) -> str:
    lines = []
    for task, data in summary.items():
        last = data["last_step"]
        lines.append(f"### {task}: seeds {data['seeds']}, first {last} steps of the 1,500-step schedule\n")
        lines.append(
            f"Paired against backprop on the same seed. *delay*: steps to validation loss 5.5 minus backprop's "
            f"(evaluated every {data['eval_every']} steps); *stalled*: delay >= 30 steps or 5.5 never reached (a run "
            "that never reached it counts as reaching it at the next evaluation after the last step: the mean delay "
            "is then a lower bound).\n"
        )
        seeds = data["seeds"]
        header = f"| method | gap at step {last} (mean ± sd, min / max) | delay to 5.5 (mean) | stalled |"
        header += "".join(f" seed {s}: loss@{last} (delay) |" for s in seeds)
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for method, row in data["methods"].items():
            g = row["gap_at_end_pct"]
            gap = "-" if g["n"] == 0 else f"{g['mean']:+.2f} % ± {g['std']:.2f} ({g['min']:+.2f} / {g['max']:+.2f})"
            d = row["delay_to_5.5"]
            cells = [method, gap, "-" if d["n"] == 0 else f"{d['mean']:+.0f}", f"{row['stalled']}/{row['n']}"]
            for s in seeds:
                e = row["per_seed"].get(s)
                if e is None:
                    cells.append("")
                else:
                    delay = e.get("delay_to_5.5")
                    cells.append(f"{e['loss_at_end']:.3f} ({'not reached' if delay is None else f'{delay:+d}'})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        groups = sorted(
            {g for row in data["methods"].values() for g in row["fidelity"]}, key=lambda g: (g[:5] == "block", g)
        )
        if groups:
            lines.append("Fidelity of the Highway gradient (median over seeds and monitored steps 50-250): cosine / ")
            lines.append("norm ratio ||g_hw|| / ||g_exact||.\n")
            header = "| method | " + " | ".join(groups) + " |"
            lines += [header, "|" + "---|" * (len(groups) + 1)]
            for method, row in data["methods"].items():
                if row["fidelity"]:
                    cells = [
                        f"{row['fidelity'][g]['cosine']:.4f} / {row['fidelity'][g]['norm_ratio']:.2f}"
                        if g in row["fidelity"]
                        else ""
                        for g in groups
                    ]
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _plot(runs: dict, summary: dict, output_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, data in summary.items():
        methods = list(data["methods"])
        seeds = data["seeds"]
        fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 4.2), squeeze=False, sharey=True)
        cmap = plt.get_cmap("tab10")
        for ax, seed in zip(axes[0], seeds):
            for i, method in enumerate(methods):
                r = runs.get((task, method, seed))
                if r is None:
                    continue
                steps = [p["step"] for p in r["curve"]]
                style = "-" if method in ("backprop", "k2") else "--"
                width = 2.2 if method in ("backprop", "k2") else 1.2
                color = "black" if method == "backprop" else cmap(i % 10)
                ax.plot(steps, [p["val_loss"] for p in r["curve"]], style, lw=width, color=color, label=method)
            ax.set_title(f"{task} seed {seed}")
            ax.set_xlabel("step")
            ax.set_ylim(4.6, 7.0)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation loss")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output_dir / f"curves_{task}.png", dpi=110)
        plt.close(fig)
        # fidelity per group along the k2 runs
        fid_runs = [
            runs[(task, "k2", s)] for s in seeds if (task, "k2", s) in runs and runs[(task, "k2", s)]["fidelity"]
        ]
        if not fid_runs:
            continue
        groups = [g for g in fid_runs[0]["fidelity"][0] if g != "step"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for r in fid_runs:
            steps = [e["step"] for e in r["fidelity"]]
            for j, group in enumerate(groups):
                color = cmap(j % 10) if not group.startswith("block") else plt.get_cmap("viridis")(j / len(groups))
                label = group if r is fid_runs[0] else None
                alpha = 1.0 if r is fid_runs[0] else 0.35
                axes[0].plot(steps, [e[group]["cosine"] for e in r["fidelity"]], color=color, alpha=alpha, label=label)
                axes[1].plot(steps, [e[group]["norm_ratio"] for e in r["fidelity"]], color=color, alpha=alpha)
        axes[0].set_title(f"{task} k=2: cosine with the exact gradient, per group")
        axes[1].set_title("norm ratio ||g_k2|| / ||g_exact||")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(output_dir / f"fidelity_{task}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=["gpt2", "llama"], choices=sorted(TASK_DEFAULTS))
    parser.add_argument("--methods", nargs="+", default=None, help="default: GPT2_METHODS / LLAMA_METHODS")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2, 1, 0, 3, 4, 5])
    parser.add_argument("--max_steps", type=int, default=400)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--monitor_every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", type=Path, default=Path("results/quality/diagnosis"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--summarize_only", action="store_true")
    parser.add_argument("--background", action="store_true", help=f"register the PID in {'/tmp/hwbp_background.pids'}")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.methods:
        for m in args.methods:
            parse_method(m)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        return summarize(args.output_dir)
    done = start_runs(args.output_dir, args.threads, "diagnose_k_stall.py", argv, args.background)
    for seed in args.seeds:
        for setup in args.setups:
            hp = dict(TASK_DEFAULTS[setup], eval_every=args.eval_every)
            if args.smoke:
                hp.update(SMOKE)
            task = Task(setup, hp, smoke=args.smoke)
            methods = args.methods or (LLAMA_METHODS if hp["model"] == "llama" else GPT2_METHODS)
            for method in methods:
                if args.resume and (setup, method, seed) in done:
                    continue
                record = train_one(
                    task, method, seed, log=lambda s: None, monitor_every=args.monitor_every, max_steps=args.max_steps
                )
                append_jsonl(args.output_dir / "runs.jsonl", record)
                print(
                    f"DONE {setup} {method} seed {seed}: val loss {record['final_val_loss']:.4f} after "
                    f"{record['steps_run']} steps, {record['train_time_s']:.0f} s CPU",
                    flush=True,
                )
    return summarize(args.output_dir)


if __name__ == "__main__":
    main()
