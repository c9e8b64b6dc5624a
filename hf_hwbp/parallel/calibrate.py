"""Measure what the simulator needs on this machine: per-layer costs of each kind of work, and the link.

    costs = measure_stack_costs(model, batch_sizes=[8, 4, 2], seq_len=128)     # one process, random tokens
    costs = measure_stack_costs(model, [8, 2], example=batch)                  # or rows of a real batch (ViT too)
    latency, seconds_per_byte = measure_link(comm, nbytes)                     # two ranks (0 and 1)

Layers are timed one at a time on the model's own layers (with the side inputs the stage builds), each kind
of work as the runtime or torch runs it: ``f`` the forward (recording the graph), ``b`` a full backward,
``v`` the Highway inflow (input-only VJP minus the identity path), ``w`` the Highway parameter VJP, ``bi`` /
``bw`` torch's zero-bubble split (``stage_backward_input`` then ``stage_backward_weight``). The head (final
norm, LM head, loss) and the embeddings are timed the same way. Medians over ``reps``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .arch import get_module, recipe_for
from .comm import Comm
from .layout import make_layout
from .simulate import StackCosts, WorkCosts
from .stages import Stage


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], object], reps: int, setup: Callable[[], object] | None = None) -> float:
    """Median seconds of ``fn()`` (or ``fn(setup())``, the setup untimed)."""
    clock = time.perf_counter
    times = []
    for _ in range(reps + 1):  # the first call warms up (allocator, kernels)
        state = setup() if setup is not None else None
        _sync()
        start = clock()
        fn() if state is None else fn(state)
        _sync()
        times.append(clock() - start)
    return statistics.median(times[1:])


def _model_inputs(
    stage: Stage, batch: int, seq_len: int | None, generator: torch.Generator, example: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, labels) of ``batch`` samples: the first rows of ``example`` (repeated if it has fewer), or
    random token ids of ``seq_len`` (causal LMs, labels = ids)."""
    if example is None:
        if seq_len is None:
            raise ValueError("measure the costs with seq_len (random token ids) or with an example batch.")
        ids = torch.randint(0, stage.config.vocab_size, (batch, seq_len), generator=generator).to(stage.device)
        return ids, ids
    name = stage.recipe.input_name
    if name not in example or "labels" not in example:
        raise ValueError(f"The example batch needs {name!r} and 'labels' to measure {stage.recipe.name}'s costs.")

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.to(stage.device)
        return t.repeat(-(-batch // t.shape[0]), *([1] * (t.dim() - 1)))[:batch]

    return rows(example[name]), rows(example["labels"])


def _layer_costs(stage: Stage, model_input: torch.Tensor, reps: int, generator: torch.Generator) -> dict[str, float]:
    """Per-layer seconds of f, b, v, w, bi, bw: each kind timed over all the stage's layers in a row (as a step
    runs them, caches included), divided by their number."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    shape = stage.activation_shape(model_input)
    h = torch.randn(shape, generator=generator, dtype=stage.dtype).to(stage.device)
    g = torch.randn(shape, generator=generator, dtype=stage.dtype).to(stage.device) * 1e-2
    kwargs = stage.layer_kwargs(h)
    n = len(stage.layers)
    params = [[p for p in layer.parameters() if p.requires_grad] for layer in stage.layers]

    def forward():
        pairs, x = [], h
        for i in range(n):
            leaf = x.detach().requires_grad_(True)
            x = stage.run_layers(leaf, range(i, i + 1), kwargs)
            pairs.append((leaf, x))
        return pairs

    def each(fn):
        return lambda pairs: [fn(i, leaf, out) for i, (leaf, out) in enumerate(pairs)]

    def split_input(pairs):
        return [stage_backward_input([out], [g], [leaf], iter(params[i]))[1] for i, (leaf, out) in enumerate(pairs)]

    def split_weight(groups):
        for i, group in enumerate(groups):
            stage_backward_weight(iter(params[i]), group)

    totals = {
        "f": _median_time(forward, reps),
        "b": _median_time(each(lambda i, x, y: torch.autograd.backward(y, g, inputs=[x, *params[i]])), reps, forward),
        "v": _median_time(each(lambda i, x, y: torch.autograd.grad(y, x, g, retain_graph=True)[0] - g), reps, forward),
        "w": _median_time(each(lambda i, x, y: torch.autograd.backward(y, g, inputs=params[i])), reps, forward),
        "bi": _median_time(split_input, reps, forward),
        "bw": _median_time(split_weight, reps, lambda: split_input(forward())),
    }
    for group in params:
        for p in group:
            p.grad = None
    return {k: v / n for k, v in totals.items()}


def _end_costs(
    model: nn.Module, model_input: torch.Tensor, labels: torch.Tensor, reps: int, generator: torch.Generator
) -> dict:
    """Seconds of the embeddings and of the head (final norm, head, the model's loss) for one micro-batch."""
    recipe = recipe_for(model)
    num_layers = len(get_module(model, recipe.layers))
    first = Stage(model, 0, make_layout(num_layers, 1), recipe)  # one stage: embeddings and head together
    device, dtype = first.device, first.dtype
    ids = model_input
    h = torch.randn(first.activation_shape(model_input), generator=generator, dtype=dtype).to(device)
    g = torch.randn_like(h) * 1e-2
    head_params = [p for p in first.head.parameters() if p.requires_grad]
    embed_params = [p for p in first.embeddings.parameters() if p.requires_grad]

    def head_forward():
        x = h.detach().requires_grad_(True)
        return x, first.loss(first.logits(x), labels)

    out = {"head_f": _median_time(head_forward, reps)}
    out["head_b"] = _median_time(
        lambda s: torch.autograd.backward(s[1], inputs=[s[0], *head_params]), reps, head_forward
    )
    out["head_bi"] = _median_time(lambda s: torch.autograd.grad(s[1], s[0]), reps, head_forward)
    out["embed_f"] = _median_time(lambda: first.embed(ids), reps)
    out["embed_b"] = (
        _median_time(lambda e: torch.autograd.backward(e, g, inputs=embed_params), reps, lambda: first.embed(ids))
        if embed_params
        else 0.0
    )
    out["add"] = _median_time(lambda: h + g, reps)
    for p in head_params + embed_params:
        p.grad = None
    return out


def measure_work_costs(
    model: nn.Module,
    batch: int,
    seq_len: int | None = None,
    *,
    layers: range | None = None,
    reps: int = 5,
    seed: int = 0,
    example: dict | None = None,
) -> WorkCosts:
    """Costs of every kind of work for micro-batches of ``batch`` samples (per layer: averaged over ``layers``,
    default all of them), on random token ids of ``seq_len`` or on the first rows of ``example`` (a batch of the
    model's own inputs with ``labels``)."""
    recipe = recipe_for(model)
    num_layers = len(get_module(model, recipe.layers))
    generator = torch.Generator().manual_seed(seed)
    layout = make_layout(num_layers, 1)
    stage = Stage(model, 0, layout, recipe)
    if layers is not None:
        stage.layers = nn.ModuleList([stage.layers[i] for i in layers])
    model_input, labels = _model_inputs(stage, batch, seq_len, generator, example)
    per_layer = _layer_costs(stage, model_input, reps, generator)
    ends = _end_costs(model, model_input, labels, reps, generator)
    return WorkCosts(**per_layer, **ends)


def measure_stack_costs(
    model: nn.Module,
    batch_sizes: list[int],
    seq_len: int | None = None,
    *,
    layers: range | None = None,
    layers_per_block: int = 1,
    reps: int = 5,
    name: str | None = None,
    example: dict | None = None,
    tick: Callable[[], object] = lambda: None,
) -> StackCosts:
    """``StackCosts`` of ``model`` for each micro-batch size (no link: add it with ``measure_link``); inputs as in
    ``measure_work_costs``. ``tick()`` is called after each size (progress)."""
    recipe = recipe_for(model)
    config = model.config
    element = next(model.parameters()).element_size()
    by_batch = {}
    for b in batch_sizes:
        by_batch[b] = measure_work_costs(model, b, seq_len, layers=layers, reps=reps, example=example)
        tick()
    probe = Stage(model, 0, make_layout(len(get_module(model, recipe.layers)), 1), recipe)
    shape = probe.activation_shape(_model_inputs(probe, 1, seq_len, torch.Generator(), example)[0])
    tokens = shape[1] if len(shape) == 3 else None
    return StackCosts(
        name=name or f"{config.model_type} h={config.hidden_size} seq={tokens}",
        num_layers=len(get_module(model, recipe.layers)),
        layers_per_block=layers_per_block,
        activation_bytes_per_sample=float(math.prod(shape[1:]) * element),
        by_batch=by_batch,
        notes={
            "seq_len": tokens,
            "hidden": config.hidden_size,
            "vocab": getattr(config, "vocab_size", None),
            "threads": torch.get_num_threads(),
        },
    )


def measure_link(comm: Comm, nbytes: int, reps: int = 20, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(latency seconds, seconds per byte) of the link between ranks 0 and 1, by ping-pong of a 4-byte and an
    ``nbytes`` message (one way = half a round trip). Every rank of the group must call it."""
    results = []
    for size in (4, nbytes):
        buffer = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
        times = []
        for _ in range(reps):
            dist.barrier(group=comm.group)
            start = time.perf_counter()
            if comm.rank == 0:
                dist.send(buffer, group=comm.group, group_dst=1)
                dist.recv(buffer, group=comm.group, group_src=1)
            elif comm.rank == 1:
                dist.recv(buffer, group=comm.group, group_src=0)
                dist.send(buffer, group=comm.group, group_dst=0)
            times.append((time.perf_counter() - start) / 2)
        results.append(statistics.median(times))
    stats = torch.tensor(results, dtype=torch.float64)
    dist.broadcast(stats, group=comm.group, group_src=0)
    small, large = float(stats[0]), float(stats[1])
    return small, max(0.0, (large - small) / max(1, nbytes - 4))


def median_costs(measurements: list[StackCosts]) -> StackCosts:
    """Every cost's median over several measurements of one stack (e.g. one per benchmark round)."""
    from dataclasses import asdict, replace

    first = measurements[0]
    by_batch = {}
    for size in first.by_batch:
        keys = asdict(first.by_batch[size])
        by_batch[size] = WorkCosts(
            **{k: statistics.median(getattr(m.by_batch[size], k) for m in measurements) for k in keys}
        )
    return replace(first, by_batch=by_batch, notes={**first.notes, "measurements": len(measurements)})


def average_over_ranks(costs: StackCosts, group: dist.ProcessGroup | None = None) -> StackCosts:
    """The mean of every rank's measured costs, identical on every rank (plans must agree across ranks)."""
    from dataclasses import asdict

    sizes = sorted(costs.by_batch)
    keys = list(asdict(costs.by_batch[sizes[0]]))
    values = torch.tensor([[getattr(costs.by_batch[b], k) for k in keys] for b in sizes], dtype=torch.float64)
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group)
    costs.by_batch = {b: WorkCosts(**dict(zip(keys, map(float, row)))) for b, row in zip(sizes, values)}
    return costs
