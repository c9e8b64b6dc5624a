"""What the planner found: the table, the recommendation, and the files ``--output_dir`` gets.

A ``Row`` is one way to train the same batch: a mode (one device, DDP over N, FSDP2 over N, layer-parallel over S
stages with M micro-batches), its backprop step, the Highway-BP(k) step for each k, and whether the numbers were
measured here or predicted by the simulator from costs measured here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers.utils import logging

from ..parallel.baselines import SCHEDULE_LABELS as TORCH_SCHEDULE_LABELS
from .evidence import SOURCE, KEvidence

logger = logging.get_logger(__name__)

MEASURED, PREDICTED = "measured", "predicted"
SCHEDULE_LABELS = {"pipeline": "pipeline backprop (hf_hwbp runtime)", **TORCH_SCHEDULE_LABELS}


@dataclass
class Row:
    """One mode of training the batch. ``highway_s`` maps k to seconds per step; ``peak_mib`` maps "backprop" and
    "k=<k>" to the step's peak memory (measured rows only)."""

    mode: str
    source: str
    backprop_s: float | None
    highway_s: dict[int, float] = field(default_factory=dict)
    backprop_label: str = ""
    peak_mib: dict[str, float | None] = field(default_factory=dict)
    note: str = ""
    devices: int = 1

    def ratio(self, k: int) -> float | None:
        """Highway-BP(k)'s step over backprop's (below 1: Highway-BP faster)."""
        if self.backprop_s is None or k not in self.highway_s:
            return None
        return self.highway_s[k] / self.backprop_s

    def to_json(self) -> dict:
        data = asdict(self)
        data["highway_s"] = {str(k): v for k, v in self.highway_s.items()}
        data["ratio"] = {str(k): self.ratio(k) for k in self.highway_s}
        return data


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(rows: list[Row], ks: list[int]) -> str:
    """The markdown table: mode, source, backprop step, Highway-BP step per k, ratio per k, peak memory."""
    k_cols = " | ".join(f"k = {k}" for k in ks)
    ratio = " / ".join(str(k) for k in ks)
    head = f"| mode | source | backprop step | {k_cols} | ratio to backprop (k = {ratio}) | peak MiB (backprop / k) |"
    lines = [head, "|---|---|---|" + "---:|" * len(ks) + "---|---|"]
    for row in rows:
        label = f" ({row.backprop_label})" if row.backprop_label else ""
        steps = " | ".join(_seconds(row.highway_s.get(k)) for k in ks)
        ratios = " / ".join(_times(row.ratio(k)) for k in ks)
        peaks = "-"
        if any(v is not None for v in row.peak_mib.values()):
            peaks = " / ".join(_mib(row.peak_mib.get(name)) for name in ["backprop", *(f"k={k}" for k in ks)])
        lines.append(
            f"| {row.mode} | {row.source} | {_seconds(row.backprop_s)}{label} | {steps} | {ratios} | {peaks} |"
        )
    return "\n".join(lines)


@dataclass
class Plan:
    """The planner's answer for one model and batch shape on this machine (``hf_hwbp.plan``'s result).

    ``print(plan)`` shows the table and the recommendation; ``plan.save(folder)`` writes plan.json, plan.md and
    the map's plot.
    """

    setup: dict
    ks: list[int]
    rows: list[Row]
    evidence: KEvidence
    recommendation: str
    notes: list[str] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    speedup_map: list[dict] = field(default_factory=list)
    map_basis: str = ""
    costs: dict = field(default_factory=dict)
    link: dict | None = None
    extras: dict = field(default_factory=dict)

    def table(self) -> str:
        """The table, then what each row's numbers are (its note), one line per row that has one."""
        said = [f"- {row.mode} ({row.source}): {row.note}" for row in self.rows if row.note]
        return "\n".join([table(self.rows, self.ks), "", *said]).rstrip()

    def __str__(self) -> str:
        return f"{self.table()}\n\n{self.recommendation}"

    def to_json(self) -> dict:
        data = asdict(self)
        data["rows"] = [row.to_json() for row in self.rows]
        return data

    def markdown(self) -> str:
        setup = self.setup
        lines = [
            f"# Highway-BP plan: {setup['model']}",
            "",
            f"`{setup['command']}`" if setup.get("command") else "",
            "",
            f"{setup['description']}",
            "",
            self.table(),
            "",
            f"**{self.recommendation}**",
            "",
            f"k: {self.evidence.why} ({SOURCE}).",
            "",
        ]
        if self.notes:
            lines += ["Notes:", "", *(f"- {n}" for n in self.notes), ""]
        if self.validation:
            errors = [v["error"] for v in self.validation]
            within = sum(abs(e) <= 0.10 for e in errors)
            lines += [
                "## Predictions against measurements",
                "",
                f"{within} of {len(errors)} within 10 % (largest error {100 * max(map(abs, errors)):.1f} %).",
                "",
                "| mode | method | measured | predicted | error |",
                "|---|---|---:|---:|---:|",
            ]
            lines += [
                f"| {v['mode']} | {v['method']} | {v['measured_s']:.4f} s | {v['predicted_s']:.4f} s | "
                f"{100 * v['error']:+.1f} % |"
                for v in self.validation
            ]
            lines.append("")
        if self.speedup_map:
            lines += [
                "## Layer-parallel map (predicted)",
                "",
                f"Speed-up of Highway-BP(k) over the fastest backprop schedule torch can run there (above 1: Highway "
                f"faster), k = {' / '.join(str(k) for k in self.ks)}. {self.map_basis}",
                "",
                "| stages S | micro-batches M | speed-up | best backprop schedule |",
                "|---:|---:|---|---|",
            ]
            for cell in self.speedup_map:
                speed = " / ".join(f"{cell['speedup'][str(k)]:.2f}" for k in self.ks)
                name = SCHEDULE_LABELS.get(cell["best_backprop"], cell["best_backprop"])
                lines.append(f"| {cell['S']} | {cell['M']} | {speed} | {name}, {cell['best_backprop_s']:.3f} s |")
            lines.append("")
        if self.costs:
            lines += [
                "## Per-layer costs measured here (ms per layer, one micro-batch)",
                "",
                "f forward, b full backward, v Highway inflow (input-only VJP), w Highway parameter VJP, bi / bw "
                "torch's zero-bubble split; head and embeddings whole.",
                "",
                "| costs | samples | f | b | v | w | bi | bw | head f+b | embeddings f+b |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, costs in self.costs.items():
                for samples, c in sorted(costs["by_batch"].items(), key=lambda item: int(item[0])):
                    cells = " | ".join(f"{1e3 * c[k]:.2f}" for k in ("f", "b", "v", "w", "bi", "bw"))
                    lines.append(
                        f"| {name} | {samples} | {cells} | {1e3 * (c['head_f'] + c['head_b']):.2f} | "
                        f"{1e3 * (c['embed_f'] + c['embed_b']):.2f} |"
                    )
            lines.append("")
        if self.link:
            link = self.link
            lines += [
                f"## Link ({link['world_size']} processes, {link['backend']})",
                "",
                f"Point-to-point: {1e6 * link['latency']:.0f} us latency, "
                f"{_bandwidth(link['seconds_per_byte'])}; all-reduce: {1e6 * link['all_reduce']['latency']:.0f} us + "
                f"{_bandwidth(link['all_reduce']['seconds_per_byte'])}; all-gather: "
                f"{1e6 * link['all_gather']['latency']:.0f} us + {_bandwidth(link['all_gather']['seconds_per_byte'])}.",
                "",
            ]
        return "\n".join(lines)

    def save(self, output_dir: str | Path) -> list[Path]:
        """Write plan.json, plan.md and plan_map.png (the plot needs matplotlib: ``pip install 'hf_hwbp[plots]'``;
        without it a note says so and the other files are still written). Returns the files written."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if self.speedup_map:
            png = out / "plan_map.png"
            try:
                plot_map(self.speedup_map, self.ks, png, self.setup["model"])
                written.append(png)
            except ImportError:
                message = "plan_map.png not written: matplotlib is not installed (pip install 'hf_hwbp[plots]')."
                logger.warning(message)
                if message not in self.notes:
                    self.notes.append(message)
        (out / "plan.json").write_text(json.dumps(self.to_json(), indent=1))
        (out / "plan.md").write_text(self.markdown() + "\n")
        return [out / "plan.json", out / "plan.md", *written]


def _bandwidth(seconds_per_byte: float) -> str:
    if seconds_per_byte <= 0:
        return "bandwidth too high to resolve"
    return f"{1 / seconds_per_byte / 1e9:.2f} GB/s"


def recommend(rows: list[Row], evidence: KEvidence, cells: list[dict]) -> str:
    """One sentence: the fastest mode at the supported k, which k and why, and what would change it."""
    k = evidence.k
    measured_modes = {r.mode for r in rows if r.source == MEASURED}
    candidates = []
    for row in rows:
        if row.source == PREDICTED and (row.mode in measured_modes or row.mode == "one device"):
            continue  # a prediction of something measured: the measurement wins
        if row.backprop_s is not None:
            candidates.append((row.backprop_s, row, None))
        if k in row.highway_s:
            candidates.append((row.highway_s[k], row, k))
    seconds, row, best_k = min(candidates, key=lambda c: c[0])
    where = f"{row.mode} ({row.source})"
    if best_k is None:
        ratio = row.ratio(k)
        cost = f"; Highway-BP({k}) costs {ratio:.2f}x that there" if ratio is not None else ""
        first = f"Fastest here: {where} with backprop, {seconds:.3f} s per step{cost}"
    else:
        first = (
            f"Fastest here: {where} with Highway-BP({k}), {seconds:.3f} s per step, {1 / row.ratio(k):.2f}x faster "
            f"than its backprop ({row.backprop_label or 'eager'})"
        )
    use = f"use k = {k} ({evidence.why})"
    better = [c for c in cells if c["speedup"].get(str(k), 0) > 1]
    if better:
        top = max(better, key=lambda c: (round(c["speedup"][str(k)], 2), -c["S"]))
        micro = "micro-batch" if top["M"] == 1 else "micro-batches"
        change = (
            f"it would change with {top['S']} stages and {top['M']} {micro}: layer-parallel Highway-BP({k}) "
            f"predicted {top['speedup'][str(k)]:.2f}x faster than the best pipeline schedule "
            f"({SCHEDULE_LABELS[top['best_backprop']]})"
        )
    elif cells:
        most = max(c["S"] for c in cells)
        change = f"no layer-parallel set-up up to {most} stages is predicted faster with Highway-BP({k})"
    else:
        change = "no layer-parallel prediction for this model"
    return f"{first}; {use}; {change}."


def plot_map(cells: list[dict], ks: list[int], path: Path, title: str) -> None:
    """Heat maps of Highway-BP(k)'s speed-up over the best backprop schedule against stages and micro-batches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    stages = sorted({c["S"] for c in cells})
    micro = sorted({c["M"] for c in cells})
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.4), squeeze=False, layout="constrained")
    norm = TwoSlopeNorm(vmin=0.25, vcenter=1.0, vmax=4.0)
    image = None
    for ax, k in zip(axes[0], ks):
        grid = np.full((len(stages), len(micro)), np.nan)
        for c in cells:
            grid[stages.index(c["S"]), micro.index(c["M"])] = c["speedup"][str(k)]
        image = ax.imshow(grid, cmap="RdBu", norm=norm, origin="lower", aspect="auto")
        for i in range(len(stages)):
            for j in range(len(micro)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(micro)), micro)
        ax.set_yticks(range(len(stages)), stages)
        ax.set_xlabel("micro-batches M")
        ax.set_ylabel("stages S")
        ax.set_title(f"Highway-BP k={k}", fontsize=9)
    fig.suptitle(f"{title}: speed-up over the best backprop schedule (>1: Highway faster)", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["MEASURED", "PREDICTED", "SCHEDULE_LABELS", "Plan", "Row", "plot_map", "recommend", "table"]
