"""Gradient fidelity of Highway-BP(k) against exact backprop, by model, depth and k, at init and after training.

For every model (GPT-2, Llama, ViT) and depth L, a small float64 model is built from a config (random init).
On one fixed measurement batch (validation data) the Highway-BP(k) gradient is compared with the exact gradient
(``hf_hwbp.fidelity.measure_fidelity``: same batch, same RNG state), overall (every trainable parameter,
embeddings and head included) and per Highway block, for each k in ``--ks`` (``L`` = the depth; k > L skipped).
Then the model is trained with ordinary backprop (Adam) for ``--train_steps`` steps on the embedded corpus
(GPT-2, Llama) or the digits images (ViT) and measured again on the same batch.

Outputs in ``--output_dir``: ``fidelity.jsonl`` (one record per model, depth and state, appended as it
finishes), ``fidelity.json`` (all records), ``fidelity.md`` (tables) and ``fidelity_vs_k.png`` /
``per_block.png`` (plots).

Example (the committed run, see results/README.md):
    python -m benchmarks.bench_fidelity --output_dir results/fidelity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import hf_hwbp
from benchmarks._bench_common import (
    MODEL_NAMES,
    append_jsonl,
    batch_order,
    build_model,
    digits_data,
    lm_data,
    loss_of,
    machine_note,
    read_jsonl,
    set_threads,
    warmup_cosine,
)
from hf_hwbp.fidelity import measure_fidelity


def parse_ks(tokens: list[str], depth: int) -> list[int]:
    """The k values for one depth: integers <= depth, and ``L`` (= depth); sorted, no duplicates."""
    ks = set()
    for token in tokens:
        k = depth if token.upper() == "L" else int(token)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k <= depth:
            ks.add(k)
    return sorted(ks)


def load_data(name: str, args) -> dict:
    if name == "vit":
        x_train, y_train, x_val, y_val = digits_data()
        x_train, x_val = x_train.double(), x_val.double()
        n = args.vit_batch_size
        return {"train": (x_train, y_train), "measure": (x_val[:n], y_val[:n]), "batch_size": n}
    train, val, vocab = lm_data(args.block_size, args.vocab_size)
    n = args.lm_batch_size
    return {"train": (train, train), "measure": (val[:n], val[:n]), "batch_size": n, "vocab_size": vocab}


def measure_all(model, ks: list[int], batch) -> list[dict]:
    rows = []
    for k in ks:
        hf_hwbp.set_highway_k(model, k)
        report = measure_fidelity(model, lambda m: loss_of(m, batch))
        rows.append(
            {
                "k": k,
                "effective_k": report.k,
                "iterations": report.iterations,
                "cosine": report.cosine,
                "rel_error": report.rel_error,
                "per_block_cosine": report.per_block_cosine,
                "per_block_rel_error": report.per_block_rel_error,
            }
        )
    return rows


def train_backprop(model, data: dict, steps: int, lr: float, seed: int) -> list[float]:
    """Ordinary backprop (inside exact_backprop) with Adam; returns the training losses."""
    x, y = data["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, max(1, steps // 10)))
    losses = []
    with hf_hwbp.exact_backprop(model):
        for idx in batch_order(len(x), data["batch_size"], steps, seed=1000 + seed):
            loss = loss_of(model, (x[idx], y[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return losses


def run(args) -> list[dict]:
    out = args.output_dir
    records = []
    for name in args.models:
        data = load_data(name, args)
        for depth in args.depths:
            ks = parse_ks(args.ks, depth)
            t0 = time.perf_counter()
            model = build_model(
                name,
                depth,
                hidden=args.hidden,
                heads=args.heads,
                vocab_size=data.get("vocab_size", args.vocab_size),
                block_size=args.block_size,
                seed=args.seed,
                dtype=torch.float64,
            )
            hf_hwbp.patch_model(model, 0)
            assert hf_hwbp.highway_state(model).num_blocks == depth
            batch = data["measure"]
            for state in ("init", "trained"):
                train_losses = []
                if state == "trained":
                    if args.train_steps <= 0:
                        break
                    train_losses = train_backprop(model, data, args.train_steps, args.lr, args.seed)
                with torch.no_grad():
                    loss = loss_of(model, batch).item()
                record = {
                    "model": name,
                    "depth": depth,
                    "state": state,
                    "train_steps": args.train_steps if state == "trained" else 0,
                    "measure_loss": loss,
                    "train_loss_first_last": [train_losses[0], train_losses[-1]] if train_losses else None,
                    "hidden": args.hidden,
                    "dtype": "float64",
                    "results": measure_all(model, ks, batch),
                    "elapsed_s": time.perf_counter() - t0,
                }
                append_jsonl(out / "fidelity.jsonl", record)
                records.append(record)
                cos = ", ".join(f"k={r['k']}: {r['cosine']:.6f}" for r in record["results"])
                print(f"[{name} L={depth} {state}] loss {loss:.4f} cosine {cos}", flush=True)
    return records


# ----- reporting -------------------------------------------------------------------------------------------------
def latest_records(records: list[dict]) -> list[dict]:
    """One record per (model, depth, state): the last one written."""
    by_key = {(r["model"], r["depth"], r["state"]): r for r in records}
    order = {m: i for i, m in enumerate(MODEL_NAMES)}
    return [by_key[k] for k in sorted(by_key, key=lambda k: (order.get(k[0], 99), k[1], k[2]))]


def markdown(records: list[dict]) -> str:
    lines = []
    for state in ("init", "trained"):
        rows = [r for r in records if r["state"] == state]
        if not rows:
            continue
        all_k = sorted({x["k"] if x["k"] < r["depth"] else -1 for r in rows for x in r["results"]})
        k_cols = [k for k in all_k if k >= 0] + [-1]
        title = "at initialization" if state == "init" else f"after {rows[0]['train_steps']} steps of backprop (Adam)"
        for metric, label in (("cosine", "cosine similarity"), ("rel_error", "relative error")):
            lines.append(f"### Overall gradient {label}, {title}\n")
            lines.append("| model | L | loss | " + " | ".join("k=L" if k < 0 else f"k={k}" for k in k_cols) + " |")
            lines.append("|---|---|---|" + "---|" * len(k_cols))
            for r in rows:
                values = {x["k"] if x["k"] < r["depth"] else -1: x[metric] for x in r["results"]}
                cells = []
                for k in k_cols:
                    v = values.get(k)
                    if v is None:
                        cells.append("")
                    elif metric == "cosine":
                        cells.append(f"{v:.6f}" if v < 0.999999 else f"1 - {max(1 - v, 0):.1e}")
                    else:
                        cells.append(f"{v:.2e}")
                lines.append(f"| {r['model']} | {r['depth']} | {r['measure_loss']:.3f} | " + " | ".join(cells) + " |")
            lines.append("")
        # per-block summary: worst (lowest) block cosine and the bottom block
        lines.append(f"### Per-block cosine, {title}: min over blocks / bottom block (block 0)\n")
        lines.append("| model | L | " + " | ".join("k=L" if k < 0 else f"k={k}" for k in k_cols) + " |")
        lines.append("|---|---|" + "---|" * len(k_cols))
        for r in rows:
            values = {x["k"] if x["k"] < r["depth"] else -1: x["per_block_cosine"] for x in r["results"]}
            cells = []
            for k in k_cols:
                v = values.get(k)
                cells.append(f"{min(v):.4f} / {v[0]:.4f}" if v else "")
            lines.append(f"| {r['model']} | {r['depth']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODEL_NAMES if any(r["model"] == m for r in records)]
    depths = sorted({r["depth"] for r in records})
    cmap = plt.get_cmap("viridis")
    colors = {d: cmap(i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}

    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        for r in records:
            if r["model"] != model:
                continue
            ks = [x["k"] for x in r["results"]]
            style = dict(color=colors[r["depth"]], marker="o", ms=3)
            style["linestyle"] = "-" if r["state"] == "trained" else "--"
            label = f"L={r['depth']} {r['state']}"
            axes[0][col].plot(ks, [x["cosine"] for x in r["results"]], label=label, **style)
            axes[1][col].plot(ks, [max(x["rel_error"], 1e-17) for x in r["results"]], label=label, **style)
        axes[0][col].set_title(f"{model}: cosine(Highway-BP(k), exact)")
        axes[1][col].set_title(f"{model}: relative error (log)")
        axes[1][col].set_yscale("log")
        for row in range(2):
            axes[row][col].set_xscale("symlog", linthresh=4)
            axes[row][col].set_xlabel("k (Highway iterations; last point of each line: k = L, exact)")
            axes[row][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.suptitle("Gradient fidelity vs k (solid: after backprop training, dashed: at init; float64)")
    fig.tight_layout()
    fig.savefig(out / "fidelity_vs_k.png", dpi=110)
    plt.close(fig)

    # per-block panel: the deepest model of each kind, trained (else init)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for col, model in enumerate(models):
        candidates = [r for r in records if r["model"] == model]
        deepest = max(r["depth"] for r in candidates)
        chosen = [r for r in candidates if r["depth"] == deepest]
        r = next((x for x in chosen if x["state"] == "trained"), chosen[0])
        kmap = plt.get_cmap("plasma")
        for i, x in enumerate(r["results"]):
            axes[0][col].plot(
                range(len(x["per_block_cosine"])),
                x["per_block_cosine"],
                color=kmap(i / max(1, len(r["results"]) - 1)),
                label=f"k={x['k']}",
            )
        axes[0][col].set_title(f"{model} L={deepest} ({r['state']}): per-block cosine")
        axes[0][col].set_xlabel("block (0 = bottom)")
        axes[0][col].set_ylabel("cosine")
        axes[0][col].grid(alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "per_block.png", dpi=110)
    plt.close(fig)


def report(out: Path) -> list[dict]:
    records = latest_records(read_jsonl(out / "fidelity.jsonl"))
    (out / "fidelity.json").write_text(json.dumps(records, indent=1))
    (out / "fidelity.md").write_text(markdown(records))
    if records:
        plot(records, out)
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--ks", nargs="+", default=["0", "1", "2", "3", "4", "8", "L"], help="ints and/or L")
    parser.add_argument("--train_steps", type=int, default=150, help="backprop steps before the 2nd measurement")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--lm_batch_size", type=int, default=8)
    parser.add_argument("--vit_batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", type=Path, default=Path("results/fidelity"))
    parser.add_argument("--report_only", action="store_true", help="rebuild json/md/png from fidelity.jsonl")
    parser.add_argument("--smoke", action="store_true", help="tiny: depths 2 3, hidden 16, 2 train steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.depths, args.hidden, args.heads, args.train_steps = [2, 3], 16, 2, 2
        args.block_size, args.lm_batch_size, args.vit_batch_size = 16, 2, 4
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        set_threads(args.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        note = machine_note(args.threads) | {"argv": sys.argv if argv is None else ["bench_fidelity.py", *argv]}
        append_jsonl(args.output_dir / "machine.jsonl", note)
        run(args)
    records = report(args.output_dir)
    print((args.output_dir / "fidelity.md").read_text(), flush=True)
    return records


if __name__ == "__main__":
    main()
