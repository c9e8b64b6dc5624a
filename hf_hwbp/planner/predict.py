"""Step times the planner predicts: the calibrated simulator (``hf_hwbp.parallel.simulate``) for one device and
layer-parallel stages, measured per-rank compute plus modelled collectives for DDP and FSDP2.

Every prediction is for the same batch as the measurement (one optimizer step on ``batch`` samples): one device
runs it whole, S pipeline stages run it as M micro-batches, N data-parallel ranks run ``batch / N`` samples each.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..parallel.graph import BACKPROP_SCHEDULES
from ..parallel.simulate import StackCosts, best_backprop, fit_task_overhead, predict

DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb
DDP_FIRST_BUCKET_BYTES = 1 * 2**20  # its first bucket


@dataclass
class CollectiveFit:
    """Seconds of one collective over the whole group: ``latency + nbytes * seconds_per_byte`` (nbytes: the
    size of the reduced tensor, or of the gathered one), fitted to two measured sizes."""

    latency: float
    seconds_per_byte: float

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes * self.seconds_per_byte

    @classmethod
    def from_two(cls, small: tuple[int, float], large: tuple[int, float]) -> CollectiveFit:
        (b0, t0), (b1, t1) = small, large
        slope = max(0.0, (t1 - t0) / max(1, b1 - b0))
        return cls(max(0.0, t0 - b0 * slope), slope)


@dataclass
class Link:
    """What ``--processes N`` measured between the ranks."""

    world_size: int
    backend: str
    latency: float  # point-to-point, one way (ranks 0 and 1)
    seconds_per_byte: float
    all_reduce: CollectiveFit
    all_gather: CollectiveFit

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Link:
        data = dict(data)
        data["all_reduce"] = CollectiveFit(**data["all_reduce"])
        data["all_gather"] = CollectiveFit(**data["all_gather"])
        return cls(**data)


def _buckets(total: int, first: int, size: int) -> list[int]:
    out = [min(total, first)]
    rest = total - out[0]
    while rest > 0:
        out.append(min(rest, size))
        rest -= out[-1]
    return out


def ddp_comm_seconds(grad_bytes: int, link: Link) -> float:
    """DDP's gradient all-reduces per step: one per bucket (1 MiB first, then 25 MiB), none overlapped with the
    backward (an upper bound: DDP starts a bucket's all-reduce as soon as its gradients are ready)."""
    return sum(link.all_reduce.seconds(b) for b in _buckets(grad_bytes, DDP_FIRST_BUCKET_BYTES, DDP_BUCKET_BYTES))


def fsdp2_comm_seconds(unit_bytes: list[int], link: Link, reshard_after_forward: bool = True) -> float:
    """FSDP2's collectives per step with one ``fully_shard`` unit per block plus the root (``unit_bytes``: each
    unit's parameter bytes): an all-gather per unit in the forward, another in the backward when it reshards
    after the forward, and a reduce-scatter of its gradients (modelled as an all-gather of the same bytes: a
    ring moves the same data). Highway-BP issues exactly these (docs/fsdp.md), whatever k. Not overlapped."""
    gathers = 2 if reshard_after_forward else 1
    return sum((gathers + 1) * link.all_gather.seconds(b) for b in unit_bytes)


def one_device(costs: StackCosts, batch: int, ks: list[int], num_blocks: int) -> tuple[float, dict[int, float]]:
    """(backprop, {k: Highway-BP(k)}) seconds of one step on one device, from per-layer costs: backprop is one
    stage's forward and backward; Highway-BP(k) is the graph of ``patch_model``'s engine on one stage (its
    parameter VJPs in one final sweep); a k that reaches the blocks runs the model's own backward."""
    backprop = predict("gpipe", costs, 1, 1, batch=batch, overhead=0.0)
    highway = {
        k: backprop if k >= num_blocks else predict("highway", costs, 1, 1, k, batch=batch, fuse=False) for k in ks
    }
    return backprop, highway


def layer_parallel(
    costs: StackCosts,
    stages: int,
    microbatches: int,
    batch: int,
    ks: list[int],
    plan_costs: StackCosts | None = None,
) -> tuple[str, float, dict[int, float]]:
    """(fastest backprop schedule torch can run here, its seconds, {k: Highway-BP(k) seconds}) for S stages and
    M micro-batches of ``batch`` samples."""
    name, backprop = best_backprop(costs, stages, microbatches, batch=batch, schedules=BACKPROP_SCHEDULES)
    highway = {k: predict("highway", costs, stages, microbatches, k, batch=batch, plan_costs=plan_costs) for k in ks}
    return name, backprop, highway


def speedup_map(costs: StackCosts, batch: int, ks: list[int], stages: list[int], microbatches: list[int]) -> list[dict]:
    """For every S and M that fit (S <= blocks, M <= batch): the best backprop schedule and Highway-BP(k)'s
    speed-up over it (above 1: Highway-BP faster)."""
    cells = []
    for s in stages:
        for m in microbatches:
            if s > costs.num_layers or m > batch:
                continue
            name, backprop, highway = layer_parallel(costs, s, m, batch, ks)
            cells.append(
                {
                    "S": s,
                    "M": m,
                    "best_backprop": name,
                    "best_backprop_s": backprop,
                    "highway_s": {str(k): v for k, v in highway.items()},
                    "speedup": {str(k): backprop / v for k, v in highway.items()},
                }
            )
    return cells


def predict_run(run: dict, costs: StackCosts, world: int, batch: int, plan_costs: StackCosts | None = None) -> float:
    """The simulator's step time of one measured layer-parallel run: ``{"method": "highway" | "pipeline" | a torch
    schedule, "k", "M"}`` ("pipeline": pipeline backprop through hf_hwbp's runtime, GPipe order)."""
    if run["method"] == "highway":
        return predict("highway", costs, world, run["M"], run["k"], batch=batch, plan_costs=plan_costs)
    if run["method"] == "pipeline":
        return predict("gpipe", costs, world, run["M"], batch=batch, overhead=costs.task_overhead)
    return predict(run["method"], costs, world, run["M"], batch=batch)


def runtime_of(run: dict) -> str:
    return "hf_hwbp" if run["method"] in ("highway", "pipeline") else "torch"


def fit_overheads(runs: list[dict], costs: StackCosts, world: int, batch: int) -> dict[str, float]:
    """Per-task overheads of the two runtimes from steps measured on layers that cost almost nothing: for each
    run (see ``predict_run``, with its measured ``median_s``) the overhead at which the simulator reproduces its
    step; the median over hf_hwbp's runs and over torch's (``benchmarks/simulate_pipeline.py``'s method)."""
    import statistics

    fitted: dict[str, list[float]] = {"hf_hwbp": [], "torch": []}
    for run in runs:
        runtime = runtime_of(run)
        field = "task_overhead" if runtime == "hf_hwbp" else "torch_task_overhead"

        def with_overhead(overhead: float, run=run, field=field) -> float:
            return predict_run(run, replace(costs, **{field: overhead}), world, batch)

        fitted[runtime].append(fit_task_overhead(with_overhead, run["median_s"]))
    return {name: statistics.median(values) if values else 0.0 for name, values in fitted.items()}


__all__ = [
    "CollectiveFit",
    "Link",
    "ddp_comm_seconds",
    "fit_overheads",
    "fsdp2_comm_seconds",
    "layer_parallel",
    "one_device",
    "predict_run",
    "runtime_of",
    "speedup_map",
]
