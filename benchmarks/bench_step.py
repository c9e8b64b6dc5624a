#!/usr/bin/env python
"""Time and peak memory of one training step: plain backprop against Highway-BP(k), side by side.

For each model, the methods run round-robin (the order rotates every round) on the same model and batch,
so machine noise hits them alike; the table reports medians. Peak memory is the process's peak resident
set during the step (Linux VmHWM, reset before each step; freed heap is trimmed first) above its resident
set before the step.

    python -m benchmarks.bench_step                      # GPT-2 and Llama, k = 0 1 2 4, 7 rounds
    python -m benchmarks.bench_step --models gpt2 --rounds 3 --ks 0 2
    python -m benchmarks.bench_step --ks 1 2 --exact --output_dir results/step/exact_steps

``--exact`` adds the steps whose gradient is exact: "exact" (k = L, run as the model's own backward, the default),
"exact-engine" (k = L through the Highway engine, as before exact steps went to autograd) and "auto" (k = 'auto':
up to L iterations with the adaptive stop at its default tolerance).

Cost model (docs/algorithm.md): backprop costs F + B, Highway-BP(k) costs F + k * B_in + B_par. F and B are
measured here (forward alone; step minus forward); B_par ~ B and B_in ~ B / 2 (an input-only sweep skips
the weight-gradient matmuls, about half of a backward's FLOPs) give the predicted ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_hwbp
from hf_hwbp.planner.memory import PeakMemory
from hf_hwbp.training_config import AUTO_DEFAULT_TOL

MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_layer=8,
            n_embd=256,
            n_head=8,
            vocab_size=8192,
            n_positions=256,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=8,
            hidden_size=256,
            intermediate_size=688,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=8192,
            max_position_embeddings=256,
        )
    ),
}


def measure_step(model, batch) -> tuple[float, float, float]:
    """(step seconds, forward seconds, peak MiB above the pre-step resident set) of one training step."""
    model.zero_grad(set_to_none=True)
    with PeakMemory("cpu") as peak:
        start = time.perf_counter()
        loss = model(**batch).loss
        forward = time.perf_counter() - start
        loss.backward()
        step = time.perf_counter() - start
    return step, forward, peak.mib


def bench_model(
    name: str, ks: list[int], rounds: int, batch_size: int, seq_len: int, seed: int, exact: bool = False
) -> list[dict]:
    torch.manual_seed(seed)
    model = MODELS[name]().train()
    num_layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": ids, "labels": ids}
    methods = ["backprop"] + [f"k={k}" for k in ks] + (["exact", "exact-engine", "auto"] if exact else [])
    iterations: dict[str, list[int | None]] = {m: [] for m in methods}

    def run(method: str):
        if method == "backprop":
            hf_hwbp.unpatch_model(model)
        elif method in ("exact", "exact-engine"):
            hf_hwbp.patch_model(model, k=num_layers)
            hf_hwbp.highway_state(model).exact_steps_by_autograd = method == "exact"
        elif method == "auto":
            hf_hwbp.patch_model(model, k=num_layers, tol=AUTO_DEFAULT_TOL)  # what k='auto' resolves to
        else:
            hf_hwbp.patch_model(model, k=int(method[2:]))
        sample = measure_step(model, batch)
        if method != "backprop":
            iterations[method].append(hf_hwbp.last_highway_iterations(model))
        return sample

    for method in methods:  # warm-up: allocator, kernels, lazy init
        run(method)
    samples = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for method in order:
            samples[method].append(run(method))
        print(f"  {name}: round {r + 1}/{rounds} done", file=sys.stderr)
    hf_hwbp.unpatch_model(model)
    bp_step = statistics.median(s[0] for s in samples["backprop"])
    bp_fwd = statistics.median(s[1] for s in samples["backprop"])
    bp_peak = statistics.median(s[2] for s in samples["backprop"])
    backward = bp_step - bp_fwd
    rows = []
    for method in methods:
        step = statistics.median(s[0] for s in samples[method])
        peak = statistics.median(s[2] for s in samples[method])
        ran = [i for i in iterations[method] if i is not None]
        k_eff = statistics.median(ran) if ran else 0
        model_ratio = 1.0 if method in ("backprop", "exact") else (bp_fwd + k_eff * backward / 2 + backward) / bp_step
        rows.append(
            dict(
                model=name,
                method=method,
                layers=num_layers,
                step_s=step,
                ratio=step / bp_step,
                cost_model_ratio=model_ratio,
                peak_mib=peak,
                peak_ratio=peak / bp_peak,
                steps=[s[0] for s in samples[method]],
                iterations=iterations[method],
            )
        )
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | method | iterations | median step (s) | ratio to backprop | cost-model ratio | peak MiB "
        "| peak ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ran = sorted({i for i in r.get("iterations", []) if i is not None})
        its = "-" if not ran else "/".join(map(str, ran))
        lines.append(
            f"| {r['model']} (L={r['layers']}) | {r['method']} | {its} | {r['step_s']:.3f} | {r['ratio']:.2f}x | "
            f"{r['cost_model_ratio']:.2f}x | {r['peak_mib']:.0f} | {r['peak_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4])
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per method (median reported)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true", help="also time exact steps (k = L) and k='auto'")
    parser.add_argument("--output_dir", default="results/step")
    args = parser.parse_args(argv)
    if any(k < 0 for k in args.ks):
        parser.error("--ks must be >= 0")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.ks, args.rounds, args.batch_size, args.seq_len, args.seed, args.exact)
    table = to_markdown(rows)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command=" ".join(["python", "-m", "benchmarks.bench_step"] + (argv if argv is not None else sys.argv[1:])),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor(),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    (out / "bench_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / "bench_step.md").write_text(
        f"`{meta['command']}` (torch {meta['torch']}, {meta['threads']} threads)\n\n" + table + "\n"
    )
    return rows


if __name__ == "__main__":
    main()
