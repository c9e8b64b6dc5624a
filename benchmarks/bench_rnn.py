"""Training-step time and peak memory of ``HighwayGRU`` / ``HighwayLSTM`` (Highway-BP(k) through time) against
``torch.nn.GRU`` / ``torch.nn.LSTM`` (``--cell gru``, the default, or ``--cell lstm``).

One step = forward + backward of a GRU (or LSTM) layer (same weights) on x [T, B, H] that requires grad (as under an
embedding or another layer), with a loss on every step's output. Methods are interleaved round-robin (every round
runs each method once, so machine load hits all alike); the median over rounds is reported, with the ratio to
``nn.GRU`` measured in the same run. Peak memory: on CPU the peak resident-set growth of one step (after a warm-up
step) in a fresh subprocess whose large allocations glibc maps and unmaps one by one (so the resident set follows
the live tensors); on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the step.

CPU (the committed tables; run each T with no other timing job running, threads = the machine's 2 cores):
    python -m benchmarks.bench_rnn --seq_lens 1024 --output_dir results/rnn/step_cpu --tag T1024
GPU (against cuDNN; one command, a couple of minutes on an H100, results in the given folder):
    python -m benchmarks.bench_rnn --device cuda --output_dir results/rnn/step_cuda --tag h100
Summary of everything in a folder:
    python -m benchmarks.bench_rnn --summarize_only --output_dir results/rnn/step_cpu
LSTM (CPU):
    python -m benchmarks.bench_rnn --cell lstm --ks 0 1 2 --output_dir results/rnn/lstm/step_cpu --tag lstm
The map (GRU and LSTM, T in {256, 1024, 4096, 8192} x B in {1, 16, 64} x H in {64, 256, 512}, k = 1 and 2,
1 and 2 threads; on a quiet machine, hours: see docs/recurrent.md), and a few-minute subset of it:
    python -m benchmarks.bench_rnn --grid map --output_dir results/rnn/map_cpu --tag map
    python -m benchmarks.bench_rnn --grid quick --output_dir results/rnn/map_cpu_quick --tag quick
Any list given explicitly overrides the grid's (``--grid map --seq_lens 256 1024`` runs the map's other axes at
those two lengths). Every configuration records the load average before and after it; ``summary.md`` /
``summary.json`` hold the tables and the map (ratio of each Highway method to torch's module, per cell).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks._bench_common import append_jsonl, read_jsonl, set_threads
from hf_hwbp.rnn import HighwayGRU, HighwayLSTM

GRIDS = {
    # the committed GRU/LSTM step tables (the defaults before grids existed)
    "default": {"cells": ["gru"], "seq_lens": [256, 1024, 4096], "batch_sizes": [8, 32], "hidden_sizes": [64, 256],
                "ks": [0, 1, 2, 4], "threads": [2]},
    # the map: where Highway-BP through time wins and loses against torch's fused modules
    "map": {"cells": ["gru", "lstm"], "seq_lens": [256, 1024, 4096, 8192], "batch_sizes": [1, 16, 64],
            "hidden_sizes": [64, 256, 512], "ks": [1, 2], "threads": [1, 2]},
    # a corner of the map that runs in a few minutes on 2 cores
    "quick": {"cells": ["gru", "lstm"], "seq_lens": [256, 1024], "batch_sizes": [1, 16], "hidden_sizes": [64],
              "ks": [1, 2], "threads": [1, 2]},
}  # fmt: skip


@dataclass
class BenchArguments:
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (compares against cuDNN's GRU / LSTM)"})
    grid: str = field(default="default", metadata={"help": "default, map or quick: the lists not given explicitly"})
    cell: str = field(default="", metadata={"help": "gru, lstm or both (default: the grid's)"})
    seq_lens: list[int] | None = field(default=None)
    batch_sizes: list[int] | None = field(default=None)
    hidden_sizes: list[int] | None = field(default=None)
    ks: list[int] | None = field(default=None)
    rounds: int = field(default=7, metadata={"help": "timed rounds (after one warm-up round); medians"})
    threads: list[int] | None = field(default=None, metadata={"help": "torch thread counts (CPU), each pinned"})
    clock: str = field(default="wall", metadata={"help": "wall, or cpu (process CPU time: steadier at 1 thread)"})
    dtype: str = field(default="float32")
    memory: bool = field(default=True, metadata={"help": "also measure the peak memory of one step"})
    check: bool = field(default=True, metadata={"help": "first check HighwayGRU(k=T) against nn.GRU's gradients"})
    output_dir: str = field(default="results/rnn/step_cpu")
    tag: str = field(default="run")
    summarize_only: bool = field(default=False)
    memory_probe: str = field(default="", metadata={"help": "internal: 'T,B,H,method' (one step in this process)"})

    def resolve(self) -> None:
        """Fill every list not given from ``grid``; check the choices."""
        if self.grid not in GRIDS:
            raise SystemExit(f"--grid must be one of {sorted(GRIDS)}, got {self.grid!r}.")
        preset = GRIDS[self.grid]
        for name in ("seq_lens", "batch_sizes", "hidden_sizes", "ks", "threads"):
            if getattr(self, name) is None:
                setattr(self, name, list(preset[name]))
        self.cells = {"": preset["cells"], "both": ["gru", "lstm"]}.get(self.cell, [self.cell])
        if any(c not in ("gru", "lstm") for c in self.cells):
            raise SystemExit(f"--cell must be gru, lstm or both, got {self.cell!r}.")
        if self.clock not in ("wall", "cpu"):
            raise SystemExit(f"--clock must be wall or cpu, got {self.clock!r}.")


def baseline(cell: str) -> str:
    """The torch module a cell is measured against: its method name."""
    return {"gru": "nn.GRU", "lstm": "nn.LSTM"}[cell]


def method_names(ks: list[int], cell: str = "gru") -> list[str]:
    return [baseline(cell)] + [f"k={k}" for k in ks]


def build(method: str, hidden: int, device: str, dtype: torch.dtype, seed: int = 0, cell: str = "gru") -> nn.RNNBase:
    torch.manual_seed(seed)
    if cell == "lstm":
        lstm = nn.LSTM(hidden, hidden, device=device, dtype=dtype)
        return lstm if method == "nn.LSTM" else HighwayLSTM.from_lstm(lstm, k=int(method.split("=")[1]))
    gru = nn.GRU(hidden, hidden, device=device, dtype=dtype)
    if method == "nn.GRU":
        return gru
    return HighwayGRU.from_gru(gru, k=int(method.split("=")[1]))


def make_step(module: nn.RNNBase, steps: int, batch: int, hidden: int, device: str, dtype: torch.dtype):
    """A closure running one forward + backward (loss on every step's output), like a training step."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(steps, batch, hidden, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    weights = torch.randn(steps, batch, hidden, device=device, dtype=dtype, generator=gen)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = module(x)
        (out * weights).sum().backward()

    return step


def gradient_check(device: str, cell: str = "gru") -> dict:
    """Relative error of HighwayGRU / HighwayLSTM (k = T) against torch's autograd on this device (float64, float32)."""
    found = {}
    for dtype in (torch.float64, torch.float32):
        steps, batch, hidden = 50, 4, 16
        reference = build(baseline(cell), hidden, device, dtype, cell=cell)
        highway = build(f"k={steps}", hidden, device, dtype, cell=cell)
        grads = []
        for module in (reference, highway):
            step = make_step(module, steps, batch, hidden, device, dtype)
            step()
            grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
        found[str(dtype)] = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    return found


def time_config(args: BenchArguments, steps: int, batch: int, hidden: int, dtype: torch.dtype, cell: str) -> dict:
    methods = method_names(args.ks, cell)
    closures = {m: make_step(build(m, hidden, args.device, dtype, cell=cell), steps, batch, hidden, args.device,
                             dtype) for m in methods}  # fmt: skip
    read = time.perf_counter if args.clock == "wall" else time.process_time
    cuda = args.device == "cuda"
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_index in range(args.rounds + 1):
        for method, step in closures.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1000
            else:
                begin = read()
                step()
                elapsed = read() - begin
            if round_index > 0:
                times[method].append(elapsed)
    medians = {m: statistics.median(v) for m, v in times.items()}
    return {"median_s": medians, "all_s": times}


def peak_memory(
    args: BenchArguments, steps: int, batch: int, hidden: int, method: str, cell: str = "gru", threads: int = 1
) -> float:
    """Peak memory (MiB) of one training step above what was allocated before it."""
    if args.device == "cuda":
        step = make_step(build(method, hidden, "cuda", getattr(torch, args.dtype), cell=cell), steps, batch,
                         hidden, "cuda", getattr(torch, args.dtype))  # fmt: skip
        step()  # lazy initialisations (cuDNN plans) happen once
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    probe = f"{steps},{batch},{hidden},{method}"
    command = [sys.executable, "-m", "benchmarks.bench_rnn", "--memory_probe", probe, "--dtype", args.dtype]
    command += ["--threads", str(threads), "--cell", cell]
    # Fixed mmap threshold: every block >= 128 KiB is its own mapping, returned to the OS when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    root = Path(__file__).resolve().parents[1]  # `-m benchmarks.bench_rnn` runs from the repository root
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=root)
    return float(result.stdout.strip().splitlines()[-1])


def run_memory_probe(args: BenchArguments) -> None:
    """In a fresh process: one warm-up step (library buffers, thread pools), then reset the resident-set high-water
    mark (Linux: ``/proc/self/clear_refs``) and print how far one more step raises it above the current RSS (MiB)."""
    steps, batch, hidden, method = args.memory_probe.split(",")
    dtype = getattr(torch, args.dtype)
    module = build(method, int(hidden), "cpu", dtype, cell=args.cells[0])
    step = make_step(module, int(steps), int(batch), int(hidden), "cpu", dtype)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    resident_before = _status_kib("VmRSS")
    step()
    print((_status_kib("VmHWM") - resident_before) / 1024)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _load(r: dict) -> float:
    """The larger of the 1-minute load averages before and after a measurement."""
    return max(float(r["loadavg_before"][0]), float(r.get("loadavg_after", r["loadavg_before"])[0]))


def summarize(out: Path) -> str:
    """The markdown tables of ``runs.jsonl`` (one set per cell) and the map, into ``summary.md`` and
    ``summary.json``. A configuration measured more than once shows the measurement taken on the quietest machine
    (lowest 1-minute load, the larger of before and after); ``runs.jsonl`` keeps them all."""
    latest: dict = {}
    for r in read_jsonl(out / "runs.jsonl"):
        key = (r.get("cell", "gru"), r["T"], r["B"], r["H"], r.get("threads"))
        if "median_s" in r and (key not in latest or _load(r) <= _load(latest[key])):
            latest[key] = r
    parts = []
    for cell in ("gru", "lstm"):
        rows = {key[1:]: row for key, row in latest.items() if key[0] == cell}
        if rows:
            parts.append(f"## {baseline(cell)}\n\n" + full_table(rows) + "\n\n" + compact_table(rows.values()))
    text = "\n\n".join(parts + [map_table(latest)])
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(map_json(latest), indent=1) + "\n")
    return text


def full_table(latest: dict) -> str:
    """One line per configuration and method: median step, ratio, peak memory, load."""
    rows = list(latest.values())
    reference = next(iter(rows[0]["median_s"]))  # the baseline is every row's first method
    lines = [
        f"| threads | T | B | H | method | median step (ms) | ratio to {reference} | peak MiB | peak ratio | load |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for _, row in sorted(latest.items(), key=lambda item: tuple(v or 0 for v in item[0])):
        base = row["median_s"][reference]
        mem = row.get("peak_mib") or {}
        for method, value in row["median_s"].items():
            peak = mem.get(method)
            peak_ratio = f"{peak / mem[reference]:.2f}x" if peak is not None and mem.get(reference) else "n/a"
            lines.append(
                f"| {row.get('threads')} | {row['T']} | {row['B']} | {row['H']} | {method} | "
                f"{value * 1000:.1f} | {value / base:.2f}x | "
                f"{'n/a' if peak is None else f'{peak:.0f}'} | {peak_ratio} | {_load(row):.2f} |"
            )
    return "\n".join(lines)


def _ratios(row: dict) -> dict[str, float]:
    reference = next(iter(row["median_s"]))
    base = row["median_s"][reference]
    return {m: v / base for m, v in row["median_s"].items() if m != reference}


def map_json(latest: dict) -> list[dict]:
    """The map as records: per (threads, T, B, H), each cell's baseline time and every method's ratio to it."""
    merged: dict = {}
    for (cell, steps, batch, hidden, threads), row in latest.items():
        entry = merged.setdefault((threads or 0, steps, batch, hidden), {"threads": threads, "T": steps, "B": batch,
                                                                          "H": hidden, "load": 0.0})  # fmt: skip
        entry[f"{baseline(cell)} ms"] = round(row["median_s"][baseline(cell)] * 1000, 3)
        for method, ratio in _ratios(row).items():
            entry[f"{cell} {method}"] = round(ratio, 4)
        entry["load"] = max(entry["load"], _load(row))
    return [merged[key] for key in sorted(merged)]


def map_table(latest: dict) -> str:
    """The map: one line per (threads, T, B, H), the ratio of every cell's Highway methods to torch's module
    (below 1.00x: Highway-BP's step is faster), and the load during the measurements."""
    records = map_json(latest)
    if not records:
        return ""
    columns = []
    for record in records:
        for name in record:
            if name not in ("threads", "T", "B", "H", "load") and name not in columns:
                columns.append(name)
    columns.sort(key=lambda c: (c.split()[0].lower().replace("nn.", ""), "ms" not in c, c))
    lines = [
        "## Map: step time ratio to torch's module (median; below 1.00x Highway-BP is faster)",
        "",
        "| threads | T | B | H | " + " | ".join(columns) + " | load |",
        "|" + "---:|" * (5 + len(columns)),
    ]
    for record in records:
        cells = []
        for c in columns:
            value = record.get(c)
            cells.append("n/a" if value is None else f"{value:.0f}" if c.endswith(" ms") else f"{value:.2f}x")
        config = f"| {record['threads']} | {record['T']} | {record['B']} | {record['H']} | "
        lines.append(config + " | ".join(cells) + f" | {record['load']:.2f} |")
    return "\n".join(lines)


def compact_table(rows) -> str:
    """One line per configuration: nn.GRU's median step time, every method's ratio to it (medians; in brackets the
    ratio of the fastest rounds, which interference from other processes cannot inflate), k=1's peak memory."""
    rows = sorted(rows, key=lambda r: (r.get("threads") or 0, r["T"], r["B"], r["H"]))
    if not rows:
        return ""
    reference = next(iter(rows[0]["median_s"]))  # nn.GRU or nn.LSTM: every row's first method
    methods = [m for m in rows[0]["median_s"] if m != reference]
    head = (
        f"| threads | T | B | H | {reference} (ms) | "
        + " | ".join(methods)
        + f" | peak memory k=1 / {reference} | load |"
    )
    lines = [head, "|" + "---:|" * (7 + len(methods))]
    for row in rows:
        base = row["median_s"][reference]
        mem = row.get("peak_mib") or {}
        peak = f"{mem['k=1'] / mem[reference]:.2f}x" if mem.get("k=1") and mem.get(reference) else "n/a"
        fastest = {m: min(v) for m, v in row.get("all_s", {}).items()}
        ratios = " | ".join(
            f"{row['median_s'][m] / base:.2f}x" + (f" ({fastest[m] / fastest[reference]:.2f}x)" if fastest else "")
            for m in methods
            if m in row["median_s"]
        )
        config = f"| {row.get('threads')} | {row['T']} | {row['B']} | {row['H']}"
        load = max(float(row["loadavg_before"][0]), float(row.get("loadavg_after", row["loadavg_before"])[0]))
        lines.append(f"{config} | {base * 1000:.0f} | {ratios} | {peak} | {load:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure the grid the arguments ask for; return the records written to ``runs.jsonl``."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses(args=argv)
    args.resolve()
    if args.memory_probe:
        set_threads(args.threads[0])
        run_memory_probe(args)
        return []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        print(summarize(out))
        return []
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch.")
    dtype = getattr(torch, args.dtype)
    note = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{os.cpu_count()}",
        "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
        "clock": args.clock,
    }
    records = []
    for cell in args.cells:
        if args.check:
            set_threads(args.threads[0])
            check = {"check": gradient_check(args.device, cell), "cell": cell, "tag": args.tag, **note}
            append_jsonl(out / "checks.jsonl", check)
            print(f"{cell}: gradient check (relative error at k = T):", json.dumps(check["check"]), flush=True)
        for threads in args.threads:
            set_threads(threads)
            for steps in args.seq_lens:
                for batch in args.batch_sizes:
                    for hidden in args.hidden_sizes:
                        record = measure(args, cell, threads, steps, batch, hidden, dtype, note)
                        if record is not None:
                            records.append(record)
    print(summarize(out))
    return records


def measure(
    args: BenchArguments, cell: str, threads: int, steps: int, batch: int, hidden: int, dtype: torch.dtype, note: dict
) -> dict | None:
    """Time (and measure the memory of) one configuration; append it to ``runs.jsonl`` (None when it failed)."""
    out = Path(args.output_dir)
    record = {"T": steps, "B": batch, "H": hidden, "dtype": args.dtype, "tag": args.tag, "cell": cell,
              "rounds": args.rounds, "threads": threads, "loadavg_before": _loadavg(), **note}  # fmt: skip
    try:
        record.update(time_config(args, steps, batch, hidden, dtype, cell))
        record["loadavg_after"] = _loadavg()
        if args.memory:
            methods = method_names(args.ks, cell)
            record["peak_mib"] = {m: peak_memory(args, steps, batch, hidden, m, cell, threads) for m in methods}
    except (RuntimeError, subprocess.CalledProcessError) as error:  # e.g. out of memory: keep the rest
        record["error"] = repr(error)
        print(f"{cell} threads={threads} T={steps} B={batch} H={hidden}: failed: {error!r}", flush=True)
        append_jsonl(out / "runs.jsonl", record)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return None
    append_jsonl(out / "runs.jsonl", record)
    reference = baseline(cell)
    base = record["median_s"][reference]
    ratios = ", ".join(f"{m} {v / base:.2f}x" for m, v in record["median_s"].items())
    load = record["loadavg_before"][0], record["loadavg_after"][0]
    print(f"{cell} threads={threads} T={steps} B={batch} H={hidden}: {reference} {base * 1000:.1f} ms; {ratios}; "
          f"load {load[0]} -> {load[1]}", flush=True)  # fmt: skip
    return record


def _loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


if __name__ == "__main__":
    main()
