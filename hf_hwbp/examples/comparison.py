"""Highway-BP against plain backprop on the same model, seed and data: the example scripts' ``--compare_backprop``.

The baseline trains in ``<comparison_dir>/backprop`` and the comparison (``loss_curves.png``, ``comparison.md``,
``comparison.json``) is written to ``comparison_dir`` (default ``<output_dir>-comparison``): beside the Highway-BP
model's folder, never inside it, so ``push_to_hub`` of that folder uploads the model alone.

Step time is not taken from the two training runs: they run one after the other, and on a machine shared with other
work their step times say more about the load than about the methods. After training, both models run the same
training batch (forward and backward) in interleaved rounds, the order alternating every round; the comparison gives
each method's median and spread, the ratio of the medians with the spread of the per-round ratios, and the load
average before and after (``interleaved_step_times``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

from ..api import is_patched, patch_model, unpatch_model, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_TIMING_ROUNDS = 10


@dataclass
class RunResult:
    """One training run: its name, settings, final metrics and log history."""

    name: str
    output_dir: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    highway_k: int | str | None = None

    def mean_iterations(self) -> float | None:
        values = [entry["hwbp_iterations"] for entry in self.log_history if "hwbp_iterations" in entry]
        return sum(values) / len(values) if values else None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in self.log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def last_step(self) -> int:
        return max((entry["step"] for entry in self.log_history if "step" in entry), default=0)


@dataclass
class StepTiming:
    """Interleaved step times of the runs (seconds per forward + backward of one training batch)."""

    rounds: int
    seconds: dict[str, list[float]]  # run name -> one time per round
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    threads: int = field(default_factory=torch.get_num_threads)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratios(self, name: str, baseline: str) -> list[float]:
        """``name``'s time over ``baseline``'s, round by round (both ran in the same round)."""
        return [a / b for a, b in zip(self.seconds[name], self.seconds[baseline])]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "threads": self.threads,
            "load_average_before": list(self.load_before),
            "load_average_after": list(self.load_after),
            "seconds": self.seconds,
        }


def _highway_settings(args: TrainingArguments) -> tuple[bool, Any]:
    config = getattr(args, "highway_config", None)
    return bool(getattr(args, "use_highway_bp", False)), config


def run_label(args: TrainingArguments) -> str:
    enabled, config = _highway_settings(args)
    return f"highway_bp_k{config.k}" if enabled and config is not None else "backprop"


def result_of(trainer: Trainer, metrics: dict[str, float]) -> RunResult:
    """The RunResult of a trained (and evaluated) trainer."""
    enabled, config = _highway_settings(trainer.args)
    return RunResult(
        name=run_label(trainer.args),
        output_dir=trainer.args.output_dir,
        metrics=dict(metrics),
        log_history=list(trainer.state.log_history),
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


def _highway_engine_settings(trainer: Trainer) -> dict[str, Any] | None:
    """The engine settings the Highway run trained its first step with (its callback's), or None for backprop."""
    callback = getattr(trainer, "highway_callback", None)
    if callback is None or not callback.enabled or not callback.num_blocks:
        return None
    return callback.engine_config(0, callback.num_blocks, max(trainer.state.max_steps, 1)).to_dict()


def interleaved_step_times(trainers: dict[str, Trainer], rounds: int = DEFAULT_TIMING_ROUNDS) -> StepTiming:
    """Seconds per forward + backward of one training batch for each trained run, measured in ``rounds`` rounds
    that each time every run once (the order alternates every round), after one warm-up round.

    Every run uses the first batch of the first run's training data; a Highway run is patched with the settings
    it trained with (and unpatched again). Optimizer steps are left out: they are the same for both methods.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")
    first = next(iter(trainers.values()))
    batch = next(iter(first.get_train_dataloader()))
    steps: dict[str, Callable[[], None]] = {}
    patched: list[nn.Module] = []
    for name, trainer in trainers.items():
        model = trainer.model
        settings = _highway_engine_settings(trainer)
        if settings is not None and not is_patched(model):
            patch_model(unwrap_model(model), **settings)
            patched.append(model)
        steps[name] = _one_step(trainer, model, batch)
    try:
        for step in steps.values():  # warm-up: first calls allocate and compile what they need
            step()
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        load_before = os.getloadavg()
        names = list(steps)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                start = time.perf_counter()
                steps[name]()
                seconds[name].append(time.perf_counter() - start)
        load_after = os.getloadavg()
    finally:
        for model in patched:
            unpatch_model(model)
    return StepTiming(rounds, seconds, load_before, load_after)


def _one_step(trainer: Trainer, model: nn.Module, batch: dict) -> Callable[[], None]:
    def step() -> None:
        model.train()
        inputs = trainer._prepare_inputs(dict(batch))
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def compare_with_backprop(
    highway_trainer: Trainer,
    highway_metrics: dict[str, float],
    make_trainer: Callable[[TrainingArguments], Trainer],
    *,
    columns: list[tuple[str, str, str]],
    title: str,
    comparison_dir: str | None = None,
    timing_rounds: int = DEFAULT_TIMING_ROUNDS,
    extra_eval: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, str]:
    """Train the baseline with plain backprop, time both runs interleaved, write the comparison; return the paths.

    ``make_trainer(args)`` builds a fresh trainer (and model) for the baseline's arguments: the same arguments with
    ``use_highway_bp=False`` and ``output_dir=<comparison_dir>/backprop``. The seed is set before it is called,
    so a model built from a config gets the Highway run's initial weights.
    """
    args = highway_trainer.args
    comparison_dir = comparison_dir or default_comparison_dir(args.output_dir)
    baseline_args = dataclasses.replace(args, use_highway_bp=False, output_dir=os.path.join(comparison_dir, "backprop"))
    set_seed(baseline_args.seed)
    baseline = make_trainer(baseline_args)
    logger.info(f"*** Baseline: plain backprop -> {baseline_args.output_dir} ***")
    n_train = len(baseline.train_dataset) if baseline.train_dataset is not None else None
    n_eval = len(baseline.eval_dataset) if baseline.eval_dataset is not None else None
    baseline_metrics = train_and_evaluate(baseline, n_train, n_eval, extra_eval)
    results = [result_of(highway_trainer, highway_metrics), result_of(baseline, baseline_metrics)]
    logger.info(f"*** Step time: {timing_rounds} interleaved rounds ***")
    timing = interleaved_step_times({results[0].name: highway_trainer, results[1].name: baseline}, timing_rounds)
    if not args.should_save:
        return {}
    paths = write_comparison(results, comparison_dir, columns=columns, title=title, timing=timing)
    with open(paths["markdown"], encoding="utf-8") as f:
        print(f.read())
    return paths


def timing_text(timing: StepTiming, results: list[RunResult]) -> list[str]:
    """Markdown lines: each run's median step time and spread, the ratio to the baseline (the last run), the load."""
    baseline = results[-1].name
    lines = [
        "| run | forward + backward, median (s) | min - max (s) | vs backprop: ratio of medians | per-round ratios, "
        "min - max |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        times = timing.seconds[result.name]
        ratios = timing.ratios(result.name, baseline)
        lines.append(
            f"| {result.name} | {timing.median(result.name):.4f} | {min(times):.4f} - {max(times):.4f} | "
            f"{timing.median(result.name) / timing.median(baseline):.2f}x | {min(ratios):.2f} - {max(ratios):.2f} |"
        )
    before = ", ".join(f"{x:.2f}" for x in timing.load_before)
    after = ", ".join(f"{x:.2f}" for x in timing.load_after)
    lines += [
        "",
        f"Measured after training on one batch, {timing.rounds} rounds, the methods interleaved (order alternating), "
        f"{timing.threads} thread(s); load average (1, 5, 15 min) {before} before and {after} after, on "
        f"{os.cpu_count()} CPU(s). A load above the number of CPUs makes these times noisy: read the ratio with its "
        "spread. One device and no layer parallelism: Highway-BP(k) does k extra input-only backward sweeps here, so "
        "it is not expected to be faster (the cost model in hf_hwbp's docs/algorithm.md).",
    ]
    return lines


def write_comparison(
    results: list[RunResult],
    output_dir: str,
    columns: list[tuple[str, str, str]],
    title: str,
    timing: StepTiming | None = None,
) -> dict[str, str]:
    """``loss_curves.png``, ``comparison.md`` and ``comparison.json`` of runs (the last one is the baseline).

    ``columns``: (header, metrics key, format spec) of the metrics to tabulate; ``timing``: their interleaved step
    times, if measured.
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

    fig = plot_runs(plt, results, title)
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)

    header = ["run", "k", "mean iterations"] + [c[0] for c in columns]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for result in results:
        iterations = result.mean_iterations()
        cells = [
            result.name,
            "-" if result.highway_k is None else str(result.highway_k),
            "-" if iterations is None else f"{iterations:.2f}",
        ]
        cells += [_fmt(result.metrics.get(key), spec) for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(
            {
                "run": result.name,
                "output_dir": result.output_dir,
                "k": result.highway_k,
                "mean_iterations": iterations,
                "metrics": result.metrics,
            }
        )
    if timing is not None:
        lines += ["", "## Step time", "", *timing_text(timing, results)]
    lines += ["", f"Loss curves: {os.path.basename(paths['png'])}", ""]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"runs": rows, "step_time": timing.as_dict() if timing is not None else None}, f, indent=2)
    return paths


# The Highway run a solid line, the backprop baseline dashed, in colours that stay apart where the curves overlap; the
# difference panel draws train and eval in colours of its own (it shows one difference, not the two runs).
_STYLES = ({"color": "tab:orange", "linestyle": "-"}, {"color": "tab:blue", "linestyle": "--"})
_MARKERS = ({"marker": "o", "markersize": 4}, {"marker": "s", "markersize": 7, "fillstyle": "none"})  # both visible
_DIFFERENCE_STYLES = {
    "loss": {"color": "black", "linestyle": "-", "marker": ".", "label": "train loss"},
    "eval_loss": {"color": "tab:green", "linestyle": "--", "marker": "o", "markersize": 4, "label": "eval loss"},
}


def _difference(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> tuple[list[int], list[float]]:
    """``a - b`` at the steps both curves have."""
    other = dict(zip(*b))
    points = [(step, value - other[step]) for step, value in zip(*a) if step in other]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(plt, results: list[RunResult], title: str):
    """The comparison figure: loss curves (train and eval), Highway minus backprop, and accuracy when the runs logged
    it. Every panel spans the whole run (step 0 to the last), whatever the number of logged points."""
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
    for key, style in _DIFFERENCE_STYLES.items():
        steps, diff = _difference(highway.curve(key), baseline.curve(key))
        if steps:
            diff_ax.plot(steps, diff, linewidth=1.2, **style)
    diff_ax.axhline(0.0, color="grey", linewidth=0.8)
    diff_ax.set(xlabel="optimizer step", ylabel="loss difference", title=f"{highway.name} minus {baseline.name}")
    if has_accuracy:
        axes[2].set(xlabel="optimizer step", ylabel="eval accuracy", title="accuracy", ylim=(0.0, 1.0))
    last_step = max(result.last_step for result in results)
    for ax in axes:
        ax.set_xlim(0, max(last_step, 1))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


__all__ = [
    "DEFAULT_TIMING_ROUNDS",
    "RunResult",
    "StepTiming",
    "compare_with_backprop",
    "default_comparison_dir",
    "interleaved_step_times",
    "plot_runs",
    "result_of",
    "run_label",
    "timing_text",
    "train_and_evaluate",
    "write_comparison",
]
