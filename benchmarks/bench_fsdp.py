"""What Highway-BP costs under FSDP2, beside FSDP2 backprop, on 2 processes (CPU, gloo).

    python -m benchmarks.bench_fsdp                         # 8, 12 and 24 blocks; writes results/fsdp/
    python -m benchmarks.bench_fsdp --layers 4 --hidden 64 --length 16 --rounds 1 --out /tmp/fsdp_bench

For each number of blocks, one ``torchrun --nproc_per_node 2`` builds every set-up (a randomly initialised GPT-2,
float32, dropout 0, each block and the root ``fully_shard``-ed; one micro-batch of ``--batch`` rows per rank, or two
with accumulation) and times them in interleaved rounds (one warm-up round, then ``--rounds`` rounds of one step
per set-up; the median per set-up, the slowest rank). A step is forward + backward, no optimizer. Per step it
counts FSDP's collectives (calls of ``torch.distributed.all_gather_single`` / ``reduce_scatter_single``), and
follows every FSDP parameter group from the moment its all-gather starts to the moment it is resharded: the peak
bytes of unsharded parameters held at once (parameter dtype) and the most transformer blocks held at once (the
root's group, embeddings and head, not counted as a block).

Set-ups, for each number of blocks: ``backprop`` (FSDP2), Highway-BP(k) for k = 1, 2 with each lifecycle of
``hf_hwbp.fsdp`` (``per_block``, the default, and ``keep_gathered``); the same with ``reshard_after_forward=False``
(where both lifecycles keep the blocks gathered since the forward), and with gradient accumulation (two
micro-batches, the first without gradient sync), k = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "results" / "fsdp"


@dataclass(frozen=True)
class Setup:
    k: int | None  # None: FSDP backprop
    lifecycle: str = "per_block"
    reshard_after_forward: bool = True
    micro_batches: int = 1

    @property
    def name(self) -> str:
        name = "backprop" if self.k is None else f"highway k={self.k} {self.lifecycle}"
        if not self.reshard_after_forward:
            name += ", no reshard after forward"
        if self.micro_batches > 1:
            name += f", {self.micro_batches} micro-batches"
        return name


def setups(ks: list[int]) -> list[Setup]:
    out = [Setup(None)]
    out += [Setup(k, lifecycle) for k in ks for lifecycle in ("per_block", "keep_gathered")]
    out += [Setup(None, reshard_after_forward=False)]
    out += [Setup(k, reshard_after_forward=False) for k in ks]
    out += [Setup(None, micro_batches=2)]
    out += [Setup(1, lifecycle, micro_batches=2) for lifecycle in ("per_block", "keep_gathered")]
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ----- one rank ------------------------------------------------------------------------------------------------
class Counters:
    """FSDP's collectives and the unsharded parameters it holds, per step (instrumentation of torch's FSDP2 for this
    benchmark only: the group methods wrapped here are internals)."""

    def __init__(self, root_groups: set[int]):
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.root_groups = root_groups  # ids of the groups that are not a transformer block's
        self.all_gathers = self.reduce_scatters = 0
        self.held: dict[int, int] = {}  # id(group) -> bytes, from its all-gather to its reshard
        self.peak_bytes = self.peak_blocks = 0
        counters = self

        def counted(name: str, attr: str) -> None:
            original = getattr(dist, name)

            def call(*args, **kwargs):
                setattr(counters, attr, getattr(counters, attr) + 1)
                return original(*args, **kwargs)

            setattr(dist, name, call)

        counted("all_gather_single", "all_gathers")
        counted("reduce_scatter_single", "reduce_scatters")

        def size(group) -> int:
            return sum(p._orig_size.numel() * (p.param_dtype or p.orig_dtype).itemsize for p in group.fsdp_params)

        unshard, to_sharded, finalize = (
            FSDPParamGroup.unshard,
            FSDPParamGroup._to_sharded,
            FSDPParamGroup.finalize_backward,
        )

        def counted_unshard(group, *args, **kwargs):
            unshard(group, *args, **kwargs)
            if id(group) not in counters.held and (group.is_unsharded or group._all_gather_result is not None):
                counters.held[id(group)] = size(group)
                counters.observe()

        def counted_to_sharded(group):
            to_sharded(group)
            counters.held.pop(id(group), None)

        def counted_finalize(group):
            finalize(group)
            if not group.is_unsharded:  # a prefetch nobody waited for, dropped at the end of the backward
                counters.held.pop(id(group), None)

        FSDPParamGroup.unshard = counted_unshard
        FSDPParamGroup._to_sharded = counted_to_sharded
        FSDPParamGroup.finalize_backward = counted_finalize

    def observe(self) -> None:
        self.peak_bytes = max(self.peak_bytes, sum(self.held.values()))
        self.peak_blocks = max(self.peak_blocks, sum(1 for g in self.held if g not in self.root_groups))

    def reset(self) -> None:
        self.all_gathers = self.reduce_scatters = 0
        self.peak_bytes = self.peak_blocks = 0
        self.observe()


def build(setup: Setup, options):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_hwbp import fsdp as hw_fsdp
    from hf_hwbp import patch_model

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
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=setup.reshard_after_forward)
    fully_shard(model, reshard_after_forward=setup.reshard_after_forward)
    if setup.k is not None:
        hw_fsdp.set_lifecycle(model, setup.lifecycle)
        patch_model(model, k=setup.k)  # connects itself to FSDP2 at its first training forward
    return model.train()


def train_step(model, setup: Setup, ids) -> None:
    for m, rows in enumerate(ids.chunk(setup.micro_batches)):
        model.set_requires_gradient_sync(m == setup.micro_batches - 1)
        (model(input_ids=rows, labels=rows).loss / setup.micro_batches).backward()
    for p in model.parameters():
        p.grad = None


def worker(options) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(options.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    runs = setups(options.k)
    models = [build(setup, options) for setup in runs]
    root_groups = {
        id(group) for model in models for group in model._get_fsdp_state()._fsdp_param_groups
    }  # the root's group (embeddings, final norm, head)
    counters = Counters(root_groups)
    generator = torch.Generator().manual_seed(1 + rank)
    measured: list[list[dict]] = [[] for _ in runs]
    for round_ in range(options.rounds + 1):  # round 0 warms up (and creates FSDP's unsharded parameters)
        for n, (setup, model) in enumerate(zip(runs, models)):
            ids = torch.randint(
                0, options.vocab, (options.batch * setup.micro_batches, options.length), generator=generator
            )
            dist.barrier()
            counters.reset()
            start = time.perf_counter()
            train_step(model, setup, ids)
            elapsed = time.perf_counter() - start
            if round_ > 0:
                measured[n].append(
                    {
                        "step_s": elapsed,
                        "all_gathers": counters.all_gathers,
                        "reduce_scatters": counters.reduce_scatters,
                        "peak_bytes": counters.peak_bytes,
                        "peak_blocks": counters.peak_blocks,
                    }
                )
    rows = []
    for setup, steps in zip(runs, measured):
        step_s = torch.tensor(statistics.median(s["step_s"] for s in steps))
        peak = torch.tensor([max(s["peak_bytes"] for s in steps), max(s["peak_blocks"] for s in steps)])
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        rows.append(
            {
                "layers": options.layers,
                "setup": setup.name,
                **asdict(setup),
                "step_s": step_s.item(),
                "step_s_rounds": [s["step_s"] for s in steps],
                "all_gathers_per_step": steps[-1]["all_gathers"],
                "reduce_scatters_per_step": steps[-1]["reduce_scatters"],
                "peak_unsharded_MiB": peak[0].item() / 2**20,
                "blocks_gathered_at_once": int(peak[1].item()),
            }
        )
    if rank == 0:
        Path(options.rows_file).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ----- driver --------------------------------------------------------------------------------------------------
MODEL_ARGS = ("hidden", "vocab", "length", "batch", "rounds", "threads")


def drive(options) -> None:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    load_before = loadavg()
    for layers in options.layers:
        rows_file = out / f"rows_{layers}.json"
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
            "--layers",
            str(layers),
            "--rows_file",
            str(rows_file),
            "--k",
            *map(str, options.k),
        ]
        for name in MODEL_ARGS:
            command += [f"--{name}", str(getattr(options, name))]
        env = {**os.environ, "OMP_NUM_THREADS": str(options.threads)}
        print(f"+ {layers} blocks (load {loadavg()})", flush=True)
        subprocess.run(command, env=env, check=True, capture_output=not options.verbose)
        new = json.loads(rows_file.read_text())
        rows_file.unlink()
        print(table(new), flush=True)
        rows += new
    summary = {
        "command": "python -m benchmarks.bench_fsdp "
        + " ".join(f"--{n} {getattr(options, n)}" for n in MODEL_ARGS)
        + f" --layers {' '.join(map(str, options.layers))} --k {' '.join(map(str, options.k))}",
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = [
        "| blocks | set-up | step (s) | / backprop | all-gathers / step | reduce-scatters / step | "
        "peak unsharded params (MiB) | blocks gathered at once |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = next(
            b
            for b in rows
            if b["layers"] == r["layers"]
            and b["k"] is None
            and b["reshard_after_forward"] == r["reshard_after_forward"]
            and b["micro_batches"] == r["micro_batches"]
        )
        lines.append(
            f"| {r['layers']} | {r['setup']} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | "
            f"{r['all_gathers_per_step']} | {r['reduce_scatters_per_step']} | {r['peak_unsharded_MiB']:.1f} | "
            f"{r['blocks_gathered_at_once']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 12, 24], help="numbers of blocks, one run each")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank and micro-batch")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows_file", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        options.layers = options.layers[0]
        worker(options)
    else:
        drive(options)


if __name__ == "__main__":
    main()
