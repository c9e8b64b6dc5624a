"""Layer-parallel Highway-BP(k) against the pipeline-backprop schedules people run, S ranks on torch.distributed.

    torchrun --nproc_per_node 2 -m benchmarks.bench_pipeline [--models gpt2,llama] [--reps 7]

Every rank builds the same float32 model from a config (random weights, dropout 0). Side by side, in one run,
for every micro-batch count M: pipeline backprop (one stage per rank, no micro-batches), torch's
``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble``,
``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV`` (where torch accepts that M), and Highway-BP k = 0, 1, 2
with the same M (``hf_hwbp.parallel.LayerParallelHighway``). A step is forward + backward (no optimizer),
timed from a barrier to the slowest rank's end; methods run round-robin (one step of each per round) and the
median over rounds is reported, with the ratio to the best backprop schedule at the same M.

Each rank measures the per-layer costs of its own layers (``hf_hwbp.parallel.calibrate``; both ranks at once)
before timing, and again at the start of every round; both ranks average them, plus the link (ping-pong). The
Highway runners plan their schedules with the first measurement; the simulator (``hf_hwbp.parallel.simulate``)
predicts every method's step time from the median over rounds (so that the costs see the machine as the
timed steps saw it), replaying the exact per-rank order each method runs. One untimed traced step per Highway
setting records where each rank's time goes (compute per kind of task, waiting for messages, idle).

Writes ``<out>/<tag>.json``, ``<out>/<tag>.md`` and ``<out>/costs_<model>.json`` (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from hf_hwbp.parallel import LayerParallelHighway, TorchPipeline
from hf_hwbp.parallel.baselines import SCHEDULE_LABELS, schedule_requirement
from hf_hwbp.parallel.calibrate import average_over_ranks, measure_link, measure_stack_costs, median_costs
from hf_hwbp.parallel.comm import Comm
from hf_hwbp.parallel.simulate import StackCosts, backprop_timeline, even_split


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Rank 0 polls the 1-minute load until it falls below ``threshold`` (or ``max_wait_s`` passes); all wait."""
    waited = torch.zeros(1, dtype=torch.float64)
    if dist.get_rank() == 0 and threshold > 0:
        start = time.time()
        while loadavg()[0] >= threshold and time.time() - start < max_wait_s:
            time.sleep(2)
        waited[0] = time.time() - start
    dist.broadcast(waited, src=0)
    return float(waited[0])


def build(name: str, args):
    import transformers as tf

    torch.manual_seed(args.seed)
    if name == "gpt2":
        config = tf.GPT2Config(
            vocab_size=args.vocab,
            n_positions=args.seq,
            n_embd=args.hidden,
            n_layer=args.layers,
            n_head=args.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = tf.GPT2LMHeadModel(config)
    elif name == "llama":
        config = tf.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3 // 8 * 8,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=max(1, args.heads // 2),
            max_position_embeddings=args.seq,
            tie_word_embeddings=False,
        )
        model = tf.LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config.use_cache = False
    return model.float().train()


def calibrate(model, args, world: int, reps: int) -> StackCosts:
    """Both ranks measure their own layers at the same time (the machine as loaded as during the steps)."""
    rank = dist.get_rank()
    layers = even_split(args.layers, world)
    mine = range(sum(layers[:rank]), sum(layers[: rank + 1]))
    sizes = sorted({args.batch // m for m in args.microbatches})
    dist.barrier()
    costs = measure_stack_costs(model, sizes, args.seq, layers=mine, reps=reps, name=f"{args.model_name}")
    costs = average_over_ranks(costs)
    comm = Comm()
    nbytes = int(max(sizes) * costs.activation_bytes_per_sample)
    costs.latency, costs.seconds_per_byte = measure_link(comm, nbytes)
    costs.notes.update({"machine": platform.platform(), "load_during_calibration": loadavg(), "layers": args.layers})
    return costs


def make_methods(model, args, costs: StackCosts, world: int) -> dict:
    """name -> dict(runner, k, M, family)."""
    methods = {"pipeline backprop": dict(runner=LayerParallelHighway(model, method="backprop"), k=None, M=1)}
    methods["pipeline backprop"]["family"] = "backprop"
    for m in args.microbatches:
        for schedule in args.schedules:
            if schedule_requirement(schedule, m, world):
                continue  # torch refuses this M here
            runner = TorchPipeline(model, schedule=schedule, n_microbatches=m)
            methods[f"{SCHEDULE_LABELS[schedule]} M={m}"] = dict(runner=runner, k=None, M=m, family="backprop")
        highway = LayerParallelHighway(model, k=0, microbatches=m, costs=costs)
        for k in args.ks:
            methods[f"highway k={k} M={m}"] = dict(runner=highway, k=k, M=m, family="highway")
    return methods


def timed_step(method: dict, ids) -> float:
    runner = method["runner"]
    for p in runner.parameters():
        p.grad = None
    if method["k"] is not None:
        runner.k = method["k"]
    dist.barrier()
    start = time.perf_counter()
    runner.step(ids)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def predicted(name: str, method: dict, costs: StackCosts, args, world: int) -> float:
    runner = method["runner"]
    if isinstance(runner, TorchPipeline):
        return backprop_timeline(runner.schedule_name, costs, world, method["M"], args.batch)[1].makespan
    if method["k"] is not None:
        runner.k = method["k"]
    return runner.predict(costs, args.batch, args.seq).makespan


def where_time_goes(method: dict, ids, world: int) -> list[dict]:
    """One untimed step with the runtime's trace: per rank, seconds per kind of task, waiting, idle."""
    runner = method["runner"]
    runner.k = method["k"]
    for p in runner.parameters():
        p.grad = None
    runner.trace = True
    dist.barrier()
    start = time.perf_counter()
    runner.step(ids)
    end = time.perf_counter()
    runner.trace = False
    per_kind: dict[str, float] = defaultdict(float)
    waited = 0.0
    for task, t0, t1, wait in runner.last_trace:
        per_kind[task.kind] += t1 - t0 - wait
        waited += wait
    mine = {"rank": dist.get_rank(), "step_s": end - start, "wait_s": waited, **per_kind}
    mine["idle_s"] = mine["step_s"] - sum(per_kind.values()) - waited
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def bench_model(name: str, args, world: int) -> dict:
    args.model_name = name
    model = build(name, args)
    wait_for_quiet(args.wait_load, args.wait_max)
    plan_costs = calibrate(model, args, world, args.calib_reps)
    methods = make_methods(model, args, plan_costs, world)
    gen = torch.Generator().manual_seed(args.seed + 1)
    times: dict[str, list[float]] = {m: [] for m in methods}
    loads, waits, measured = [], [], []
    for rep in range(args.warmup + args.reps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        waits.append(wait_for_quiet(args.wait_load, args.wait_max))
        loads.append(loadavg())
        if rep >= args.warmup:
            measured.append(calibrate(model, args, world, args.round_calib_reps))
        for method_name, method in methods.items():
            t = timed_step(method, ids)
            if rep >= args.warmup:
                times[method_name].append(t)
    costs = median_costs(measured)
    profiles = {}
    for method_name, method in methods.items():
        if method["family"] == "highway":
            profiles[method_name] = where_time_goes(method, ids, world)
    rows = []
    for method_name, method in methods.items():
        med = statistics.median(times[method_name])
        rows.append(
            {
                "method": method_name,
                "family": method["family"],
                "M": method["M"],
                "k": method["k"],
                "median_s": med,
                "min_s": min(times[method_name]),
                "max_s": max(times[method_name]),
                "predicted_s": predicted(method_name, method, costs, args, world),
                "times_s": times[method_name],
            }
        )
    for row in rows:  # ratio to the best backprop schedule at the same M (pipeline backprop counts at M = 1)
        same_m = [r for r in rows if r["family"] == "backprop" and r["M"] == row["M"]]
        best = min(same_m, key=lambda r: r["median_s"])
        row["best_backprop"] = best["method"]
        row["speedup_vs_best_backprop"] = best["median_s"] / row["median_s"]
        best_pred = min(r["predicted_s"] for r in same_m)
        row["predicted_speedup"] = best_pred / row["predicted_s"]
        row["prediction_error"] = row["predicted_s"] / row["median_s"] - 1
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "costs": costs.to_json(),
        "plan_costs": plan_costs.to_json(),
        "loadavg_per_round": loads,
        "waited_for_quiet_s": waits,
        "rows": rows,
        "profiles": profiles,
    }


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Layer-parallel Highway-BP vs the pipeline schedules of torch.distributed.pipelining",
        "",
        f"`{result['command']}`",
        "",
        f"S = {result['world_size']} processes (gloo, CPU), torch.set_num_threads({a['threads']}) per rank; "
        f"batch {a['batch']} x seq {a['seq']}, hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads, "
        f"vocab {a['vocab']}, float32; {a['reps']} interleaved rounds after {a['warmup']} warm-up rounds; median "
        "step (forward + backward, slowest rank). *speed-up* = (median of the best backprop schedule at the same "
        "M) / (median of this method): above 1 is faster. *predicted*: the simulator with the costs measured at "
        "every round of this run (medians), replaying the exact order each method ran.",
        "",
        f"Load (1/5/15 min) before: {result['load_before']}, after: {result['load_after']}; torch {result['torch']}.",
        "",
    ]
    for model in result["models"]:
        loads = [x[0] for x in model["loadavg_per_round"]]
        lines += [
            f"## {model['model']} ({model['params'] / 1e6:.2f} M parameters)",
            "",
            f"1-min load at the start of each round: {min(loads):.2f} to {max(loads):.2f} (waited "
            f"{sum(model['waited_for_quiet_s']):.0f} s in all for it to fall below --wait_load "
            f"{a['wait_load']}).",
            "",
            "| method | median step (s) | min-max (s) | speed-up vs best backprop at same M | predicted (s) "
            "| prediction error |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in model["rows"]:
            best = " (best)" if row["method"] == row["best_backprop"] else ""
            error = 100 * row["prediction_error"]
            lines.append(
                f"| {row['method']}{best} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} | "
                f"{row['speedup_vs_best_backprop']:.3f} | {row['predicted_s']:.3f} | {error:+.1f} % |"
            )
        lines += [
            "",
            "Where the time goes (one traced Highway step per setting; seconds per rank: compute per kind of task "
            "- F forward, H head, V inflow VJPs, R scan, W parameter VJPs, E embeddings - then waiting in receives, "
            "then idle):",
            "",
            "| method | rank | step | F | H | V | R | W | E | wait | idle |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, ranks in model["profiles"].items():
            for r in ranks:
                cells = " | ".join(f"{r.get(k, 0.0):.3f}" for k in ("F", "H", "V", "R", "W", "E", "wait_s", "idle_s"))
                lines.append(f"| {method} | {r['rank']} | {r['step_s']:.3f} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--microbatches", default="1,2,4")
    parser.add_argument("--schedules", default=",".join(SCHEDULE_LABELS), help="torch schedules to run")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calib_reps", type=int, default=5, help="repetitions of the calibration before timing")
    parser.add_argument("--round_calib_reps", type=int, default=2, help="... and at the start of every round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/pipeline")
    parser.add_argument("--tag", default="bench_pipeline", help="output file name stem")
    parser.add_argument(
        "--wait_load",
        type=float,
        default=0.0,
        help="before calibrating and before each round, wait until the 1-min load is below this (our two ranks "
        "count about 2 themselves; 0: never wait)",
    )
    parser.add_argument("--wait_max", type=float, default=60.0, help="... for at most this many seconds each time")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k != ""]
    args.microbatches = [int(m) for m in args.microbatches.split(",") if m != ""]
    args.schedules = [s for s in args.schedules.split(",") if s]
    unknown = sorted(set(args.schedules) - set(SCHEDULE_LABELS))
    if unknown:
        parser.error(f"unknown schedules {unknown}; choose from {', '.join(SCHEDULE_LABELS)}")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {
        "command": f"torchrun --nproc_per_node {world} -m benchmarks.bench_pipeline {' '.join(sys.argv[1:])}".strip(),
        "world_size": world,
        "args": vars(args),
        "load_before": loadavg(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "models": [],
    }
    out = Path(args.out)
    for name in args.models.split(","):
        model_result = bench_model(name, args, world)
        result["models"].append(model_result)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            Path(out / f"costs_{name}.json").write_text(json.dumps(model_result["costs"], indent=1))
            print(to_markdown({**result, "load_after": loadavg()}).split("## ")[-1], flush=True)
    result["load_after"] = loadavg()
    if rank == 0:
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        (out / f"{args.tag}.md").write_text(to_markdown(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
