"""Step time of layer-parallel Highway-BP(k) against pipeline backprop, S stages on torch.distributed.

    torchrun --nproc_per_node 2 scripts/bench_pipeline.py [--models gpt2,llama] [--reps 9]

Every rank builds the same float32 model from a config (random weights, dropout 0) and keeps its stage.
The methods share the stage's modules and are timed round-robin (one step of each in turn, ``--reps``
rounds after ``--warmup``), so that a change of machine load hits all of them alike; a step is forward +
backward (no optimizer), timed from a barrier to the slowest rank's end. Reported: the median step time,
its ratio to pipeline backprop, and the bytes sent between ranks per step (summed over ranks, counted by
hf_hwbp.parallel.Comm; for GPipe the activations are computed, see GPipeBaseline.activation_bytes).
Writes ``<out>/bench_pipeline.json`` and ``<out>/bench_pipeline.md`` (rank 0 only).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hf_hwbp.parallel import GPipeBaseline, LayerParallelHighway


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        return "n/a"


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Rank 0 polls the 1-minute load average until it falls below ``threshold`` (or ``max_wait_s`` passes)."""
    import os

    waited = torch.zeros(1, dtype=torch.float64)
    if dist.get_rank() == 0 and threshold > 0:
        start = time.time()
        while os.getloadavg()[0] >= threshold and time.time() - start < max_wait_s:
            time.sleep(10)
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


def replay(traces: list[list[tuple]]) -> float:
    """Step time of an idle machine, modeled: each rank's compute between two communication calls (its thread
    CPU time) replayed along the recorded dependencies, with instant communication.

    ``traces[r]`` is rank r's ``[("start", None, cpu), (op, peer, cpu), ..., ("end", None, cpu)]`` (see
    ``Comm.trace``): a ``recv`` waits for the matching ``send``, a ``broadcast`` for its source, a
    ``collective`` for all its members.
    """
    from collections import defaultdict, deque

    world = len(traces)
    pos, now = [1] * world, [0.0] * world
    prev = [t[0][2] for t in traces]
    channels: dict[tuple, deque] = defaultdict(deque)  # (src, dst) -> times messages were sent
    arrivals: dict[tuple, dict[int, float]] = defaultdict(dict)  # (members, occurrence) -> {rank: time}
    seen: dict[tuple, int] = defaultdict(int)  # (rank, members) -> collectives passed
    progress = True
    while progress:
        progress = False
        for r in range(world):
            while pos[r] < len(traces[r]):
                op, peer, cpu = traces[r][pos[r]]
                ready = now[r] + (cpu - prev[r])
                if op == "send":
                    channels[(r, peer)].append(ready)
                elif op == "recv" or (op == "broadcast" and peer != r):
                    if not channels[(peer, r)]:
                        break  # blocked: the sender has not got there yet
                    ready = max(ready, channels[(peer, r)].popleft())
                elif op == "broadcast":
                    for q in range(world):
                        if q != r:
                            channels[(r, q)].append(ready)
                elif op == "collective":
                    key = (peer, seen[(r, peer)])
                    arrivals[key].setdefault(r, ready)
                    if len(arrivals[key]) < len(peer):
                        break
                    ready = max(arrivals[key].values())
                    seen[(r, peer)] += 1
                now[r], prev[r] = ready, cpu
                pos[r] += 1
                progress = True
    if any(pos[r] < len(traces[r]) for r in range(world)):
        raise RuntimeError("trace replay deadlocked: unmatched communication")
    return max(now)


def make_methods(model, args) -> dict:
    """name -> (runner, k or None). Every runner holds the same modules of this rank's stage."""
    methods = {}
    for m in args.microbatches:
        suffix = "" if m == 1 else f" m={m}"
        methods[f"backprop{suffix}"] = (LayerParallelHighway(model, method="backprop", microbatches=m), None)
        highway = LayerParallelHighway(model, k=0, group_size=args.group_size, scan=args.scan, microbatches=m)
        for k in args.ks:
            methods[f"highway k={k}{suffix}"] = (highway, k)
    for m in args.gpipe_microbatches:
        methods[f"torch GPipe m={m}"] = (GPipeBaseline(model, n_microbatches=m), None)
    return methods


def timed_step(runner, k, ids) -> tuple[float, int, float | None]:
    """(wall time of the slowest rank, bytes sent by all ranks, modeled idle-machine time or None)."""
    for p in runner.stage.parameters():
        p.grad = None
    if k is not None:
        runner.k = k
    runner.comm.bytes_sent = 0
    traced = not isinstance(runner, GPipeBaseline)  # GPipe communicates inside torch: no trace
    runner.comm.trace = [("start", None, time.thread_time())] if traced else None
    dist.barrier()
    start = time.perf_counter()
    runner.step(ids)
    elapsed = time.perf_counter() - start
    modeled = None
    if traced:
        runner.comm.trace.append(("end", None, time.thread_time()))
        traces = [None] * dist.get_world_size()
        dist.all_gather_object(traces, runner.comm.trace)
        runner.comm.trace = None
        modeled = replay(traces)
    sent = runner.comm.bytes_sent
    if isinstance(runner, GPipeBaseline):
        sent += runner.activation_bytes(ids)
    stats = torch.tensor([elapsed, float(sent)], dtype=torch.float64)
    slowest = stats[:1].clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    total = stats[1:].clone()
    dist.all_reduce(total)
    return float(slowest), int(total), modeled


def bench_model(name: str, args) -> dict:
    model = build(name, args)
    methods = make_methods(model, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    times: dict[str, list[float]] = {m: [] for m in methods}
    modeled: dict[str, list[float]] = {m: [] for m in methods}
    sent: dict[str, int] = {}
    for rep in range(args.warmup + args.reps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        for method, (runner, k) in methods.items():
            t, b, m = timed_step(runner, k, ids)
            if rep >= args.warmup:
                times[method].append(t)
                sent[method] = b
                if m is not None:
                    modeled[method].append(m)
    base = statistics.median(times["backprop"])
    base_model = statistics.median(modeled["backprop"])
    rows = []
    for method in methods:
        med = statistics.median(times[method])
        mod = statistics.median(modeled[method]) if modeled[method] else None
        rows.append(
            {
                "method": method,
                "median_s": med,
                "min_s": min(times[method]),
                "max_s": max(times[method]),
                "ratio_to_backprop": med / base,
                "modeled_idle_s": mod,
                "modeled_ratio": mod / base_model if mod is not None else None,
                "bytes_per_step": sent[method],
                "times_s": times[method],
                "modeled_idle_times_s": modeled[method],
            }
        )
    highway = [runner for runner, k in methods.values() if k is not None]
    layout = (highway[0] if highway else methods["backprop"][0]).stage.layout
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "layers": args.layers,
        "blocks_per_stage": [b - a for a, b in layout.stage_blocks],
        "num_blocks": layout.num_blocks,
        "rows": rows,
    }


TARGETS = {0: 0.75, 1: 0.9}


def to_markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Layer-parallel Highway-BP vs pipeline backprop",
        "",
        f"`{result['command']}`",
        "",
        f"S = {result['world_size']} processes (gloo, CPU), torch.set_num_threads({a['threads']}) per rank; "
        f"batch {a['batch']} x seq {a['seq']}, hidden {a['hidden']}, {a['layers']} layers, {a['heads']} heads, "
        f"vocab {a['vocab']}, float32, group_size={a['group_size']}, scan={a['scan']}; "
        f"{a['reps']} interleaved repetitions after {a['warmup']} warm-up rounds; median step (forward + backward).",
        "",
        "Wall-clock columns are what was measured. The *modeled idle* columns replay each rank's compute between "
        "two communication calls (its thread CPU time) along the recorded send/recv/collective dependencies with "
        "instant communication: an estimate of the step time on an otherwise idle machine, not a measurement "
        "(GPipe communicates inside torch and is not traced).",
        "",
        f"Load before: `{result['uptime_before']}`  ",
        f"Load after: `{result['uptime_after']}`",
        "",
    ]
    for model in result["models"]:
        lines += [
            f"## {model['model']} ({model['params'] / 1e6:.2f} M parameters, blocks per stage "
            f"{model['blocks_per_stage']})",
            "",
            "| method | median step (s) | min-max (s) | ratio to backprop | target | modeled idle (s) | modeled ratio "
            "| bytes sent / step |",
            "|---|---:|---:|---:|---|---:|---:|---:|",
        ]
        for row in model["rows"]:
            target = ""
            if row["method"].startswith("highway k="):
                k = int(row["method"].split("=")[1].split()[0])
                if k in TARGETS:
                    wall = "met" if row["ratio_to_backprop"] <= TARGETS[k] else "NOT met"
                    target = f"<= {TARGETS[k]}: wall {wall}"
                    if row["modeled_ratio"] is not None:
                        target += f", modeled {'met' if row['modeled_ratio'] <= TARGETS[k] else 'NOT met'}"
            mod = "n/a" if row["modeled_idle_s"] is None else f"{row['modeled_idle_s']:.3f}"
            mod_ratio = "n/a" if row["modeled_ratio"] is None else f"{row['modeled_ratio']:.3f}"
            lines.append(
                f"| {row['method']} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} | "
                f"{row['ratio_to_backprop']:.3f} | {target} | {mod} | {mod_ratio} | "
                f"{row['bytes_per_step'] / 1e6:.2f} MB |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--group_size", default="1", help="layers per Highway block, or 'stage'")
    parser.add_argument("--scan", default="chain", choices=["chain", "allgather"])
    parser.add_argument(
        "--microbatches", default="1,2", help="forward micro-batches of our runners (1 = plain pipeline backprop)"
    )
    parser.add_argument("--gpipe_microbatches", default="2", help="micro-batches of torch's GPipe ('': none)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/pipeline")
    parser.add_argument("--tag", default="bench_pipeline", help="output file name stem")
    parser.add_argument("--wait_load", type=float, default=0.0, help="wait until the 1-min load is below this")
    parser.add_argument("--wait_max", type=float, default=600.0, help="... for at most this many seconds")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k != ""]
    args.microbatches = [int(m) for m in args.microbatches.split(",") if m != ""]
    if 1 not in args.microbatches:
        args.microbatches.insert(0, 1)  # the reference: pipeline backprop
    args.gpipe_microbatches = [int(m) for m in args.gpipe_microbatches.split(",") if m != ""]
    args.group_size = args.group_size if args.group_size == "stage" else int(args.group_size)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    waited = wait_for_quiet(args.wait_load, args.wait_max)
    result = {
        "command": "torchrun --nproc_per_node {} scripts/bench_pipeline.py {}".format(
            dist.get_world_size(), " ".join(__import__("sys").argv[1:])
        ).strip(),
        "world_size": dist.get_world_size(),
        "args": vars(args),
        "waited_for_quiet_s": waited,
        "uptime_before": uptime(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "models": [],
    }
    for name in args.models.split(","):
        result["models"].append(bench_model(name, args))
        if rank == 0:
            print(to_markdown({**result, "uptime_after": uptime()}).split("## ")[-1], flush=True)
    result["uptime_after"] = uptime()
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1))
        markdown = to_markdown(result)
        (out / f"{args.tag}.md").write_text(markdown + "\n")
        print(markdown)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
