"""Where the time of a ``HighwayLSTM`` / ``HighwayGRU`` training step goes, part by part, on CPU.

Each part of the step is run on its own, from the same tensors the step uses, with manual timers (medians over
interleaved rounds: every round runs every part once, so machine load hits all parts alike):

- the fused forward (``_VF.lstm`` / ``_VF.gru``) and, for comparison, torch's ``nn.LSTM`` / ``nn.GRU`` forward and
  forward + backward;
- the backward's gate recompute (whole, and its matrix products alone), one Highway iteration's ``hidden_vjp``
  (J^T for all steps) and reverse scan, and the parameter and input gradients;
- the whole backward (``HighwayLayer.backward`` through autograd) and the whole step;
- the machine's rates: a [T*B, H] x [H, H] product, a [T*B, H] x [H, 4H] one, and an elementwise multiply of
  [T, B, H] tensors (bytes moved per second), from which docs/recurrent.md derives the backward's lower bound.

    python -m benchmarks.profile_rnn --seq_len 1024 --batch 16 --hidden 64 --threads 1
    python -m benchmarks.profile_rnn --cell gru --threads 2
    python -m benchmarks.profile_rnn --torch_profiler   # also torch.profiler's table of the Highway step

The output is a table (ms per part, the share of the Highway step) and, with ``--output``, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks._bench_common import append_jsonl, set_threads
from hf_hwbp.engine import run_recursion
from hf_hwbp.rnn import HighwayGRU, HighwayLSTM
from hf_hwbp.rnn.gru_cell import GRUStepDerivatives, PreviousStates
from hf_hwbp.rnn.lstm_cell import LSTMStepDerivatives, LSTMTimeStack
from hf_hwbp.rnn.scan import ReverseLinearScan, forward_linear_scan
from hf_hwbp.rnn.stack import TimeStack


def load() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def timed_rounds(parts: dict[str, Callable[[], object]], rounds: int, clock: str = "wall") -> dict[str, float]:
    """Median seconds per part; parts interleaved round-robin after one warm-up round.

    ``clock``: "wall" (``time.perf_counter``) or "cpu" (``time.process_time``: the CPU time of this process, all
    its threads; with one thread it does not count the time other processes hold the core, so it is the steadier
    measure on a shared machine, while memory-bandwidth contention still shows)."""
    read = time.perf_counter if clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_index in range(rounds + 1):
        for name, part in parts.items():
            begin = read()
            part()
            elapsed = read() - begin
            if round_index:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def training_step(module: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x`` with a loss on every output (the step the benchmarks time)."""

    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x)[0] * weights).sum().backward()

    return run


def lstm_parts(steps: int, batch: int, hidden: int, k: int) -> dict:
    """The parts of one HighwayLSTM step (one layer, input size = hidden, a loss on every output)."""
    torch.manual_seed(0)
    reference = nn.LSTM(hidden, hidden)
    highway = HighwayLSTM.from_lstm(reference, k=k)
    x = torch.randn(steps, batch, hidden).requires_grad_(True)
    weights = torch.randn(steps, batch, hidden)
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in reference._flat_weights)
    flat = [w_ih, w_hh, b_ih, b_hh]
    h0 = torch.zeros(batch, hidden)
    c0 = torch.zeros(batch, hidden)
    xd = x.detach()
    outputs = torch._VF.lstm(xd, (h0[None], c0[None]), flat, True, 1, 0.0, False, False, False)[0]
    previous = PreviousStates(h0, outputs)
    steps_ = LSTMStepDerivatives.recompute(xd, previous, c0, w_ih, w_hh, b_ih, b_hh)
    dh = torch.randn(steps, batch, hidden)
    gamma = torch.randn(steps, batch, hidden)
    zeros = torch.zeros(batch, hidden)
    scan = ReverseLinearScan(steps_.forget_gate)
    cell_inflow = torch.randn(steps, batch, hidden)
    gamma_out = torch.empty(steps + 1, batch, hidden)
    out, _ = highway(x)
    loss = (out * weights).sum()

    gate_buffers = [torch.empty(steps * batch, hidden) for _ in range(4)]

    def recompute_gemms():  # the recompute's products as it runs them: per gate, hidden side then input side
        for gate, out in enumerate(gate_buffers):
            rows = slice(gate * hidden, (gate + 1) * hidden)
            previous.mm_into(w_hh[rows].t(), out).addmm_(xd.view(-1, hidden), w_ih[rows].t())

    def recursion():
        stack = LSTMTimeStack(steps_, ReverseLinearScan(steps_.forget_gate), weights[-1], zeros, weights)
        return run_recursion(stack, k, None)

    parts = {
        "nn.LSTM forward": lambda: reference(x.detach()),
        "nn.LSTM step (forward + backward)": training_step(reference, x, weights),
        "Highway step (forward + backward)": training_step(highway, x, weights),
        "Highway backward (autograd, whole)": lambda: torch.autograd.grad(
            loss, [x, *highway.parameters()], retain_graph=True
        ),  # fmt: skip
        "fused forward (_VF.lstm)": lambda: torch._VF.lstm(
            xd, (h0[None], c0[None]), flat, True, 1, 0.0, False, False, False
        ),  # fmt: skip
        "recompute gates + cells (whole)": lambda: LSTMStepDerivatives.recompute(
            xd, previous, c0, w_ih, w_hh, b_ih, b_hh
        ),  # fmt: skip
        "recompute: its 8 products alone": recompute_gemms,
        "forward cell scan (c_t)": lambda: forward_linear_scan(steps_.forget_gate, dh, c0),
        "run_recursion (k iterations, scans incl.)": recursion,
        "one hidden_vjp (J^T, all steps)": lambda: steps_.hidden_vjp(dh, gamma),
        "one reverse scan": lambda: scan(zeros, cell_inflow, out=gamma_out),
        "parameter + input grads": lambda: steps_.parameter_and_input_grads(
            dh, gamma, xd, previous, w_ih, need_input=True, need_bias=True
        ),
    }
    return parts


def gru_parts(steps: int, batch: int, hidden: int, k: int) -> dict:
    """The parts of one HighwayGRU step (one layer, input size = hidden, a loss on every output)."""
    torch.manual_seed(0)
    reference = nn.GRU(hidden, hidden)
    highway = HighwayGRU.from_gru(reference, k=k)
    x = torch.randn(steps, batch, hidden).requires_grad_(True)
    weights = torch.randn(steps, batch, hidden)
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in reference._flat_weights)
    flat = [w_ih, w_hh, b_ih, b_hh]
    h0 = torch.zeros(batch, hidden)
    xd = x.detach()
    outputs = torch._VF.gru(xd, h0[None], flat, True, 1, 0.0, False, False, False)[0]
    previous = PreviousStates(h0, outputs)
    steps_ = GRUStepDerivatives.recompute(xd, previous, w_ih, w_hh, b_ih, b_hh)
    dh = torch.randn(steps, batch, hidden)
    zeros = torch.zeros(batch, hidden)
    scan = ReverseLinearScan(steps_.update_gate)
    delta_out = torch.empty(steps + 1, batch, hidden)
    out, _ = highway(x)
    loss = (out * weights).sum()

    def recursion():
        stack = TimeStack(steps_, ReverseLinearScan(steps_.update_gate), weights[-1], weights)
        return run_recursion(stack, k, None)

    parts = {
        "nn.GRU forward": lambda: reference(x.detach()),
        "nn.GRU step (forward + backward)": training_step(reference, x, weights),
        "Highway step (forward + backward)": training_step(highway, x, weights),
        "Highway backward (autograd, whole)": lambda: torch.autograd.grad(
            loss, [x, *highway.parameters()], retain_graph=True
        ),  # fmt: skip
        "fused forward (_VF.gru)": lambda: torch._VF.gru(xd, h0[None], flat, True, 1, 0.0, False, False, False),
        "recompute gates (whole)": lambda: GRUStepDerivatives.recompute(xd, previous, w_ih, w_hh, b_ih, b_hh),
        "run_recursion (k iterations, scans incl.)": recursion,
        "one hidden_vjp (J^T, all steps)": lambda: steps_.hidden_vjp(dh),
        "one reverse scan": lambda: scan(zeros, dh, out=delta_out),
        "parameter + input grads": lambda: steps_.parameter_and_input_grads(
            dh, xd, previous, w_ih, need_input=True, need_bias=True
        ),
    }
    return parts


def rates(steps: int, batch: int, hidden: int, rounds: int = 9, clock: str = "wall") -> dict:
    """GEMM rates (GFLOP/s) of the backward's product shapes and the elementwise bandwidth (GB/s)."""
    rows = steps * batch
    a = torch.randn(rows, hidden)
    w = torch.randn(hidden, hidden)
    w4 = torch.randn(hidden, 4 * hidden)
    a4 = torch.randn(rows, 4 * hidden)
    out, out4 = torch.empty(rows, hidden), torch.empty(rows, 4 * hidden)
    wt = torch.empty(4 * hidden, hidden)
    u, v, r = torch.randn(steps, batch, hidden), torch.randn(steps, batch, hidden), torch.empty(steps, batch, hidden)
    found = timed_rounds(
        {
            "mm [TB,H]x[H,H]": lambda: torch.mm(a, w, out=out),
            "mm [TB,H]x[H,4H]": lambda: torch.mm(a, w4, out=out4),
            "mm [TB,4H]x[4H,H]": lambda: torch.mm(a4, w4.t(), out=out),
            "mm [4H,TB]x[TB,H] (weight grad)": lambda: torch.mm(a4.t(), a, out=wt),
            "mul [T,B,H] (2 reads, 1 write)": lambda: torch.mul(u, v, out=r),
        },
        rounds,
        clock,
    )
    flop = 2 * rows * hidden * hidden
    return {
        "seconds": found,
        "gflops_HxH": flop / found["mm [TB,H]x[H,H]"] / 1e9,
        "gflops_Hx4H": 4 * flop / found["mm [TB,H]x[H,4H]"] / 1e9,
        "gflops_4HxH": 4 * flop / found["mm [TB,4H]x[4H,H]"] / 1e9,
        "gflops_weight_grad": 4 * flop / found["mm [4H,TB]x[TB,H] (weight grad)"] / 1e9,
        "elementwise_GBps": 3 * 4 * rows * hidden / found["mul [T,B,H] (2 reads, 1 write)"] / 1e9,
        "P_ms": flop / (4 * flop / found["mm [TB,H]x[H,4H]"]) * 1000,  # one [TB,H]x[H,H] at the fused-shape rate
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall or process CPU time")
    parser.add_argument("--torch_profiler", action="store_true", help="also print torch.profiler's op table")
    parser.add_argument("--output", default="", help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    build = lstm_parts if args.cell == "lstm" else gru_parts
    before = load()
    parts = build(args.seq_len, args.batch, args.hidden, args.k)
    machine = rates(args.seq_len, args.batch, args.hidden, clock=args.clock)
    found = timed_rounds(parts, args.rounds, args.clock)
    after = load()
    whole = found["Highway step (forward + backward)"]
    print(f"{args.cell} T={args.seq_len} B={args.batch} H={args.hidden} k={args.k} threads={args.threads} "
          f"load {before} -> {after}")  # fmt: skip
    print(f"| part | ms ({args.clock} clock, median) | share of the Highway step |\n|---|---:|---:|")
    for name, seconds in found.items():
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / whole:.0%} |")
    print("machine:", json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in machine.items()
                                  if k != "seconds"}))  # fmt: skip
    print("rates (ms):", json.dumps({k: round(v * 1000, 2) for k, v in machine["seconds"].items()}))
    record = {
        "cell": args.cell, "T": args.seq_len, "B": args.batch, "H": args.hidden, "k": args.k,
        "threads": args.threads, "rounds": args.rounds, "clock": args.clock,
        "loadavg_before": before, "loadavg_after": after,
        "parts_s": found, "machine": machine, "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }  # fmt: skip
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        step = parts["Highway step (forward + backward)"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.output:
        append_jsonl(Path(args.output), record)
    return record


if __name__ == "__main__":
    main()
