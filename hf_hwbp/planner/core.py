"""``plan(model, example_batch)``: measure the model here, predict the other modes, recommend one.

    import hf_hwbp
    result = hf_hwbp.plan(model, {"input_ids": ids, "labels": ids})   # one device
    result = hf_hwbp.plan(model, batch, processes=2)                   # + the link, DDP, FSDP2, 2 stages
    print(result)                                                      # the table and the recommendation
    result.save("plan_out")                                            # plan.json, plan.md, plan_map.png

What is measured and what is predicted is in docs/planner.md.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from ..api import get_highway_config, is_patched, patch_model, unpatch_model
from ..config import BACKEND_NAMES
from ..errors import UnsupportedModelError
from ..parallel.arch import recipe_for
from ..parallel.calibrate import measure_stack_costs, median_costs
from ..parallel.graph import BACKPROP_SCHEDULES
from ..parallel.simulate import StackCosts
from .evidence import REGIMES, recommended_k
from .measure import Method, find_blocks, measure_compiled, measure_steps
from .memory import PeakMemory
from .predict import (
    CollectiveFit,
    Link,
    ddp_comm_seconds,
    fit_overheads,
    fsdp2_comm_seconds,
    one_device,
    predict_run,
    speedup_map,
)
from .report import MEASURED, PREDICTED, SCHEDULE_LABELS, Plan, Row, recommend

logger = hf_logging.get_logger(__name__)

DEFAULT_STAGES = (2, 4, 8, 16, 32, 64)
DEFAULT_MAP_MICROBATCHES = (1, 2, 4, 8)


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _batch_size(batch: Mapping) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim():
            return value.shape[0]
    raise ValueError("example_batch must hold at least one batched tensor (e.g. input_ids of shape (batch, seq)).")


def _describe_batch(batch: Mapping) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, Tensor))


def _check_ints(name: str, values: Sequence, low: int) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
        raise ValueError(f"{name} must be ints >= {low}, got {values!r}.")
    return sorted(set(values))


@contextmanager
def _capture(logger_name: str):
    """Collect what ``logger_name`` logs (the batched backend says when it falls back to sequential)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger(logger_name)
    handler, level = Keep(level=logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _unique_bytes(modules: Sequence[nn.Module] | nn.Module, trainable: bool = False) -> int:
    modules = [modules] if isinstance(modules, nn.Module) else modules
    seen = {id(p): p for m in modules for p in m.parameters() if p.requires_grad or not trainable}
    return sum(p.numel() * p.element_size() for p in seen.values())


def _no_recipe_reason(model: nn.Module) -> str | None:
    """None when ``hf_hwbp.parallel`` has a stage recipe for the model (layer-parallel, per-layer costs);
    otherwise why not."""
    try:
        recipe_for(model)
    except (UnsupportedModelError, ValueError) as error:
        return str(error).split(". ")[0]
    return None


def plan(
    model: nn.Module,
    example_batch: Mapping[str, Tensor],
    *,
    ks: Sequence[int] = (0, 1, 2),
    backends: Sequence[str] = ("sequential", "batched"),
    processes: int = 1,
    microbatches: Sequence[int] = (1, 2),
    rounds: int = 5,
    compile: bool = False,
    regime: str = "from_scratch",
    stages: Sequence[int] | None = None,
    map_microbatches: Sequence[int] = DEFAULT_MAP_MICROBATCHES,
    threads: int | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> Plan:
    """Measure Highway-BP against backprop on this machine with ``model`` and ``example_batch``, predict the other
    modes with the calibrated simulator, and recommend the fastest mode and a k.

    Args:
        model: any model ``patch_model`` accepts, on the device to plan for, returning a loss for the batch. It is
            left as it was found (patched or not); its ``.grad`` are cleared.
        example_batch: one optimizer step's batch (the keyword arguments of the model's forward, labels
            included); every mode is planned for this batch (N data-parallel ranks get ``batch / N`` samples each).
        ks: the Highway-BP k to measure (the k the quality evidence supports is always added).
        backends: ``patch_model`` backends to measure ("sequential", "batched", "auto").
        processes: N > 1 launches N processes on this machine: the link, DDP and FSDP2 over N, layer-parallel
            over N stages (measured and predicted).
        microbatches: M of the layer-parallel steps measured with ``processes``.
        rounds: timed steps per method (interleaved; medians).
        compile: also time backprop through ``torch.compile`` (compiling takes minutes on a small CPU).
        regime: "from_scratch" or "fine_tuning": which quality evidence chooses k (docs/choosing_k.md).
        stages, map_microbatches: the grid of the predicted layer-parallel map (default S = 2, 4, ... up to the
            blocks, M = 1, 2, 4, 8 up to the batch).
        threads: ``torch.set_num_threads`` while measuring (default: as it is); N processes share them.
        output_dir: write plan.json, plan.md and plan_map.png there.
        progress: show tqdm progress bars.
        command: the command line to record in the outputs.

    Raises:
        HighwayBPError / UnsupportedModelError: ``patch_model`` refuses the model (before anything is timed).
        ValueError: a bad argument.
    """
    ks = _check_ints("ks", ks, 0)
    backends = list(dict.fromkeys(backends))
    if not backends or any(b not in BACKEND_NAMES for b in backends):
        raise ValueError(f"backends must be among {', '.join(BACKEND_NAMES)}, got {backends!r}.")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1, got {processes!r}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}.")
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}.")
    microbatches = _check_ints("microbatches", microbatches, 1)
    map_microbatches = _check_ints("map_microbatches", map_microbatches, 1)
    if not isinstance(example_batch, Mapping):
        raise ValueError("example_batch must be a dict of the model's inputs (labels included).")
    size = _batch_size(example_batch)
    if max(microbatches) > size or processes > size:
        raise ValueError(
            f"The batch has {size} samples: micro-batches ({max(microbatches)}) and processes ({processes}) must not "
            "exceed it."
        )
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in example_batch.items()}
    previous = get_highway_config(model) if is_patched(model) else None
    was_training = model.training
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _plan(
            model, batch, size, ks, backends, processes, microbatches, rounds, compile, regime, stages,
            map_microbatches, progress, command,
        )  # fmt: skip
    finally:
        unpatch_model(model)
        if previous is not None:
            patch_model(model, config=previous)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_num_threads(saved_threads)
    if output_dir is not None:
        result.save(output_dir)
    return result


def _plan(
    model, batch, size, ks, backends, processes, microbatches, rounds, compile, regime, stages, map_microbatches,
    progress, command,
) -> Plan:  # fmt: skip
    started, load_before = time.perf_counter(), _loadavg()
    device = next(model.parameters()).device
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load_before and load_before[0] >= cores and torch.get_num_threads() > 1:
        logger.warning(
            f"This machine is busy (1-minute load {load_before[0]:.1f} on {cores} cores): steps with "
            f"{torch.get_num_threads()} threads are oversubscribed, slow and erratic; threads=1 (--threads 1) helps."
        )
    num_blocks, block_layers = find_blocks(model)  # refuses an unpatchable model before anything is timed
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    evidence = recommended_k(model_type, regime)
    ks = sorted(set(ks) | {evidence.k})
    notes: list[str] = []
    no_recipe = _no_recipe_reason(model)

    # ----- one device, measured; the per-layer costs at the batch's size measured before every round
    methods = [Method()] + [Method(k, b) for b in backends for k in ks if k < num_blocks or b == backends[0]]
    calibrations: list[StackCosts] = []

    def calibrate() -> None:
        if no_recipe is None:
            calibrations.append(measure_stack_costs(model, [size], reps=1, example=batch))
            bar.update()

    total = len(methods) * (3 + rounds) + (rounds if no_recipe is None else 0)
    bar = tqdm(total=total, desc="one device", unit="step", disable=not progress, leave=False)
    with _capture("hf_hwbp.batched") as backend_log:
        steps = measure_steps(model, batch, methods, rounds, tick=bar.update, between_rounds=calibrate)
    bar.close()
    rows: list[Row] = []
    backprop = steps[Method()]
    for backend in backends:
        times = {k: steps[Method(k, backend if k < num_blocks else backends[0])] for k in ks}
        said = [m for m in backend_log if f"'{backend}'" in m and "captured from the next forward" not in m]
        exact = [str(k) for k in ks if k >= num_blocks]
        if exact:
            said.append(f"k = {', '.join(exact)} >= {num_blocks} blocks: exact, the model's own backward")
        note = "; ".join(said)
        rows.append(
            Row(
                f"one device, {backend} backend",
                MEASURED,
                backprop.median_s,
                {k: t.median_s for k, t in times.items()},
                backprop_label="eager",
                peak_mib={"backprop": backprop.peak_mib, **{f"k={k}": t.peak_mib for k, t in times.items()}},
                note=note,
            )
        )
    memory = PeakMemory.method(device)
    notes.append(f"Peak memory: {memory}." if memory else "Peak memory: not measurable on this platform.")
    if compile:
        bar = tqdm(total=1 + 2 * rounds, desc="torch.compile", unit="step", disable=not progress, leave=False)
        compiled = measure_compiled(model, batch, rounds, tick=bar.update)
        bar.close()
        if compiled.failure:
            notes.append(f"{compiled.failure}: backprop runs eager.")
        else:
            eager = statistics.median(compiled.eager)
            rows.append(
                Row(
                    "one device, torch.compile",
                    MEASURED,
                    statistics.median(compiled.compiled),
                    backprop_label="compiled",
                    note=f"compiling took {compiled.compile_s:.0f} s; eager backprop in the same rounds {eager:.3f} s; "
                    "Highway-BP runs eager",
                )
            )
    else:
        notes.append("Compiled backprop not measured (compile=True / --compile true: compiling takes minutes on CPU).")

    # ----- per-layer costs: one device
    costs: dict[str, dict] = {}
    one_costs = None
    if no_recipe is None:
        one_costs = median_costs(calibrations)
        others = sorted({size // m for m in map_microbatches if m <= size} - {size}) if processes == 1 else []
        if others:  # the map's smaller micro-batches, measured once
            bar = tqdm(total=len(others), desc="per-layer costs", unit="size", disable=not progress, leave=False)
            extra = measure_stack_costs(model, others, reps=3, example=batch, tick=bar.update)
            bar.close()
            one_costs.by_batch = {**extra.by_batch, **one_costs.by_batch}
        costs["one device"] = one_costs.to_json()
        bp, hw = one_device(one_costs, size, ks, num_blocks)
        rows.append(
            Row("one device", PREDICTED, bp, hw, backprop_label="simulator", note="sequential engine, per-layer costs")
        )
    else:
        notes.append(f"No per-layer costs, layer-parallel rows or map: {no_recipe} (hf_hwbp.parallel's recipes).")
    validation = _one_device_validation(rows, one_costs is not None, ks, backends[0])

    # ----- N processes
    link = None
    extras: dict = {"one_device_times_s": {m.name: t.times for m, t in steps.items()}}
    cells: list[dict] = []
    map_basis = ""
    map_costs = one_costs
    if processes > 1:
        from .launch import run_workers

        layer_parallel = no_recipe is None and processes <= num_blocks
        if no_recipe is None and not layer_parallel:
            notes.append(f"No layer-parallel run: {processes} stages need at least as many blocks ({num_blocks}).")
        shape = one_costs.activation_bytes_per_sample if one_costs is not None else 0
        measured = run_workers(
            model,
            batch,
            processes=processes,
            ks=ks,
            microbatches=microbatches,
            map_microbatches=[m for m in map_microbatches if m <= size],
            layer_parallel=layer_parallel,
            message_bytes=max(4096, int(shape * size)),
            rounds=rounds,
            threads=max(1, torch.get_num_threads() // processes) if device.type == "cpu" else 1,
            progress=progress,
        )
        link = _link(measured)
        rows += _data_parallel_rows(model, measured, link, ks, size, processes, block_layers)
        if layer_parallel:
            lp_rows, lp_validation, map_costs, details = _layer_parallel(measured, ks, size, processes)
            rows += lp_rows
            validation += lp_validation
            costs[f"per rank of {processes}"] = map_costs.to_json()
            extras["layer_parallel"] = details
            map_basis = (
                f"Costs: per-layer costs of one rank of {processes} processes on this machine, the measured link and "
                "per-task overheads fitted on a near-free copy of the model; S stages are S such devices."
            )
            if "overhead_failure" in measured["layer_parallel"]:
                notes.append(f"No per-task overheads ({measured['layer_parallel']['overhead_failure']}): 0 assumed.")
    if map_costs is not None and not map_basis:
        map_basis = (
            "Costs: per-layer costs of this device; link and per-task overheads not measured (free messages, no "
            "overhead): run with processes=2 (--processes 2) to measure them."
        )
    if map_costs is not None:
        grid = sorted(set(stages or [s for s in DEFAULT_STAGES if s <= num_blocks]) | ({processes} - {1}))
        grid = [s for s in grid if 2 <= s <= num_blocks]
        cells = speedup_map(map_costs, size, ks, grid, [m for m in map_microbatches if m <= size])
    recommendation = recommend(rows, evidence, cells)
    setup = _setup(model, batch, device, num_blocks, rounds, load_before, started, command, processes)
    if device.type == "cpu" and load_before and max(load_before[0], setup["load_after"][0]) > cores:
        notes.append(
            f"The machine was busy (1-minute load up to {max(load_before[0], setup['load_after'][0]):.1f} on {cores} "
            "cores): timings shift with the load; rerun on a quiet machine for figures to keep."
        )
    return Plan(
        setup=setup,
        ks=ks,
        rows=rows,
        evidence=evidence,
        recommendation=recommendation,
        notes=notes,
        validation=validation,
        speedup_map=cells,
        map_basis=map_basis,
        costs=costs,
        link=link.to_json() if link else None,
        extras=extras,
    )


def _one_device_validation(rows: list[Row], predicted: bool, ks: list[int], backend: str) -> list[dict]:
    if not predicted:
        return []
    measured = next(r for r in rows if r.mode == f"one device, {backend} backend")
    model = next(r for r in rows if r.mode == "one device" and r.source == PREDICTED)
    pairs = [("backprop", measured.backprop_s, model.backprop_s)]
    pairs += [(f"Highway-BP k = {k}", measured.highway_s[k], model.highway_s[k]) for k in ks]
    return [
        {"mode": "one device", "method": name, "measured_s": m, "predicted_s": p, "error": p / m - 1}
        for name, m, p in pairs
    ]


def _link(measured: dict) -> Link:
    raw = measured["link"]
    return Link(
        world_size=measured["world_size"],
        backend=measured["backend"],
        latency=raw["latency"],
        seconds_per_byte=raw["seconds_per_byte"],
        all_reduce=CollectiveFit.from_two(*raw["all_reduce"]),
        all_gather=CollectiveFit.from_two(*raw["all_gather"]),
    )


def _data_parallel_rows(
    model: nn.Module, measured: dict, link: Link, ks: list[int], size: int, processes: int, blocks: list[nn.Module]
) -> list[Row]:
    compute = measured["data_parallel"]["median_s"]
    per_rank = max(measured["data_parallel"]["samples_per_rank"])
    backprop = compute["backprop"]
    highway = {k: compute[Method(k, "sequential").name] for k in ks}
    ddp = ddp_comm_seconds(_unique_bytes(model, trainable=True), link)
    units = [_unique_bytes(block) for block in blocks]
    units.append(_unique_bytes(model) - sum(units))  # the root: everything outside the blocks
    fsdp = fsdp2_comm_seconds(units, link)
    base = f"measured compute of {per_rank} samples per rank, all {processes} ranks at once, + "
    stack_mib = sum(units[:-1]) / 2**20
    return [
        Row(
            f"DDP over {processes}",
            PREDICTED,
            backprop + ddp,
            {k: v + ddp for k, v in highway.items()},
            note=base + f"{1e3 * ddp:.1f} ms of gradient all-reduce (not overlapped: an upper bound)",
            devices=processes,
        ),
        Row(
            f"FSDP2 over {processes}",
            PREDICTED,
            backprop + fsdp,
            {k: v + fsdp for k, v in highway.items()},
            note=base + f"{1e3 * fsdp:.1f} ms of all-gathers and reduce-scatters (one unit per block + the root); "
            f"Highway-BP keeps the stack's {stack_mib:.0f} MiB of weights gathered through its sweeps, backprop "
            f"about one block's {max(units[:-1]) / 2**20:.1f} MiB",
            devices=processes,
        ),
    ]


def _layer_parallel(measured: dict, ks: list[int], size: int, processes: int):
    """Measured and predicted rows at S = N for every M, the validation of every run, and the map's costs."""
    data = measured["layer_parallel"]
    costs = StackCosts.from_json(data["costs"])
    plan_costs = StackCosts.from_json(data["plan_costs"])
    overheads = {"hf_hwbp": 0.0, "torch": 0.0}
    if "overhead_runs" in data:
        overheads = fit_overheads(data["overhead_runs"], StackCosts.from_json(data["overhead_costs"]), processes, size)
    costs = replace(costs, task_overhead=overheads["hf_hwbp"], torch_task_overhead=overheads["torch"])
    rows, validation = [], []
    for m in sorted({run["M"] for run in data["runs"]}):
        runs = [run for run in data["runs"] if run["M"] == m]
        for run in runs:
            run["predicted_s"] = predict_run(run, costs, processes, size, plan_costs)
            name = SCHEDULE_LABELS.get(run["method"]) or f"Highway-BP k = {run['k']}"
            if run["method"] == "highway":
                name = f"Highway-BP k = {run['k']}"
            validation.append(
                {
                    "mode": f"layer-parallel, {processes} stages, M = {m}",
                    "method": name,
                    "measured_s": run["median_s"],
                    "predicted_s": run["predicted_s"],
                    "error": run["predicted_s"] / run["median_s"] - 1,
                }
            )
        backprop = [run for run in runs if run["method"] != "highway"]
        highway = {run["k"]: run for run in runs if run["method"] == "highway"}
        mode = f"layer-parallel, {processes} stages, M = {m}"
        for source, key in ((MEASURED, "median_s"), (PREDICTED, "predicted_s")):
            best = min(backprop, key=lambda run, key=key: run[key])
            rows.append(
                Row(
                    mode,
                    source,
                    best[key],
                    {k: highway[k][key] for k in ks},
                    backprop_label=f"fastest: {SCHEDULE_LABELS[best['method']]}",
                    devices=processes,
                )
            )
    details = {
        "overheads_s": overheads,
        "plan_costs": data["plan_costs"],
        "runs": data["runs"],
        "overhead_runs": data.get("overhead_runs", []),
    }
    return rows, validation, costs, details


def _setup(model, batch, device, num_blocks, rounds, load_before, started, command, processes) -> dict:
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    load_after = _loadavg()
    elapsed = time.perf_counter() - started
    name = type(model).__name__
    threads = torch.get_num_threads()
    load = f"; 1-minute load {load_before[0]:.2f} before, {load_after[0]:.2f} after" if load_before else ""
    description = (
        f"{name}, {params / 1e6:.2f} M parameters, {num_blocks} Highway blocks, {dtype}; batch "
        f"{_describe_batch(batch)} on {device} ({threads} thread{'s' * (threads > 1)}"
        f"{f', shared by {processes} processes' if processes > 1 and device.type == 'cpu' else ''}); "
        f"{rounds} interleaved rounds, medians{load}; planned in {elapsed:.0f} s (torch {torch.__version__})."
    )
    return {
        "model": name,
        "parameters": params,
        "blocks": num_blocks,
        "dtype": dtype,
        "batch": _describe_batch(batch),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "processes": processes,
        "rounds": rounds,
        "load_before": load_before,
        "load_after": load_after,
        "elapsed_s": elapsed,
        "torch": torch.__version__,
        "command": command,
        "description": description,
        "schedules": list(BACKPROP_SCHEDULES),
    }


__all__ = ["plan"]
