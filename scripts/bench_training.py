"""Training quality and speed of Highway-BP(k) against backprop, same model, same seed, same data order.

Tasks:
  gpt2  GPT-2 language model on the embedded corpus (Python reference manual), validation loss.
  vit   ViT classifier on scikit-learn's digits (8x8 upsampled to 16x16, patch 4), validation loss and accuracy.

Methods: ``backprop`` and ``k<N>`` (Highway-BP with N iterations). For every (task, seed) all methods start
from the same initial weights (built with that seed) and see the same batches in the same order; dropout is 0.
Each finished (task, method, seed) run is appended to ``<output_dir>/runs.jsonl`` at once (a cut-off run keeps
what finished; ``--resume`` skips runs already there). ``--timing_rounds`` adds an interleaved per-step timing
(round-robin over the methods, so machine load hits every method alike) to ``timing.jsonl``. The summary
(``summary.json``, ``summary.md``, ``loss_curves.png``) is rebuilt from the JSONL files at the end, or alone
with ``--summarize_only``.

Example (the committed run, see results/README.md):
    python scripts/bench_training.py --tasks gpt2 --seeds 0 --output_dir results/training
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    append_jsonl,
    batch_order,
    build_model,
    digits_data,
    lm_data,
    loss_of,
    machine_note,
    read_jsonl,
    set_threads,
    uptime,
    warmup_cosine,
)

import hf_hwbp  # noqa: E402

TASK_DEFAULTS = {
    # depth, hidden, heads, batch, steps, lr, warmup, weight decay, eval every
    "gpt2": dict(depth=6, hidden=128, heads=4, batch_size=8, steps=1500, lr=1e-3, warmup=100, wd=0.01, eval_every=100),
    "vit": dict(depth=6, hidden=64, heads=4, batch_size=32, steps=1000, lr=1e-3, warmup=50, wd=0.05, eval_every=50),
}
SMOKE = dict(depth=2, hidden=32, heads=2, batch_size=4, steps=6, eval_every=3, warmup=2)


def method_k(method: str) -> int | None:
    if method == "backprop":
        return None
    if method.startswith("k") and method[1:].isdigit():
        return int(method[1:])
    raise ValueError(f"unknown method {method!r}: use 'backprop' or 'k<N>' (e.g. k2)")


class Task:
    """The data, model builder and evaluation of one benchmark task."""

    def __init__(self, name: str, hp: dict, block_size: int, vocab_size: int, smoke: bool):
        self.name, self.hp = name, hp
        if name == "gpt2":
            train, val, vocab = lm_data(block_size, vocab_size)
            if smoke:
                train, val = train[:64], val[:16]
            self.train_x, self.train_y, self.val_x, self.val_y = train, train, val, val
            self.model_kwargs = dict(vocab_size=vocab, block_size=block_size)
        elif name == "vit":
            x_train, y_train, x_val, y_val = digits_data()
            if smoke:
                x_train, y_train, x_val, y_val = x_train[:64], y_train[:64], x_val[:32], y_val[:32]
            self.train_x, self.train_y, self.val_x, self.val_y = x_train, y_train, x_val, y_val
            self.model_kwargs = dict(image_size=16, patch_size=4, num_labels=10)
        else:
            raise ValueError(f"unknown task {name!r}")

    def model(self, seed: int):
        hp = self.hp
        return build_model(
            self.name if self.name != "vit" else "vit",
            hp["depth"],
            hidden=hp["hidden"],
            heads=hp["heads"],
            seed=seed,
            **self.model_kwargs,
        )

    def batch(self, idx: torch.Tensor):
        return self.train_x[idx], self.train_y[idx]

    @torch.no_grad()
    def evaluate(self, model, eval_batch: int = 64) -> dict:
        model.eval()
        total, correct, count = 0.0, 0, 0
        for start in range(0, len(self.val_x), eval_batch):
            x, y = self.val_x[start : start + eval_batch], self.val_y[start : start + eval_batch]
            if self.name == "vit":
                out = model(pixel_values=x, labels=y)
                total += out.loss.item() * len(y)
                correct += (out.logits.argmax(-1) == y).sum().item()
                count += len(y)
            else:
                out = model(input_ids=x, labels=y)
                n = y[:, 1:].numel()
                total += out.loss.item() * n
                count += n
        model.train()
        result = {"val_loss": total / count}
        if self.name == "vit":
            result["val_acc"] = correct / count
        return result


def train_one(task: Task, method: str, seed: int, log=print) -> dict:
    hp = task.hp
    model = task.model(seed)
    k = method_k(method)
    if k is not None:
        hf_hwbp.patch_model(model, k)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["wd"]}, {"params": no_decay, "weight_decay": 0.0}], lr=hp["lr"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, hp["steps"], hp["warmup"]))
    batches = batch_order(len(task.train_x), hp["batch_size"], hp["steps"], seed=1000 + seed)
    start_uptime = uptime()
    curve = [{"step": 0, "train_time_s": 0.0, "train_loss": None, **task.evaluate(model)}]
    log(f"[{task.name} {method} seed {seed}] step 0 {curve[-1]}")
    step_times: list[float] = []
    train_time, running, running_n = 0.0, 0.0, 0
    for step, idx in enumerate(batches, start=1):
        batch = task.batch(idx)
        t0 = time.perf_counter()
        loss = loss_of(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        train_time += dt
        running += loss.item()
        running_n += 1
        if step % hp["eval_every"] == 0 or step == hp["steps"]:
            point = {"step": step, "train_time_s": train_time, "train_loss": running / running_n}
            point.update(task.evaluate(model))
            curve.append(point)
            running, running_n = 0.0, 0
            log(f"[{task.name} {method} seed {seed}] {json.dumps(point)}")
    final = curve[-1]
    return {
        "task": task.name,
        "method": method,
        "k": k,
        "seed": seed,
        "hparams": hp,
        "initial_val_loss": curve[0]["val_loss"],
        "final_val_loss": final["val_loss"],
        "final_val_acc": final.get("val_acc"),
        "train_time_s": train_time,
        "median_step_s": statistics.median(step_times),
        "mean_step_s": statistics.fmean(step_times),
        "curve": curve,
        "uptime_start": start_uptime,
        "uptime_end": uptime(),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def interleaved_timing(task: Task, methods: list[str], rounds: int, steps: int, seed: int = 0) -> list[dict]:
    """Per-step time of every method measured round-robin (``rounds`` x ``steps`` steps each, after warm-up)."""
    models, optimizers = {}, {}
    for method in methods:
        model = task.model(seed)
        k = method_k(method)
        if k is not None:
            hf_hwbp.patch_model(model, k)
        models[method], optimizers[method] = model, torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = batch_order(len(task.train_x), task.hp["batch_size"], steps * (rounds + 1), seed=1000 + seed)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds + 1):  # round 0 is warm-up
        for method in methods:
            model, optimizer = models[method], optimizers[method]
            for idx in batches[r * steps : (r + 1) * steps]:
                batch = task.batch(idx)
                t0 = time.perf_counter()
                loss = loss_of(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if r > 0:
                    times[method].append(time.perf_counter() - t0)
    return [
        {
            "task": task.name,
            "method": m,
            "rounds": rounds,
            "steps_per_round": steps,
            "median_step_s": statistics.median(times[m]),
            "min_step_s": min(times[m]),
            "mean_step_s": statistics.fmean(times[m]),
            "uptime": uptime(),
        }
        for m in methods
    ]


# ----- summary -------------------------------------------------------------------------------------------------
def _spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _fmt(s: dict, digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    if s["n"] == 0 or s["mean"] is None:
        return "n/a"
    text = f"{s['mean'] * scale:.{digits}f}{suffix}"
    if s["n"] > 1:
        text += f" ± {s['std'] * scale:.{digits}f} (n={s['n']})"
    return text


def time_to_reach(curve: list[dict], target: float, key: str = "train_time_s") -> float | None:
    """``key`` (training wall time, or step) at the first evaluation with validation loss <= target (None: never)."""
    for point in curve[1:]:
        if point["val_loss"] <= target + 1e-12:
            return point[key]
    return None


def summarize(output_dir: Path, seeds: list[int] | None = None) -> dict:
    """Rebuild summary.json / summary.md / loss_curves.png from runs.jsonl (only ``seeds`` if given)."""
    runs = [r for r in read_jsonl(output_dir / "runs.jsonl") if seeds is None or r["seed"] in seeds]
    timing = read_jsonl(output_dir / "timing.jsonl")
    summary: dict = {"tasks": {}}
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        # the last record of each (method, seed) wins (re-runs replace earlier ones)
        by_key = {(r["method"], r["seed"]): r for r in task_runs}
        methods = sorted({m for m, _ in by_key}, key=lambda m: -1 if m == "backprop" else method_k(m))
        seeds = sorted({s for _, s in by_key})
        bp = {s: by_key[("backprop", s)] for s in seeds if ("backprop", s) in by_key}
        timing_rows = {t["method"]: t for t in timing if t["task"] == task}
        rows = {}
        for method in methods:
            rs = [by_key[(method, s)] for s in seeds if (method, s) in by_key]
            gaps, acc_gaps, ratios, ttr, steps_to, reached = [], [], [], [], [], []
            for r in rs:
                base = bp.get(r["seed"])
                if base is None:
                    continue
                gaps.append(100.0 * (r["final_val_loss"] - base["final_val_loss"]) / base["final_val_loss"])
                if r["final_val_acc"] is not None:
                    acc_gaps.append(100.0 * (r["final_val_acc"] - base["final_val_acc"]))
                ratios.append(r["median_step_s"] / base["median_step_s"])
                t = time_to_reach(r["curve"], base["final_val_loss"])
                reached.append(t is not None)
                if t is not None:
                    ttr.append(t)
                    steps_to.append(time_to_reach(r["curve"], base["final_val_loss"], "step"))
            row = {
                "seeds": [r["seed"] for r in rs],
                "initial_val_loss": _spread([r["initial_val_loss"] for r in rs]),
                "final_val_loss": _spread([r["final_val_loss"] for r in rs]),
                "final_val_acc": _spread([r["final_val_acc"] for r in rs]),
                "gap_to_backprop_pct": _spread(gaps),
                "acc_gap_to_backprop_points": _spread(acc_gaps),
                "median_step_s": _spread([r["median_step_s"] for r in rs]),
                "step_time_ratio": _spread(ratios),
                "train_time_s": _spread([r["train_time_s"] for r in rs]),
                "time_to_backprop_final_s": _spread(ttr),
                "steps_to_backprop_final": _spread(steps_to),
                "reached_backprop_final": f"{sum(reached)}/{len(reached)}",
            }
            if method in timing_rows and "backprop" in timing_rows:
                row["interleaved_step_s"] = timing_rows[method]["median_step_s"]
                row["interleaved_time_to_backprop_final_s"] = (
                    statistics.fmean(steps_to) * timing_rows[method]["median_step_s"] if steps_to else None
                )
                row["interleaved_ratio"] = (
                    timing_rows[method]["median_step_s"] / timing_rows["backprop"]["median_step_s"]
                )
            rows[method] = row
        summary["tasks"][task] = {"methods": rows, "hparams": task_runs[-1]["hparams"], "seeds": seeds}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(summary_markdown(summary))
    plot_curves(runs, output_dir / "loss_curves.png")
    return summary


def summary_markdown(summary: dict) -> str:
    lines = []
    for task, data in summary["tasks"].items():
        is_vit = task == "vit"
        lines.append(f"### {task} (seeds {data['seeds']}; hparams {json.dumps(data['hparams'])})\n")
        header = "| method | initial val loss | final val loss | gap to backprop |"
        if is_vit:
            header += " final val acc | acc gap (points) |"
        header += (
            " median step (s) | step ratio | interleaved ratio | time to backprop's final loss (s) | steps to it |"
        )
        header += " steps x interleaved step time (s) | reached |"
        lines.append(header)
        lines.append("|" + "---|" * (header.count("|") - 1))
        for method, row in data["methods"].items():
            cells = [
                method,
                _fmt(row["initial_val_loss"]),
                _fmt(row["final_val_loss"]),
                _fmt(row["gap_to_backprop_pct"], 2, suffix=" %"),
            ]
            if is_vit:
                cells += [_fmt(row["final_val_acc"], 2, 100.0, " %"), _fmt(row["acc_gap_to_backprop_points"], 2)]
            cells += [
                _fmt(row["median_step_s"], 4),
                _fmt(row["step_time_ratio"], 2),
                f"{row['interleaved_ratio']:.2f}" if "interleaved_ratio" in row else "n/a",
                _fmt(row["time_to_backprop_final_s"], 1) if row["time_to_backprop_final_s"]["n"] else "not reached",
                _fmt(row["steps_to_backprop_final"], 0) if row["steps_to_backprop_final"]["n"] else "-",
                f"{row['interleaved_time_to_backprop_final_s']:.1f}"
                if row.get("interleaved_time_to_backprop_final_s") is not None
                else "-",
                row["reached_backprop_final"],
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    if not tasks:
        return
    ncols = sum(2 if t == "vit" else 1 for t in tasks)
    fig, axes = plt.subplots(1, ncols, figsize=(max(7, 6 * ncols), 4.8), squeeze=False)
    axes = list(axes[0])
    colors = {"backprop": "black", "k0": "tab:red", "k1": "tab:orange", "k2": "tab:green", "k3": "tab:cyan"}
    colors.update({"k4": "tab:blue", "k8": "tab:purple"})
    col = 0
    for task in tasks:
        task_runs = {(r["method"], r["seed"]): r for r in runs if r["task"] == task}
        panels = [("val_loss", "validation loss")] + ([("val_acc", "validation accuracy")] if task == "vit" else [])
        for key, label in panels:
            ax = axes[col]
            col += 1
            seen = set()
            for (method, seed), r in sorted(task_runs.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
                steps = [p["step"] for p in r["curve"]]
                values = [p.get(key) for p in r["curve"]]
                ax.plot(
                    steps,
                    values,
                    color=colors.get(method),
                    alpha=0.85,
                    linestyle="-" if seed == min(s for m, s in task_runs if m == method) else "--",
                    label=method if method not in seen else None,
                )
                seen.add(method)
            ax.set_title(f"{task}: {label}")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            if key == "val_loss":
                finals = [r["final_val_loss"] for r in task_runs.values()]
                lo, hi = min(finals), max(r["initial_val_loss"] for r in task_runs.values())
                ax.set_ylim(lo - 0.05 * (hi - lo), lo + 0.5 * (hi - lo))
            else:
                ax.set_ylim(0.5, 1.0)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(
        "Highway-BP(k) vs backprop: same init, same data order\n(solid: first seed, dashed: other seeds)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["gpt2", "vit"], choices=sorted(TASK_DEFAULTS))
    parser.add_argument("--methods", nargs="+", default=["backprop", "k0", "k1", "k2", "k4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None, help="override the task's number of steps")
    parser.add_argument("--eval_every", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (same for every method)")
    parser.add_argument("--timing_rounds", type=int, default=0, help="interleaved timing rounds (0: none)")
    parser.add_argument("--timing_steps", type=int, default=10, help="steps per method per timing round")
    parser.add_argument("--output_dir", type=Path, default=Path("results/training"))
    parser.add_argument("--resume", action="store_true", help="skip (task, method, seed) runs already in runs.jsonl")
    parser.add_argument("--summarize_only", action="store_true")
    parser.add_argument("--summary_seeds", nargs="+", type=int, default=None, help="seeds the summary covers")
    parser.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps (for tests)")
    args = parser.parse_args(argv)
    for m in args.methods:
        method_k(m)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        return summarize(args.output_dir, args.summary_seeds)

    set_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    note = machine_note(args.threads) | {"argv": sys.argv if argv is None else ["bench_training.py", *argv]}
    append_jsonl(args.output_dir / "machine.jsonl", note)
    print(json.dumps(note), flush=True)
    done = {(r["task"], r["method"], r["seed"]) for r in read_jsonl(args.output_dir / "runs.jsonl")}
    for task_name in args.tasks:
        hp = dict(TASK_DEFAULTS[task_name])
        if args.smoke:
            hp.update(SMOKE)
        if args.steps is not None:
            hp["steps"] = args.steps
        if args.eval_every is not None:
            hp["eval_every"] = args.eval_every
        task = Task(task_name, hp, 16 if args.smoke else args.block_size, args.vocab_size, args.smoke)
        for seed in args.seeds:
            for method in args.methods:
                if args.resume and (task_name, method, seed) in done:
                    print(f"skip {task_name} {method} seed {seed} (in runs.jsonl)", flush=True)
                    continue
                record = train_one(task, method, seed, log=lambda s: print(s, flush=True))
                append_jsonl(args.output_dir / "runs.jsonl", record)
                print(
                    f"DONE {task_name} {method} seed {seed}: final val loss {record['final_val_loss']:.4f} "
                    f"median step {record['median_step_s']:.4f}s",
                    flush=True,
                )
        if args.timing_rounds > 0:
            for row in interleaved_timing(task, args.methods, args.timing_rounds, args.timing_steps):
                append_jsonl(args.output_dir / "timing.jsonl", row)
                print("TIMING", json.dumps(row), flush=True)
    summary = summarize(args.output_dir, args.summary_seeds)
    print((args.output_dir / "summary.md").read_text(), flush=True)
    return summary


if __name__ == "__main__":
    main()
