"""The dependency graph of one layer-parallel training step: tasks, who runs them, what each waits for.

A step is a set of tasks; each runs on one rank and waits for the outputs of its dependencies (a dependency on
another rank is a message: the producer sends its output there). The same graphs drive the runtime (which
executes a rank's tasks in a fixed order) and the simulator (which replays them with measured costs).

Highway-BP(k) on S stages and M micro-batches (stage s holds a run of the N Highway blocks):

- ``F(s, m)``: forward of the stage's layers for micro-batch m; waits for ``F(s - 1, m)`` (activations).
- ``H(m)`` (last stage): head, loss and their backward: d_m = dloss_m/dh_N, sent to every stage.
- ``V(s, m, n)``, n = 1..k: the input-VJPs of the stage's blocks with delta^(n-1) (the inflow); waits for
  ``F(s, m)`` and d_m (n = 1) or ``R(s, m, n - 1)``. Blocks whose delta is final reuse their VJP (skipped).
- ``R(s, m, n)``: the scan: receives from the stage above the sum of its and every higher stage's inflow,
  passes the sum including its own inflow down, and accumulates delta^(n) of its blocks. It waits for
  ``V(s, m, n)`` and ``R(s + 1, m, n)`` only: a micro-batch's iterations wait for no other stage's finished
  backward, and different micro-batches never wait for each other.
- ``W(s, m, i)``: the parameter VJP of local block i with delta^(k) (one task per block, so that the weight
  work can fill the gaps); ``E(m)`` (first stage): the embeddings' backward with delta^(k)_0.

Pipeline backprop (the baselines): ``F(v, m)`` (the last stage also runs the head and the loss), and either
``B(v, m)`` (full backward; waits for the backward of ``v + 1``) or its zero-bubble split ``I(v, m)`` (input
gradient) + ``W(v, m)`` (weight gradient, waits for ``I(v, m)`` only). Multi-stage-per-rank schedules place
2S virtual stages on S ranks; their per-rank orders are read from ``torch.distributed.pipelining`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class TaskKind(str, Enum):
    """What a task computes (the letters of the module docstring); a ``str`` enum, so ``kind == "F"`` holds."""

    F = "F"  # forward of a stage
    H = "H"  # head, loss and their backward (Highway-BP, last stage)
    V = "V"  # input-VJPs of a stage's blocks for one Highway iteration
    R = "R"  # the scan of one Highway iteration
    W = "W"  # parameter VJPs (Highway-BP) or weight gradient (zero-bubble backprop)
    E = "E"  # the embeddings' backward (Highway-BP, first stage)
    B = "B"  # full backward of a stage (pipeline backprop)
    I = "I"  # noqa: E741 (the schedules' letter) input gradient of a stage (zero-bubble backprop)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, order=True)
class Task:
    """One unit of work of one (virtual) stage on one micro-batch.

    ``index`` is the Highway iteration n for V and R, the local block for a Highway W, 0 otherwise. ``kind`` may be
    given as its letter; it is stored as a ``TaskKind`` (an unknown letter raises ``ValueError``).
    """

    kind: TaskKind
    stage: int
    mb: int
    index: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TaskKind(self.kind))

    def __str__(self) -> str:
        extra = f",{self.index}" if self.kind in ("V", "R") or (self.kind == "W" and self.index) else ""
        return f"{self.kind}({self.stage},{self.mb}{extra})"


@dataclass
class StepGraph:
    """Tasks with their dependencies and placement.

    Attributes:
        num_ranks: the processes.
        placement: rank of every (virtual) stage.
        deps: task -> the tasks whose output it needs, in insertion order (every task is a key).
        order: optional fixed per-rank order (the backprop schedules); None: a scheduler chooses one.
        info: what the graph describes (method, k, M, ...), for reports.
    """

    num_ranks: int
    placement: list[int]
    deps: dict[Task, list[Task]] = field(default_factory=dict)
    order: list[list[Task]] | None = None
    info: dict = field(default_factory=dict)

    def rank(self, task: Task) -> int:
        return self.placement[task.stage]

    def add(self, task: Task, *deps: Task) -> Task:
        self.deps[task] = [d for d in deps if d is not None]
        return task

    def tasks_of(self, rank: int) -> list[Task]:
        return [t for t in self.deps if self.rank(t) == rank]

    def successors(self) -> dict[Task, list[Task]]:
        out: dict[Task, list[Task]] = {t: [] for t in self.deps}
        for task, deps in self.deps.items():
            for d in deps:
                out[d].append(task)
        return out

    def sends(self, task: Task) -> list[int]:
        """The ranks ``task``'s output is sent to (those of its successors on other ranks), ascending."""
        here = self.rank(task)
        return sorted({self.rank(s) for s in self._succ().get(task, ()) if self.rank(s) != here})

    def remote_deps(self, task: Task) -> list[Task]:
        """The dependencies of ``task`` that run on another rank (their outputs arrive as messages)."""
        here = self.rank(task)
        return [d for d in self.deps[task] if self.rank(d) != here]

    def _succ(self) -> dict[Task, list[Task]]:
        if getattr(self, "_succ_cache", None) is None or len(self._succ_cache) != len(self.deps):
            self._succ_cache = self.successors()
        return self._succ_cache


@dataclass(frozen=True)
class HighwayShape:
    """What the Highway graph depends on.

    Attributes:
        blocks_per_stage: Highway blocks held by each stage, bottom to top (N = their sum).
        microbatches: M.
        k: Highway iterations (clamped to N).
        need_input_grad: whether the embeddings want delta^(k)_0 (otherwise block 1's VJP is skipped).
        tol: whether the adaptive stop is on (each scan then also all-reduces two scalars: every rank takes
            part in every R, in one global order).
    """

    blocks_per_stage: tuple[int, ...]
    microbatches: int
    k: int
    need_input_grad: bool = True
    tol: bool = False

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_per_stage)

    @property
    def iterations(self) -> int:
        return min(self.k, self.num_blocks)

    def first_block(self, stage: int) -> int:
        """Global 0-based index of the stage's first block (its blocks are first + 1 .. first + count)."""
        return sum(self.blocks_per_stage[:stage])

    def fresh_blocks(self, stage: int, n: int) -> list[int]:
        """Global 1-based blocks of ``stage`` whose VJP iteration n computes (the others reuse theirs, or feed
        only an unwanted delta_0)."""
        first = self.first_block(stage)
        top = self.num_blocks - n + 1  # delta^(n-1)_j is final (and its VJP already known) for j > top
        blocks = range(first + 1, first + self.blocks_per_stage[stage] + 1)
        return [j for j in blocks if j <= top and (j > 1 or self.need_input_grad)]

    def final_at(self, block: int) -> int:
        """The iteration whose VJP of ``block`` uses its final delta (N - block + 1; > k: none does)."""
        return self.num_blocks - block + 1


def highway_graph(shape: HighwayShape) -> StepGraph:
    """The dependency graph of one layer-parallel Highway-BP(k) step (module docstring)."""
    num_stages = len(shape.blocks_per_stage)
    top = num_stages - 1
    k = shape.iterations
    graph = StepGraph(num_stages, list(range(num_stages)), info={"method": "highway", "k": k})
    previous_r: dict[int, Task] = {}  # with tol: the last R of each rank, to keep one global order
    for m in range(shape.microbatches):
        for s in range(num_stages):
            graph.add(Task("F", s, m), Task("F", s - 1, m) if s else None)
        head = graph.add(Task("H", top, m), Task("F", top, m))
        for s in range(num_stages):
            done = head
            for n in range(1, k + 1):
                graph.add(Task("V", s, m, n), Task("F", s, m) if n == 1 else None, done)
                done = Task("R", s, m, n)
            for i in range(shape.blocks_per_stage[s]):
                graph.add(Task("W", s, m, i), done)
            if s == 0 and shape.need_input_grad:
                graph.add(Task("E", 0, m), done)
        for n in range(1, k + 1):
            for s in range(top, -1, -1):
                deps = [Task("V", s, m, n), Task("R", s + 1, m, n) if s < top else None]
                if shape.tol:  # the stop statistics are summed over every rank: all take part in every R
                    deps += [Task("V", q, m, n) for q in range(s)] + [previous_r.get(s)]
                graph.add(Task("R", s, m, n), *deps)
                previous_r[s] = Task("R", s, m, n)
    # dependencies must be known before their users: move R tasks ahead of the W/E/V that wait for them
    return _topological(graph)


def _topological(graph: StepGraph) -> StepGraph:
    done: set[Task] = set()
    ordered: dict[Task, list[Task]] = {}

    def visit(task: Task) -> None:
        stack = [(task, False)]
        while stack:
            t, expanded = stack.pop()
            if t in done:
                continue
            if expanded:
                done.add(t)
                ordered[t] = graph.deps[t]
                continue
            stack.append((t, True))
            stack.extend((d, False) for d in reversed(graph.deps[t]) if d not in done)

    for t in list(graph.deps):
        visit(t)
    graph.deps = ordered
    return graph


# ----- backprop schedules ---------------------------------------------------------------------------------------
BACKPROP_SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb", "zbv", "dualpipev")


def backprop_graph(schedule: str, num_ranks: int, microbatches: int) -> StepGraph:
    """Pipeline backprop as torch schedules it: the graph and every rank's order of tasks.

    ``gpipe`` and ``1f1b`` (one stage per rank) follow ``ScheduleGPipe`` / ``Schedule1F1B``; the others are
    read from the corresponding ``torch.distributed.pipelining`` class (two virtual stages per rank).
    """
    if schedule not in BACKPROP_SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(BACKPROP_SCHEDULES)}.")
    if schedule in ("gpipe", "1f1b"):
        placement = list(range(num_ranks))
        order = [_single_stage_order(schedule, r, num_ranks, microbatches) for r in range(num_ranks)]
    else:
        placement, order = _torch_multi_stage_order(schedule, num_ranks, microbatches)
    graph = StepGraph(num_ranks, placement, info={"method": schedule})
    num_virtual = len(placement)
    backward_kind: dict[tuple[int, int], str] = {}
    for tasks in order:
        for t in tasks:
            if t.kind in ("B", "I"):
                backward_kind[(t.stage, t.mb)] = t.kind
    for m in range(microbatches):
        for v in range(num_virtual):
            graph.add(Task("F", v, m), Task("F", v - 1, m) if v else None)
    for m in range(microbatches):
        for v in range(num_virtual - 1, -1, -1):
            kind = backward_kind[(v, m)]
            above = Task(backward_kind[(v + 1, m)], v + 1, m) if v < num_virtual - 1 else None
            graph.add(Task(kind, v, m), Task("F", v, m), above)
            if kind == "I":
                graph.add(Task("W", v, m), Task("I", v, m))
    graph.order = order
    return _topological(graph)


def _single_stage_order(schedule: str, rank: int, num_ranks: int, microbatches: int) -> list[Task]:
    forwards = [Task("F", rank, m) for m in range(microbatches)]
    backwards = [Task("B", rank, m) for m in range(microbatches)]
    if schedule == "gpipe":
        return forwards + backwards
    warmup = min(microbatches, num_ranks - rank)  # Schedule1F1B: the first stage runs S forwards first
    order = forwards[:warmup]
    f = warmup
    for b in range(microbatches):
        order.append(backwards[b])
        if f < microbatches:
            order.append(forwards[f])
            f += 1
    return order


def _torch_multi_stage_order(schedule: str, num_ranks: int, microbatches: int) -> tuple[list[int], list[list[Task]]]:
    """Per-rank orders computed by torch's own schedule classes (without a process group)."""
    from types import SimpleNamespace

    import torch.distributed.pipelining.schedules as schedules

    from .baselines import SCHEDULES, virtual_stage_ranks

    cls = getattr(schedules, SCHEDULES[schedule][0])
    rounds = max(1, microbatches // num_ranks)
    fake = SimpleNamespace(
        pp_group_size=num_ranks,
        _n_microbatches=microbatches,
        num_stages=2 * num_ranks,
        _num_stages=2 * num_ranks,
        n_local_stages=2,
        number_of_rounds=rounds,
        microbatches_per_round=microbatches // rounds,
    )
    actions = {}
    for rank in range(num_ranks):
        fake.rank = rank
        actions[rank] = cls._calculate_single_rank_operations(fake, rank)
    if schedule == "zb":
        fake.pipeline_order = actions
        actions = cls._add_bubbles_to_actions(fake, 2 * num_ranks)
    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}
    order: list[list[Task]] = []
    for rank in range(num_ranks):
        tasks = []
        for action in actions[rank]:
            if action is None:
                continue
            for a in action.sub_actions or (action,):
                tasks.append(Task(kinds[a.computation_type.name], a.stage_index, a.microbatch_index))
        order.append(tasks)
    return virtual_stage_ranks(schedule, num_ranks), order
