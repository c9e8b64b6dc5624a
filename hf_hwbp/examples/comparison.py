"""Highway-BP against plain backprop on the same model, seed and data: the example scripts' ``--compare_backprop``.

The baseline trains in ``<comparison_dir>/backprop`` and the comparison (``loss_curves.png``, ``comparison.md``,
``comparison.json``) is written to ``comparison_dir`` (default ``<output_dir>-comparison``): beside the Highway-BP
model's folder, never inside it, so ``push_to_hub`` of that folder uploads the model alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

logger = logging.getLogger(__name__)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, optimizer), evaluation and logging excluded."""

    def __init__(self):
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def seconds_per_step(self) -> float | None:
        """Median over the steps after the first two (warm-up); robust to a shared machine's spikes."""
        steady = self.durations[2:] if len(self.durations) > 4 else self.durations
        return statistics.median(steady) if steady else None


@dataclass
class RunResult:
    """One training run: its name, settings, final metrics and log history."""

    name: str
    output_dir: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    seconds_per_step: float | None
    highway_k: int | str | None = None

    def mean_iterations(self) -> float | None:
        values = [entry["hwbp_iterations"] for entry in self.log_history if "hwbp_iterations" in entry]
        return sum(values) / len(values) if values else None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in self.log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]


def _highway_settings(args: TrainingArguments) -> tuple[bool, Any]:
    config = getattr(args, "highway_config", None)
    return bool(getattr(args, "use_highway_bp", False)), config


def run_label(args: TrainingArguments) -> str:
    enabled, config = _highway_settings(args)
    return f"highway_bp_k{config.k}" if enabled and config is not None else "backprop"


def result_of(trainer: Trainer, metrics: dict[str, float]) -> RunResult:
    """The RunResult of a trained (and evaluated) trainer; its step times come from its StepTimer, if any."""
    timer = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StepTimer)), None)
    enabled, config = _highway_settings(trainer.args)
    return RunResult(
        name=run_label(trainer.args),
        output_dir=trainer.args.output_dir,
        metrics=dict(metrics),
        log_history=list(trainer.state.log_history),
        seconds_per_step=timer.seconds_per_step() if timer is not None else None,
        highway_k=config.k if enabled and config is not None else None,
    )


def default_comparison_dir(output_dir: str) -> str:
    return os.path.normpath(output_dir) + "-comparison"


def train_and_evaluate(trainer: Trainer, n_train: int | None, n_eval: int | None, extra_eval=None) -> dict:
    """run_clm's train / save / evaluate sequence for the baseline run; returns its train and eval metrics."""
    args = trainer.args
    metrics: dict[str, float] = {}
    if args.do_train:
        train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
        train_metrics = {**train_result.metrics, "train_samples": n_train}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": n_eval}
        if extra_eval is not None:
            eval_metrics.update(extra_eval(eval_metrics))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def compare_with_backprop(
    highway_trainer: Trainer,
    highway_metrics: dict[str, float],
    make_trainer: Callable[[TrainingArguments], Trainer],
    *,
    columns: list[tuple[str, str, str]],
    title: str,
    comparison_dir: str | None = None,
    extra_eval: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, str]:
    """Train the baseline with plain backprop and write the comparison; return the paths written.

    ``make_trainer(args)`` builds a fresh trainer (and model) for the baseline's arguments: the same arguments with
    ``use_highway_bp=False`` and ``output_dir=<comparison_dir>/backprop``. The seed is set before it is called,
    so a model built from a config gets the Highway run's initial weights.
    """
    args = highway_trainer.args
    comparison_dir = comparison_dir or default_comparison_dir(args.output_dir)
    baseline_args = dataclasses.replace(args, use_highway_bp=False, output_dir=os.path.join(comparison_dir, "backprop"))
    set_seed(baseline_args.seed)
    baseline = make_trainer(baseline_args)
    if not any(isinstance(cb, StepTimer) for cb in baseline.callback_handler.callbacks):
        baseline.add_callback(StepTimer())
    logger.info(f"*** Baseline: plain backprop -> {baseline_args.output_dir} ***")
    n_train = len(baseline.train_dataset) if baseline.train_dataset is not None else None
    n_eval = len(baseline.eval_dataset) if baseline.eval_dataset is not None else None
    baseline_metrics = train_and_evaluate(baseline, n_train, n_eval, extra_eval)
    results = [result_of(highway_trainer, highway_metrics), result_of(baseline, baseline_metrics)]
    if not args.should_save:
        return {}
    paths = write_comparison(results, comparison_dir, columns=columns, title=title)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    print(f"Wrote {paths['png']}, {paths['markdown']} and {paths['json']}")
    return paths


def write_comparison(
    results: list[RunResult], output_dir: str, columns: list[tuple[str, str, str]], title: str
) -> dict[str, str]:
    """``loss_curves.png``, ``comparison.md`` and ``comparison.json`` of runs (the last one is the baseline).

    ``columns``: (header, metrics key, format spec) of the metrics to tabulate besides time per step.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--compare_backprop plots with matplotlib: pip install hf_hwbp[plots]") from err
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "png": os.path.join(output_dir, "loss_curves.png"),
        "markdown": os.path.join(output_dir, "comparison.md"),
        "json": os.path.join(output_dir, "comparison.json"),
    }

    _plot_runs(plt, results, title, paths["png"])

    baseline = results[-1].seconds_per_step
    header = ["run", "k", "mean iterations"] + [c[0] for c in columns] + ["s / step", "time vs backprop"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for result in results:
        iterations = result.mean_iterations()
        ratio = result.seconds_per_step / baseline if result.seconds_per_step and baseline else None
        cells = [
            result.name,
            "-" if result.highway_k is None else str(result.highway_k),
            "-" if iterations is None else f"{iterations:.2f}",
        ]
        cells += [_fmt(result.metrics.get(key), spec) for _, key, spec in columns]
        cells += [_fmt(result.seconds_per_step, ".3f"), _fmt(ratio, ".2f") + ("x" if ratio else "")]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(
            {
                "run": result.name,
                "output_dir": result.output_dir,
                "k": result.highway_k,
                "mean_iterations": iterations,
                "seconds_per_step": result.seconds_per_step,
                "time_vs_backprop": ratio,
                "metrics": result.metrics,
            }
        )
    lines += [
        "",
        "s / step: median wall time of an optimizer step (forward, backward, optimizer; evaluation excluded) after "
        "two warm-up steps, on this machine. One device and no layer parallelism: Highway-BP(k) does k extra "
        "input-only backward sweeps here, so it is not expected to be faster (the cost model in hf_hwbp's "
        "docs/algorithm.md).",
        "",
        f"Loss curves: {os.path.basename(paths['png'])}",
        "",
    ]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    return paths


# The Highway run a solid line, the backprop baseline dashed, in colours that stay apart where the curves overlap.
_STYLES = ({"color": "tab:orange", "linestyle": "-"}, {"color": "tab:blue", "linestyle": "--"})
_MARKERS = ({"marker": "o", "markersize": 4}, {"marker": "s", "markersize": 7, "fillstyle": "none"})  # both visible


def _difference(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    """``a - b`` at the steps both curves have."""
    other = dict(zip(*b))
    points = [(step, value - other[step]) for step, value in zip(*a) if step in other]
    return [p[0] for p in points], [p[1] for p in points]


def _plot_runs(plt, results: list[RunResult], title: str, path: str) -> None:
    """Loss curves (train and eval), Highway minus backprop, and accuracy when the runs logged it."""
    has_accuracy = any(result.curve("eval_accuracy")[0] for result in results)
    panels = 3 if has_accuracy else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.3))
    loss_ax, diff_ax = axes[0], axes[1]
    highway, baseline = results[0], results[-1]
    for i, result in enumerate(results):
        if i == 0 or i == len(results) - 1:
            style, markers = _STYLES[0 if i == 0 else 1], _MARKERS[0 if i == 0 else 1]
        else:
            style, markers = {"color": f"C{i + 2}", "linestyle": ":"}, {"marker": "^", "markersize": 5}
        steps, losses = result.curve("loss")
        if steps:
            loss_ax.plot(steps, losses, linewidth=1.4, label=f"{result.name} train", **style)
        steps, losses = result.curve("eval_loss")
        if steps:
            loss_ax.plot(steps, losses, linewidth=1, label=f"{result.name} eval", **style, **markers)
        if has_accuracy:
            steps, accuracy = result.curve("eval_accuracy")
            if steps:
                axes[2].plot(steps, accuracy, label=f"{result.name} eval", **style, **markers)
    loss_ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    for key, label, marker in (("loss", "train loss", None), ("eval_loss", "eval loss", "o")):
        steps, diff = _difference(highway.curve(key), baseline.curve(key))
        if steps:
            diff_ax.plot(steps, diff, marker=marker, markersize=4, linewidth=1.2, label=label)
    diff_ax.axhline(0.0, color="black", linewidth=0.8)
    diff_ax.set(xlabel="optimizer step", ylabel="loss difference", title=f"{highway.name} minus {baseline.name}")
    if has_accuracy:
        axes[2].set(xlabel="optimizer step", ylabel="eval accuracy", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


__all__ = [
    "RunResult",
    "StepTimer",
    "compare_with_backprop",
    "default_comparison_dir",
    "result_of",
    "run_label",
    "train_and_evaluate",
    "write_comparison",
]
