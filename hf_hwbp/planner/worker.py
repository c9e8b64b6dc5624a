"""One rank of the planner's N-process measurement; ``hf_hwbp.planner.launch`` starts N of them under
``torch.distributed.run`` (gloo on CPU, NCCL on GPUs, one GPU per rank):

    python -m torch.distributed.run --nproc_per_node N -m hf_hwbp.planner.worker SPEC.json

Every rank loads the same model and batch (saved by the launcher) and measures, all ranks at once:

1. the link: a point-to-point ping-pong between ranks 0 and 1 (latency, bandwidth), then all-reduce and
   all-gather over all ranks at two sizes;
2. data-parallel compute: each rank runs one training step on its share of the batch (batch / N samples), with
   backprop and Highway-BP(k), timed from a barrier to the slowest rank (no gradient synchronization: the
   collectives are modelled from the link);
3. layer-parallel (models with a stage recipe): the per-task overheads of the two runtimes, from the same methods
   run on a copy of the model whose layers cost almost nothing (width 16, 8 tokens); the per-layer costs of each
   rank's own layers (``hf_hwbp.parallel.calibrate``; before the rounds, for the Highway runner's plan, and at
   every round, medians); then the steps at S = N for every M: Highway-BP(k), pipeline backprop through
   hf_hwbp's runtime and every schedule of ``torch.distributed.pipelining`` that runs there (causal LMs).

Methods run round-robin; medians over rounds. Rank 0 prints ``PLAN-TOTAL n`` then one ``PLAN-TICK`` per unit of
work (the launcher's progress bar) and writes the results to the spec's ``out`` file.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..parallel.arch import recipe_for
from ..parallel.baselines import TorchPipeline
from ..parallel.calibrate import average_over_ranks, measure_link, measure_stack_costs, median_costs
from ..parallel.comm import Comm
from ..parallel.graph import BACKPROP_SCHEDULES
from ..parallel.runner import LayerParallelHighway
from ..parallel.simulate import StackCosts, even_split, runnable, split_batch
from .measure import Method, timed_step, training_step, use

NEAR_FREE_SIZES = {  # config attributes -> the width of the overhead model (layers that cost almost nothing)
    "n_embd": 16,
    "hidden_size": 16,
    "n_head": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
    "n_inner": 32,
    "head_dim": 8,
    "vocab_size": 64,
    "image_size": 8,
    "patch_size": 4,
}
NEAR_FREE_TOKENS = 8
SMALL_MESSAGE = 4096  # bytes of the small collective (latency)


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def total(self, n: int) -> None:
        if self.enabled:
            print(f"PLAN-TOTAL {n}", flush=True)

    def tick(self) -> None:
        if self.enabled:
            print("PLAN-TICK", flush=True)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn()`` from a barrier to the slowest rank's end."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _slowest(time.perf_counter() - start, device)


# ----- 1. the link ---------------------------------------------------------------------------------------------------
def _collective_seconds(run: Callable[[], object], device: torch.device, reps: int) -> float:
    run()  # warm-up (connection set-up)
    return statistics.median(_timed(run, device) for _ in range(reps))


def measure_collectives(device: torch.device, large: int, nbytes_p2p: int, reps: int = 10) -> dict:
    """Point-to-point latency and seconds per byte; all-reduce and all-gather seconds at two sizes."""
    world = dist.get_world_size()
    latency, per_byte = measure_link(Comm(), nbytes_p2p, device=device)
    out = {"latency": latency, "seconds_per_byte": per_byte, "all_reduce": [], "all_gather": []}
    for size in (SMALL_MESSAGE, large):
        x = torch.zeros(max(1, size // 4), dtype=torch.float32, device=device)
        out["all_reduce"].append((x.numel() * 4, _collective_seconds(lambda x=x: dist.all_reduce(x), device, reps)))
        part = torch.zeros(max(1, size // 4 // world), dtype=torch.float32, device=device)
        full = torch.empty(part.numel() * world, dtype=torch.float32, device=device)
        gather = lambda full=full, part=part: dist.all_gather_into_tensor(full, part)  # noqa: E731
        out["all_gather"].append((full.numel() * 4, _collective_seconds(gather, device, reps)))
    return out


# ----- 2. data-parallel compute -------------------------------------------------------------------------------------
def _rows(batch: dict, start: int, size: int) -> dict:
    return {k: v[start : start + size] if isinstance(v, Tensor) and v.dim() else v for k, v in batch.items()}


def measure_data_parallel(
    model: nn.Module, batch: dict, ks: list[int], rounds: int, warmup: int, progress: Progress
) -> dict:
    """Every rank's one-device step on its share of the batch, all ranks at once: {method name: median s}."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
    sizes = split_batch(size, world)
    mine = _rows(batch, sum(sizes[:rank]), sizes[rank])
    device = next(model.parameters()).device
    methods = [Method()] + [Method(k, "sequential") for k in ks]
    for method in methods:
        use(model, method)
        for _ in range(warmup):
            training_step(model, mine)
        progress.tick()
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(rounds):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            use(model, method)
            dist.barrier()
            seconds = timed_step(model, mine, device)
            times[method.name].append(_slowest(seconds, device))
            progress.tick()
    use(model, Method())
    return {"samples_per_rank": sizes, "median_s": {name: statistics.median(t) for name, t in times.items()}}


# ----- 3. layer-parallel ---------------------------------------------------------------------------------------------
def near_free_copy(model: nn.Module) -> nn.Module:
    """The same model type and depth with layers that cost almost nothing (width 16): what a step costs beyond
    its layers' work is what remains."""
    config = copy.deepcopy(model.config)
    for name, value in NEAR_FREE_SIZES.items():
        if getattr(config, name, None) is not None:
            setattr(config, name, value)
    torch.manual_seed(0)
    parameter = next(model.parameters())
    return type(model)(config).to(device=parameter.device, dtype=parameter.dtype).train()


def near_free_batch(model: nn.Module, batch_size: int, device: torch.device) -> dict:
    recipe = recipe_for(model)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    if recipe.labels_from_input:
        ids = torch.randint(0, config.vocab_size, (batch_size, NEAR_FREE_TOKENS), generator=generator).to(device)
        return {recipe.input_name: ids, "labels": ids}
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    pixels = torch.randn(shape, generator=generator).to(device)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator).to(device)
    return {recipe.input_name: pixels, "labels": labels}


def calibrate(model: nn.Module, batch: dict, sizes: list[int], link: dict, reps: int) -> StackCosts:
    """Every rank measures its own layers at the same time (the machine as loaded as during the steps); the
    ranks' means, with the measured link."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layers = even_split(len(_stack(model)), world)
    mine = range(sum(layers[:rank]), sum(layers[: rank + 1]))
    dist.barrier()
    costs = measure_stack_costs(model, sizes, layers=mine, reps=reps, example=batch)
    costs = average_over_ranks(costs)
    costs.latency, costs.seconds_per_byte = link["latency"], link["seconds_per_byte"]
    return costs


def _stack(model: nn.Module) -> nn.ModuleList:
    from ..parallel.arch import get_module

    return get_module(model, recipe_for(model).layers)


def layer_parallel_methods(model: nn.Module, microbatches: list[int], ks: list[int], costs: StackCosts) -> list[dict]:
    """The runs at S = N: hf_hwbp's pipeline backprop, torch's schedules that run here (causal LMs), Highway-BP(k)."""
    world = dist.get_world_size()
    num_layers = len(_stack(model))
    causal_lm = recipe_for(model).labels_from_input
    runs = []
    for m in microbatches:
        runner = LayerParallelHighway(model, method="backprop", microbatches=m)
        runs.append({"method": "pipeline", "k": None, "M": m, "runner": runner})
        for schedule in BACKPROP_SCHEDULES if causal_lm else ():
            if runnable(schedule, world, m, num_layers):
                runner = TorchPipeline(model, schedule=schedule, n_microbatches=m)
                runs.append({"method": schedule, "k": None, "M": m, "runner": runner})
        highway = LayerParallelHighway(model, k=0, microbatches=m, costs=costs)
        runs.extend({"method": "highway", "k": k, "M": m, "runner": highway} for k in ks)
    return runs


def _run_step(run: dict, model_input: Tensor, labels: Tensor) -> None:
    runner = run["runner"]
    for p in runner.parameters():
        p.grad = None
    if run["k"] is not None:
        runner.k = run["k"]
    runner.step(model_input, labels)


def time_runs(
    runs: list[dict],
    batch: dict,
    input_name: str,
    rounds: int,
    warmup: int,
    progress: Progress,
    between_rounds: Callable[[], object] = lambda: None,
) -> list[dict]:
    """Median step of every run (round-robin); ``between_rounds()`` runs before each timed round."""
    device = batch["labels"].device
    model_input, labels = batch[input_name], batch["labels"]
    for run in runs:
        for _ in range(warmup):
            _run_step(run, model_input, labels)
        progress.tick()
    times: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        between_rounds()
        shift = r % len(runs)
        order = list(range(len(runs)))[shift:] + list(range(len(runs)))[:shift]
        for i in order:
            times[i].append(_timed(lambda i=i: _run_step(runs[i], model_input, labels), device))
            progress.tick()
    return [
        {"method": run["method"], "k": run["k"], "M": run["M"], "median_s": statistics.median(t), "times_s": t}
        for run, t in zip(runs, times)
    ]


def measure_layer_parallel(model: nn.Module, batch: dict, spec: dict, link: dict, progress: Progress) -> dict:
    input_name = recipe_for(model).input_name
    size = batch["labels"].shape[0]
    microbatches, ks = spec["microbatches"], spec["ks"]
    sizes = sorted({size // m for m in microbatches} | {max(1, size // max(spec["map_microbatches"]))})
    device = batch["labels"].device
    out: dict = {}
    try:
        tiny = near_free_copy(model)
    except Exception as error:  # noqa: BLE001 - a model type whose config cannot be shrunk: no overhead fit
        out["overhead_failure"] = f"{type(error).__name__}: {error}"
        progress.tick()
    else:
        tiny_batch = near_free_batch(tiny, size, device)
        tiny_costs = calibrate(tiny, tiny_batch, [size // m for m in microbatches], link, reps=spec["calib_reps"])
        out["overhead_costs"] = tiny_costs.to_json()
        runs = layer_parallel_methods(tiny, microbatches, ks, tiny_costs)
        out["overhead_runs"] = time_runs(runs, tiny_batch, input_name, spec["rounds"], spec["warmup"], progress)
        del runs, tiny
    plan_costs = calibrate(model, batch, sizes, link, reps=spec["calib_reps"])
    progress.tick()
    measured: list[StackCosts] = []

    def calibrate_round() -> None:
        measured.append(calibrate(model, batch, sizes, link, reps=spec["round_calib_reps"]))

    runs = layer_parallel_methods(model, microbatches, ks, plan_costs)
    out["runs"] = time_runs(runs, batch, input_name, spec["rounds"], spec["warmup"], progress, calibrate_round)
    out["plan_costs"] = plan_costs.to_json()
    out["costs"] = median_costs(measured).to_json()
    return out


def expected_ticks(spec: dict) -> int:
    """Units of work rank 0 reports (the launcher's progress bar)."""
    rounds, ks = spec["rounds"], spec["ks"]
    data_parallel = (1 + len(ks)) * (1 + rounds)
    if not spec["layer_parallel"]:
        return data_parallel
    runs = spec["layer_parallel_runs"]
    return data_parallel + 2 * runs * (1 + rounds) + 1


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(open(argv[0]).read())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if spec["device"] == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(spec["threads"])
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    progress = Progress(rank == 0)
    progress.total(expected_ticks(spec))
    model = torch.load(spec["model"], weights_only=False).to(device).train()
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in torch.load(spec["batch"]).items()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result: dict = {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "threads": spec["threads"]}
    large = min(max(param_bytes, 2**20), 64 * 2**20)
    result["link"] = measure_collectives(device, large, spec["message_bytes"])
    result["data_parallel"] = measure_data_parallel(model, batch, spec["ks"], spec["rounds"], spec["warmup"], progress)
    if spec["layer_parallel"]:
        result["layer_parallel"] = measure_layer_parallel(model, batch, spec, result["link"], progress)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
