"""Time one training step (forward + backward) of the user's model on this device, method by method.

Methods run round-robin (the order rotates every round) on the same model and batch, so that load from elsewhere
hits them alike; medians are reported. Highway-BP(k) is ``patch_model(model, k, backend=...)``; backprop is the
unpatched model; the compiled backprop step is ``torch.compile(model)``, timed in its own rounds against eager
backprop (a patched model is not compiled: Highway-BP's backward runs its own autograd calls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import highway_state, last_highway_iterations, patch_model, unpatch_model
from .memory import PeakMemory


@dataclass(frozen=True)
class Method:
    """One way to run the step: backprop (``k`` None) or Highway-BP(k) with a backend."""

    k: int | None = None
    backend: str | None = None

    @property
    def name(self) -> str:
        return "backprop" if self.k is None else f"k={self.k} {self.backend}"


@dataclass
class StepTimes:
    """Every timed step of one method: seconds, peak MiB (None: not measurable here), Highway iterations run."""

    method: Method
    times: list[float] = field(default_factory=list)
    peaks: list[float | None] = field(default_factory=list)
    iterations: list[int | None] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def peak_mib(self) -> float | None:
        known = [p for p in self.peaks if p is not None]
        return statistics.median(known) if known else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, batch: dict) -> None:
    """Forward and backward of ``batch`` (the model must return a loss: pass labels)."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    if loss is None:
        raise ValueError("The example batch gives no loss: include the labels (e.g. labels=input_ids).")
    loss.backward()


def use(model: nn.Module, method: Method) -> None:
    """Put ``model`` in the state ``method`` runs in (patched with its k and backend, or unpatched)."""
    if method.k is None:
        unpatch_model(model)
    else:
        patch_model(model, k=method.k, backend=method.backend)


def timed_step(model: nn.Module, batch: dict, device: torch.device) -> float:
    """Seconds of one step."""
    _sync(device)
    start = time.perf_counter()
    training_step(model, batch)
    _sync(device)
    return time.perf_counter() - start


def peak_step(model: nn.Module, batch: dict, device: torch.device) -> float | None:
    """Peak MiB of one step (untimed: measuring the peak on CPU returns freed memory to the system first, which
    the next step pays for in page faults)."""
    with PeakMemory(device) as peak:
        training_step(model, batch)
    return peak.mib


def measure_steps(
    model: nn.Module,
    batch: dict,
    methods: list[Method],
    rounds: int,
    *,
    warmup: int = 2,
    tick: Callable[[], None] = lambda: None,
    between_rounds: Callable[[], None] = lambda: None,
) -> dict[Method, StepTimes]:
    """Median-ready step times of every method, ``rounds`` interleaved rounds after ``warmup`` untimed steps each,
    then one untimed step each for the peak memory. ``tick()`` is called after every step (progress),
    ``between_rounds()`` before every round (with the model unpatched: e.g. a calibration that should see the
    machine as the steps see it)."""
    device = next(model.parameters()).device
    model.train()
    out = {m: StepTimes(m) for m in methods}
    for method in methods:
        use(model, method)
        for _ in range(warmup):
            training_step(model, batch)
            tick()
    for r in range(rounds):
        unpatch_model(model)
        between_rounds()
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            use(model, method)
            record = out[method]
            record.times.append(timed_step(model, batch, device))
            record.iterations.append(None if method.k is None else last_highway_iterations(model))
            tick()
    for method in methods:
        use(model, method)
        out[method].peaks.append(peak_step(model, batch, device))
        tick()
    unpatch_model(model)
    return out


def find_blocks(model: nn.Module) -> tuple[int, list[nn.Module]]:
    """(Highway blocks, the layers of every stack) of ``model``, found by patching it once: it raises
    ``HighwayBPError`` / ``UnsupportedModelError`` for a model it cannot patch, before anything is timed."""
    patch_model(model, k=0)
    try:
        state = highway_state(model)
        return state.num_blocks, [layer for stack in state.stacks for layer in stack.layers]
    finally:
        unpatch_model(model)


@dataclass
class CompiledTimes:
    """Compiled backprop against eager backprop, timed in the same rounds; or why it could not run."""

    compile_s: float | None = None
    compiled: list[float] = field(default_factory=list)
    eager: list[float] = field(default_factory=list)
    failure: str | None = None


def measure_compiled(
    model: nn.Module, batch: dict, rounds: int, *, tick: Callable[[], None] = lambda: None
) -> CompiledTimes:
    """Backprop through ``torch.compile(model)`` (default backend), interleaved with eager backprop. A failure to
    compile is reported, not raised: backprop then runs eager."""
    device = next(model.parameters()).device
    unpatch_model(model)
    result = CompiledTimes()
    try:
        compiled = torch.compile(model)
        _sync(device)
        start = time.perf_counter()
        training_step(compiled, batch)  # compiles the forward and the backward
        _sync(device)
        result.compile_s = time.perf_counter() - start
        training_step(compiled, batch)
    except Exception as error:  # noqa: BLE001 - whatever stops the compiler is reported, then eager it is
        first = (str(error).strip().splitlines() or [""])[0][:200]
        result.failure = f"torch.compile failed here ({type(error).__name__}: {first})"
        return result
    tick()
    for r in range(rounds):
        pair = [(compiled, result.compiled), (model, result.eager)]
        for module, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(timed_step(module, batch, device))
            tick()
    return result


__all__ = ["CompiledTimes", "Method", "StepTimes", "measure_compiled", "find_blocks", "measure_steps", "training_step"]
