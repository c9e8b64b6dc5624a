"""What Highway-BP costs under FSDP2, against FSDP2 backprop and DDP (+ Highway-BP), on 2 processes (CPU, gloo).

    python benchmarks/bench_fsdp.py                    # every set-up, 2 ranks each; writes results/fsdp/
    python benchmarks/bench_fsdp.py --setups fsdp_backprop fsdp_hw_k1 --steps 2 --layers 4 --hidden 128

Each set-up runs in its own ``torchrun --nproc_per_node 2`` (so the peak resident memory of a rank is its own) and
trains a randomly initialised GPT-2 (float32, dropout 0) for a warm-up step and ``--steps`` timed steps, one
micro-batch per rank. Per step and rank it reports: the median step time (forward + backward, no optimizer), the
number of FSDP all-gathers and reduce-scatters (counted at ``torch.distributed.all_gather_single`` /
``reduce_scatter_single``), the peak bytes of unsharded parameters held at once (FSDP's unshard / reshard
transitions, parameter dtype), and the rank's peak resident memory (``ru_maxrss``, the whole process).

Set-ups: ``fsdp_backprop`` (FSDP2, ``reshard_after_forward=True``), ``fsdp_hw_k{1,2}`` (Highway-BP under FSDP2,
hf_hwbp.fsdp's lifecycle: each block re-gathered once in the backward and kept gathered through the Highway
sweeps), ``fsdp_hw_k1_noreshard`` (``reshard_after_forward=False``: gathered once in the forward, kept to the end
of the backward), ``ddp_backprop`` and ``ddp_hw_k1`` (whole weights on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETUPS = ("fsdp_backprop", "fsdp_hw_k1", "fsdp_hw_k2", "fsdp_hw_k1_noreshard", "ddp_backprop", "ddp_hw_k1")
OUT = Path(__file__).resolve().parent.parent / "results" / "fsdp"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- one rank ------------------------------------------------------------------------------------------------
class _Counters:
    """Counts FSDP's collectives and the unsharded parameter bytes held at once (instrumentation only)."""

    def __init__(self):
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.all_gathers = self.reduce_scatters = 0
        self.unsharded = self.peak_unsharded = 0
        counters = self

        def counted(name, attr):
            original = getattr(dist, name)

            def call(*args, **kwargs):
                setattr(counters, attr, getattr(counters, attr) + 1)
                return original(*args, **kwargs)

            setattr(dist, name, call)

        counted("all_gather_single", "all_gathers")
        counted("reduce_scatter_single", "reduce_scatters")

        def size(group) -> int:
            return sum(p._orig_size.numel() * (p.param_dtype or p.orig_dtype).itemsize for p in group.fsdp_params)

        to_unsharded, to_sharded = FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded

        def unshard(group):
            if not group.is_unsharded:
                counters.unsharded += size(group)
                counters.peak_unsharded = max(counters.peak_unsharded, counters.unsharded)
            to_unsharded(group)

        def reshard(group):
            if group.is_unsharded:
                counters.unsharded -= size(group)
            to_sharded(group)

        FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded = unshard, reshard

    def reset(self):
        self.all_gathers = self.reduce_scatters = 0
        self.peak_unsharded = self.unsharded


def worker(options) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_hwbp import fsdp as hw_fsdp
    from hf_hwbp import patch_model

    torch.set_num_threads(options.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    counters = _Counters()
    setup = options.setup
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=options.vocab,
        n_positions=options.length,
        n_embd=options.hidden,
        n_layer=options.layers,
        n_head=max(1, options.hidden // 64),
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    k = int(setup.split("_k")[1][0]) if "_hw_k" in setup else None
    if setup.startswith("fsdp"):
        reshard = not setup.endswith("noreshard")
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        if k is not None:
            patch_model(model, k=k)
            hw_fsdp.attach(model)
        wrapped = model
    else:
        if k is not None:
            patch_model(model, k=k)
        wrapped = DistributedDataParallel(model)
    wrapped.train()
    generator = torch.Generator().manual_seed(1 + rank)
    times = []
    for step in range(options.steps + 1):
        ids = torch.randint(0, options.vocab, (options.batch, options.length), generator=generator)
        for p in model.parameters():
            p.grad = None
        dist.barrier()
        counters.reset()
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        elapsed = time.perf_counter() - start
        if step > 0:  # the first step warms up (and creates FSDP's unsharded parameters)
            times.append(elapsed)
    result = {
        "setup": setup,
        "rank": rank,
        "params": params,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "all_gathers_per_step": counters.all_gathers,
        "reduce_scatters_per_step": counters.reduce_scatters,
        "peak_unsharded_param_MiB": counters.peak_unsharded / 2**20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(options.out).mkdir(parents=True, exist_ok=True)
    with open(Path(options.out) / f"{setup}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ----- driver --------------------------------------------------------------------------------------------------
def _model_args(options) -> list[str]:
    names = ("layers", "hidden", "vocab", "length", "batch", "steps", "threads")
    return [part for name in names for part in (f"--{name}", str(getattr(options, name)))]


def drive(options) -> None:
    raw = Path(options.out) / "raw"
    rows = []
    for setup in options.setups:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            __file__,
            "--worker",
            "--setup",
            setup,
            "--out",
            str(raw),
            *_model_args(options),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
        print("+", " ".join(command[3:]), flush=True)
        subprocess.run(command, env=env, check=True, capture_output=not options.verbose)
        ranks = [json.loads((raw / f"{setup}.rank{r}.json").read_text()) for r in range(2)]
        rows.append(
            {
                "setup": setup,
                "step_s": max(r["step_s"] for r in ranks),
                "all_gathers_per_step": ranks[0]["all_gathers_per_step"],
                "reduce_scatters_per_step": ranks[0]["reduce_scatters_per_step"],
                "peak_unsharded_param_MiB": max(r["peak_unsharded_param_MiB"] for r in ranks),
                "peak_rss_MiB": max(r["peak_rss_MiB"] for r in ranks),
                "params": ranks[0]["params"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    summary = {"model": vars(options) | {"setups": list(options.setups)}, "rows": rows}
    summary["command"] = "python benchmarks/bench_fsdp.py " + " ".join(_model_args(options))
    Path(options.out).mkdir(parents=True, exist_ok=True)
    (Path(options.out) / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = [
        "| set-up | step (s) | all-gathers / step | reduce-scatters / step | peak unsharded params (MiB) | "
        "peak RSS / rank (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['step_s']:.2f} | {r['all_gathers_per_step']} | {r['reduce_scatters_per_step']} | "
            f"{r['peak_unsharded_param_MiB']:.1f} | {r['peak_rss_MiB']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        worker(options)
    else:
        drive(options)


if __name__ == "__main__":
    main()
