"""A calibrated model of layer-parallel schedules: replay a step's dependency graph with measured costs.

    from hf_hwbp.parallel.simulate import StackCosts, predict
    costs = StackCosts.load("results/pipeline/costs_gpt2.json")     # measured by benchmarks/simulate_pipeline.py
    predict("highway", costs, num_ranks=8, microbatches=4, k=1)    # seconds per step
    predict("zbv", costs, num_ranks=8, microbatches=4)

The model: every rank runs its tasks one at a time (``graph.py``); a task starts when its rank is free and its
inputs are there; an input from another rank arrives ``latency + bytes * seconds_per_byte`` after its producer
ended. A task costs what one layer costs (measured on the user's hardware for the micro-batch size, per kind
of work) times the layers it covers, plus the embeddings / head where it runs them, plus a fixed per-task
overhead of the runtime that runs it (``task_overhead`` for ``hf_hwbp``'s runtime, ``torch_task_overhead`` for
``torch.distributed.pipelining``: Python dispatch, building the side inputs, posting messages; measured
separately on a model whose layers cost almost nothing, see ``fit_task_overhead``). Backprop schedules keep
torch's per-rank order; Highway-BP's order is chosen by list scheduling on the graph (``list_schedule``),
the same order the runtime executes.

Kinds of per-layer work (seconds, one micro-batch):
``f`` forward; ``b`` full backward (input and weight gradients); ``v`` input-only VJP (Highway inflow); ``w``
weight-only VJP from the output gradient (Highway parameter step: it re-traverses the layer); ``bi`` / ``bw``
torch's zero-bubble split (input backward that keeps the intermediate gradients, then the weight backward).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .graph import BACKPROP_SCHEDULES, HighwayShape, StepGraph, Task, backprop_graph, highway_graph


# ----- costs -----------------------------------------------------------------------------------------------------
@dataclass
class WorkCosts:
    """Seconds of one piece of work for one micro-batch size (per layer for the layer kinds)."""

    f: float
    b: float
    v: float
    w: float
    bi: float
    bw: float
    embed_f: float = 0.0
    embed_b: float = 0.0
    head_f: float = 0.0  # final norm + LM head + loss, forward
    head_b: float = 0.0  # their backward (input and weights)
    head_bi: float = 0.0  # their backward to the stack output only
    add: float = 0.0  # one addition of two activation tensors (the scan's local work)


@dataclass
class StackCosts:
    """Measured costs of a stack: per micro-batch size (samples), plus the link between ranks.

    Attributes:
        name: what was measured (model, shapes, machine).
        num_layers: L of the measured stack.
        layers_per_block: G (Highway block size).
        activation_bytes_per_sample: bytes of one sample's activation (seq x hidden x element size).
        by_batch: samples per micro-batch -> costs; sizes in between are interpolated per sample, larger ones
            scaled linearly from the largest measured.
        latency: seconds a message takes before its first byte (per message).
        seconds_per_byte: inverse bandwidth of the link.
        task_overhead: seconds every task of ``hf_hwbp``'s runtime costs beyond its work (Highway-BP and pipeline
            backprop through ``LayerParallelHighway``).
        torch_task_overhead: the same for an action of ``torch.distributed.pipelining``'s schedules.
    """

    name: str
    num_layers: int
    layers_per_block: int
    activation_bytes_per_sample: float
    by_batch: dict[int, WorkCosts]
    latency: float = 0.0
    seconds_per_byte: float = 0.0
    notes: dict = field(default_factory=dict)
    task_overhead: float = 0.0
    torch_task_overhead: float = 0.0

    def at(self, samples: float) -> WorkCosts:
        """Costs for a micro-batch of ``samples`` samples (linear in samples between / beyond measured sizes)."""
        sizes = sorted(self.by_batch)
        if samples in self.by_batch:
            return self.by_batch[samples]
        lo = max((s for s in sizes if s <= samples), default=None)
        hi = min((s for s in sizes if s >= samples), default=None)
        if lo is None or hi is None:
            ref = sizes[0] if lo is None else sizes[-1]
            return _scale(self.by_batch[ref], samples / ref)
        a, b = self.by_batch[lo], self.by_batch[hi]
        t = (samples - lo) / (hi - lo)
        return WorkCosts(**{k: (1 - t) * getattr(a, k) + t * getattr(b, k) for k in asdict(a)})

    def scaled(
        self,
        name: str,
        num_layers: int,
        *,
        layer: float,
        head: float,
        embed: float,
        activation: float,
    ) -> StackCosts:
        """Another stack of ``num_layers`` layers whose per-sample costs are these times a factor: ``layer`` for
        every kind of layer work (so the measured ratios between kinds are kept), ``head`` for the head,
        ``embed`` for the embeddings and the scan's additions, ``activation`` for the bytes of a message."""
        factors = {"embed_f": embed, "embed_b": embed, "add": embed, "head_f": head, "head_b": head, "head_bi": head}

        def scale(c: WorkCosts) -> WorkCosts:
            return WorkCosts(**{k: v * factors.get(k, layer) for k, v in asdict(c).items()})

        return replace(
            self,
            name=name,
            num_layers=num_layers,
            activation_bytes_per_sample=self.activation_bytes_per_sample * activation,
            by_batch={s: scale(c) for s, c in self.by_batch.items()},
            notes={
                **self.notes,
                "scaled_from": self.name,
                "factors": {"layer": layer, "head": head, "embed": embed, "activation": activation},
            },
        )

    def message_seconds(self, samples: float) -> float:
        return self.latency + samples * self.activation_bytes_per_sample * self.seconds_per_byte

    def to_json(self) -> dict:
        data = asdict(self)
        data["by_batch"] = {str(k): asdict(v) for k, v in self.by_batch.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> StackCosts:
        data = dict(data)
        data["by_batch"] = {int(k): WorkCosts(**v) for k, v in data["by_batch"].items()}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> StackCosts:
        return cls.from_json(json.loads(Path(path).read_text()))


def _scale(c: WorkCosts, factor: float) -> WorkCosts:
    return WorkCosts(**{k: v * factor for k, v in asdict(c).items()})


def split_batch(batch: int, microbatches: int) -> list[int]:
    """Micro-batch sizes along dim 0, as the runtime splits them (the first ones take the remainder)."""
    if not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches must be in [1, batch size {batch}], got {microbatches}.")
    base, extra = divmod(batch, microbatches)
    return [base + (1 if m < extra else 0) for m in range(microbatches)]


def even_split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if s < extra else 0) for s in range(parts)]


# ----- task costs --------------------------------------------------------------------------------------------------
def highway_task_cost(shape: HighwayShape, costs: StackCosts, sizes: list[int], fuse: bool = True):
    """cost(task) in seconds for the Highway graph of ``shape`` (blocks of ``costs.layers_per_block`` layers)."""
    g = costs.layers_per_block
    top = len(shape.blocks_per_stage) - 1
    k = shape.iterations

    def cost(task: Task) -> float:
        return work(task) + costs.task_overhead

    def work(task: Task) -> float:
        c = costs.at(sizes[task.mb])
        blocks = shape.blocks_per_stage[task.stage]
        if task.kind == "F":
            return blocks * g * c.f + (c.embed_f if task.stage == 0 else 0.0)
        if task.kind == "H":
            return c.head_f + c.head_b
        if task.kind == "V":
            total = 0.0
            for j in shape.fresh_blocks(task.stage, task.index):
                fused = fuse and shape.final_at(j) == task.index
                total += g * (c.b if fused else c.v)
            return total
        if task.kind == "R":
            return (blocks + (1 if task.stage < top else 0)) * c.add
        if task.kind == "W":
            j = shape.first_block(task.stage) + task.index + 1
            fused = fuse and shape.final_at(j) <= k and j in shape.fresh_blocks(task.stage, shape.final_at(j))
            return 0.0 if fused else g * c.w
        if task.kind == "E":
            return c.embed_b
        raise ValueError(f"no cost for {task}")

    return cost


def backprop_task_cost(graph: StepGraph, costs: StackCosts, sizes: list[int], overhead: float | None = None):
    """cost(task) for a backprop schedule: its (virtual) stages split the layers evenly. ``overhead``: seconds per
    task beyond its work (default: ``costs.torch_task_overhead``, torch's schedules)."""
    num_virtual = len(graph.placement)
    layers = even_split(costs.num_layers, num_virtual)
    extra = costs.torch_task_overhead if overhead is None else overhead

    def cost(task: Task) -> float:
        return work(task) + extra

    def work(task: Task) -> float:
        c = costs.at(sizes[task.mb])
        n = layers[task.stage]
        first, last = task.stage == 0, task.stage == num_virtual - 1
        if task.kind == "F":
            return n * c.f + (c.embed_f if first else 0.0) + (c.head_f if last else 0.0)
        if task.kind == "B":
            return n * c.b + (c.embed_b if first else 0.0) + (c.head_b if last else 0.0)
        if task.kind == "I":
            return n * c.bi + (c.head_bi if last else 0.0)
        if task.kind == "W":
            return n * c.bw + (c.embed_b if first else 0.0) + (c.head_b - c.head_bi if last else 0.0)
        raise ValueError(f"no cost for {task}")

    return cost


def message_latency(graph: StepGraph, costs: StackCosts, sizes: list[int]):
    def latency(src: Task, dst: Task) -> float:
        if graph.rank(src) == graph.rank(dst):
            return 0.0
        return costs.message_seconds(sizes[src.mb])

    return latency


# ----- scheduling ----------------------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """When every task ran. ``order[r]`` is rank r's sequence of tasks."""

    start: dict[Task, float]
    end: dict[Task, float]
    order: list[list[Task]]

    @property
    def makespan(self) -> float:
        return max(self.end.values(), default=0.0)

    def busy(self, rank: int) -> float:
        return sum(self.end[t] - self.start[t] for t in self.order[rank])


def replay(graph: StepGraph, cost: Callable[[Task], float], latency: Callable[[Task, Task], float]) -> Timeline:
    """Run ``graph.order`` (every rank in its fixed order): each task starts when its rank is free and its
    inputs have arrived."""
    if graph.order is None:
        raise ValueError("replay needs a graph with a fixed per-rank order; use list_schedule otherwise.")
    start: dict[Task, float] = {}
    end: dict[Task, float] = {}
    pos = [0] * graph.num_ranks
    free = [0.0] * graph.num_ranks
    remaining = sum(len(o) for o in graph.order)
    while remaining:
        progressed = False
        for r, tasks in enumerate(graph.order):
            while pos[r] < len(tasks):
                task = tasks[pos[r]]
                deps = graph.deps[task]
                if any(d not in end for d in deps):
                    break
                t0 = max([free[r]] + [end[d] + latency(d, task) for d in deps])
                start[task], end[task] = t0, t0 + cost(task)
                free[r] = end[task]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [str(tasks[pos[r]]) for r, tasks in enumerate(graph.order) if pos[r] < len(tasks)]
            raise RuntimeError(f"The per-rank orders deadlock: every rank waits ({', '.join(stuck)}).")
    return Timeline(start, end, [list(o) for o in graph.order])


def bottom_levels(graph: StepGraph, cost, latency) -> dict[Task, float]:
    """Longest remaining path (cost plus message latencies) from each task to the end of the step."""
    succ = graph.successors()
    level: dict[Task, float] = {}
    for task in reversed(list(graph.deps)):  # deps are in topological order
        level[task] = cost(task) + max((latency(task, s) + level[s] for s in succ[task]), default=0.0)
    return level


def list_schedule(graph: StepGraph, cost, latency, priority: dict[Task, tuple] | None = None) -> Timeline:
    """Choose every rank's order greedily: whenever a rank can start something, it starts the ready task with
    the highest priority. Default: scans first (they are cheap and unblock the stages below), then the longest
    path to the end of the step; ties: earlier micro-batch."""
    if priority is None:
        levels = bottom_levels(graph, cost, latency)
        priority = {t: (t.kind == "R", level) for t, level in levels.items()}
    succ = graph.successors()
    missing = {t: len(d) for t, d in graph.deps.items()}
    ready_at: dict[Task, float] = {}
    candidates: list[list[tuple]] = [[] for _ in range(graph.num_ranks)]  # heaps of (ready time, -priority, task)
    start: dict[Task, float] = {}
    end: dict[Task, float] = {}
    order: list[list[Task]] = [[] for _ in range(graph.num_ranks)]
    free = [0.0] * graph.num_ranks

    def push(task: Task) -> None:
        t = max([end[d] + latency(d, task) for d in graph.deps[task]], default=0.0)
        ready_at[task] = t
        candidates[graph.rank(task)].append(task)

    for task, n in missing.items():
        if n == 0:
            push(task)
    heap: list[tuple[float, int]] = []
    remaining = len(missing)
    while remaining:
        heap.clear()
        for r, cands in enumerate(candidates):
            if cands:
                heapq.heappush(heap, (max(free[r], min(ready_at[t] for t in cands)), r))
        if not heap:
            raise RuntimeError("The graph has a cycle.")
        when, r = heap[0]
        ready = [t for t in candidates[r] if ready_at[t] <= when]
        task = max(ready, key=lambda t: (priority[t], -t.mb, -t.index))
        candidates[r].remove(task)
        start[task], end[task] = when, when + cost(task)
        free[r] = end[task]
        order[r].append(task)
        remaining -= 1
        for s in succ[task]:
            missing[s] -= 1
            if missing[s] == 0:
                push(s)
    return Timeline(start, end, order)


# ----- predictions ---------------------------------------------------------------------------------------------------
def highway_shape(num_layers: int, layers_per_block: int, num_ranks: int, microbatches: int, k: int) -> HighwayShape:
    blocks = -(-num_layers // layers_per_block)
    if num_ranks > blocks:
        raise ValueError(f"{num_ranks} ranks need at least as many Highway blocks ({blocks}).")
    return HighwayShape(tuple(even_split(blocks, num_ranks)), microbatches, k)


def highway_timeline(
    costs: StackCosts,
    num_ranks: int,
    microbatches: int,
    k: int,
    batch: int | None = None,
    plan_costs: StackCosts | None = None,
    fuse: bool = True,
):
    """The Highway-BP(k) step for ``batch`` samples (default: M): the graph and its timeline with ``costs``, in
    the order list scheduling chooses with ``plan_costs`` (default: the same costs; the runtime plans with the
    costs it was given, which may be an earlier measurement). ``fuse``: a block whose delta is final gets its
    input and parameter VJPs in one pass, as the layer-parallel runtime does; ``fuse=False`` is the one-device
    engine of ``patch_model`` (every block's parameter VJP in the final sweep)."""
    batch = microbatches if batch is None else batch
    sizes = split_batch(batch, microbatches)
    shape = highway_shape(costs.num_layers, costs.layers_per_block, num_ranks, microbatches, k)
    graph = highway_graph(shape)
    cost = highway_task_cost(shape, costs, sizes, fuse)
    latency = message_latency(graph, costs, sizes)
    if plan_costs is None:
        return graph, list_schedule(graph, cost, latency)
    planned = list_schedule(
        graph, highway_task_cost(shape, plan_costs, sizes, fuse), message_latency(graph, plan_costs, sizes)
    )
    fixed = StepGraph(graph.num_ranks, graph.placement, graph.deps, planned.order, graph.info)
    return fixed, replay(fixed, cost, latency)


def backprop_timeline(
    schedule: str,
    costs: StackCosts,
    num_ranks: int,
    microbatches: int,
    batch: int | None = None,
    overhead: float | None = None,
):
    """The backprop step of ``schedule`` (``overhead``: per task, default torch's, see ``backprop_task_cost``)."""
    batch = microbatches if batch is None else batch
    sizes = split_batch(batch, microbatches)
    graph = backprop_graph(schedule, num_ranks, microbatches)
    cost = backprop_task_cost(graph, costs, sizes, overhead)
    return graph, replay(graph, cost, message_latency(graph, costs, sizes))


def predict(
    method: str,
    costs: StackCosts,
    num_ranks: int,
    microbatches: int,
    k: int = 0,
    batch: int | None = None,
    plan_costs: StackCosts | None = None,
    overhead: float | None = None,
    fuse: bool = True,
) -> float:
    """Predicted seconds per step of ``method`` ("highway" or a backprop schedule name); ``plan_costs`` and
    ``fuse``: see ``highway_timeline``; ``overhead``: per task of a backprop schedule (default torch's;
    ``costs.task_overhead`` for pipeline backprop through ``LayerParallelHighway``)."""
    if method == "highway":
        return highway_timeline(costs, num_ranks, microbatches, k, batch, plan_costs, fuse)[1].makespan
    return backprop_timeline(method, costs, num_ranks, microbatches, batch, overhead)[1].makespan


def fit_task_overhead(predict_with: Callable[[float], float], measured: float, high: float = 1.0) -> float:
    """The per-task overhead (seconds, >= 0) at which ``predict_with(overhead)`` (a step time, non-decreasing in
    the overhead) equals ``measured``; 0 when the prediction without overhead is already slower. Bisection."""
    low = 0.0
    if predict_with(low) >= measured:
        return 0.0
    while predict_with(high) < measured:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if predict_with(mid) < measured else (low, mid)
    return (low + high) / 2


def runnable(schedule: str, num_ranks: int, microbatches: int, num_layers: int) -> bool:
    """Whether torch can run ``schedule`` here (and the stack has a layer for every virtual stage)."""
    from .baselines import SCHEDULES, schedule_requirement

    stages = SCHEDULES[schedule][1] * num_ranks
    return stages <= num_layers and schedule_requirement(schedule, microbatches, num_ranks) is None


def best_backprop(
    costs: StackCosts,
    num_ranks: int,
    microbatches: int,
    batch: int | None = None,
    schedules: tuple[str, ...] = BACKPROP_SCHEDULES,
) -> tuple[str, float]:
    """The fastest backprop schedule that runs here, and its predicted step time."""
    options = [
        (predict(s, costs, num_ranks, microbatches, batch=batch), s)
        for s in schedules
        if runnable(s, num_ranks, microbatches, costs.num_layers)
    ]
    seconds, name = min(options)
    return name, seconds
