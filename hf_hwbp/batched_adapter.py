"""The batched backend inside a patched transformers model (``HighwayConfig.backend``): what each block was called
with, whether a recorded stack forward can run batched, and the ``BatchedStack`` built from its record.

``batched.BatchedStack`` recomputes the blocks from their recorded inputs and the arguments they were called with
(masks, position embeddings). The patch installs a ``BlockCallCapture`` on the layers of its stacks when
backend='batched' is chosen (``patch_model``, ``set_highway_config``) and removes it with the patch, so the first
batched step is batched. The record's backward asks ``batched_stack`` for a stack; anything batching cannot give
(side paths, groups, gates, LayerDrop, blocks that differ, random numbers drawn in a block, sharded parameters)
falls back to the sequential engine with one log line per reason.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache
from transformers.utils import logging

from .batched import BatchedBlocks, BatchedStack, check_deterministic
from .config import HighwayConfig
from .discovery import Stack
from .errors import HighwayBPError
from .forward_checks import rng_state
from .sharding import ParameterLifecycle

logger = logging.get_logger(__name__)


@dataclass(eq=False)
class BlockCall:
    """What one block was called with besides its hidden state."""

    module: nn.Module
    kwargs: dict
    positional: bool  # it got side inputs as positional arguments
    random: bool = False  # its forward drew random numbers (dropout): a recomputation would not be the forward


class BlockCallCapture:
    """Forward hooks on the layers of the patched stacks, behind the patch's own: while a stack is being recorded,
    each layer's call arguments are kept apart from its hidden state, keyed weakly by the hidden state the layer
    got (the block's recorded input), and whether its forward drew random numbers. Nothing outlives the step."""

    def __init__(self, stacks: Sequence[Sequence[nn.Module]], is_recording: Callable[[int], bool]):
        self.is_recording = is_recording
        self.calls: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.signatures: dict[type, inspect.Signature] = {}
        self._running: dict[int, tuple] = {}  # id(layer) -> (its call, device, RNG state before it ran)
        self._handles = []
        for s, layers in enumerate(stacks):
            for layer in layers:
                self._handles.append(layer.register_forward_pre_hook(_CaptureBefore(self, s), with_kwargs=True))
                self._handles.append(layer.register_forward_hook(_CaptureAfter(self), always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.calls = WeakIdKeyDictionary()

    # A copy of the model (deepcopy, pickle) gets hooks with an empty capture.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "calls": None, "_running": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.calls = WeakIdKeyDictionary()

    def before(self, stack_index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.is_recording(stack_index):
            return
        signature = self.signatures.get(type(module))
        if signature is None:
            signature = self.signatures[type(module)] = inspect.signature(module.forward)
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return
        names = list(bound)
        if not names or not isinstance(bound[names[0]], Tensor):
            return
        others: dict = {}
        positional = False
        for name in names[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                others.update(bound[name])
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                positional = positional or bool(bound[name])
            else:
                others[name] = bound[name]
        call = BlockCall(module, {n: _without_empty_cache(module, v) for n, v in others.items()}, positional)
        self.calls[bound[names[0]]] = call
        device = bound[names[0]].device
        self._running[id(module)] = (call, device, rng_state(device))

    def after(self, module: nn.Module) -> None:
        running = self._running.pop(id(module), None)
        if running is not None:
            call, device, before = running
            call.random = not torch.equal(before, rng_state(device))


class _CaptureBefore:
    """A small class, not a closure: the hooks deep-copy and pickle with the model."""

    def __init__(self, capture: BlockCallCapture, stack_index: int):
        self.capture, self.stack_index = capture, stack_index

    @torch._dynamo.disable
    def __call__(self, module, args, kwargs):
        self.capture.before(self.stack_index, module, args, kwargs)


class _CaptureAfter:
    def __init__(self, capture: BlockCallCapture):
        self.capture = capture

    @torch._dynamo.disable
    def __call__(self, module, args, output):
        self.capture.after(module)


def _without_empty_cache(module: nn.Module, value):
    """A key/value cache that holds nothing for this layer yet (a training forward with use_cache=True) adds
    nothing to its attention: the recomputation runs without it (and leaves the cache alone)."""
    if not isinstance(value, Cache):
        return value
    index = next((m.layer_idx for m in module.modules() if isinstance(getattr(m, "layer_idx", None), int)), None)
    try:
        empty = index is not None and value.get_seq_length(index) == 0
    except (IndexError, KeyError, AttributeError):
        empty = False
    return None if empty else value


class RecordedForward(Protocol):
    """What the batched backend reads of a recorded stack forward (``hf_hwbp.record._StackRecord``)."""

    stack: Stack
    config: HighwayConfig
    lifecycle: ParameterLifecycle
    first_layer: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    params: list[Tensor]
    input_requires_grad: bool
    routes_side_paths: bool
    capture: BlockCallCapture | None


def _plain(value) -> bool:
    """A side input the batched call can share between the blocks as it is."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return not (isinstance(value, Tensor) and value.requires_grad)
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def why_not(record: RecordedForward) -> str | None:
    """Why this recorded stack forward cannot run batched (None: it can)."""
    stack, config = record.stack, record.config
    if type(record.lifecycle) is not ParameterLifecycle:
        return "parameters gathered by a sharding engine (FSDP2, ZeRO-3)"
    if config.group_size > 1:
        return "group_size > 1"
    if stack.residual_gate is not None:
        return "a gated residual path"
    if record.routes_side_paths:
        return "side inputs or side outputs (attentions, router logits, tensors handed on)"
    layers = stack.layers[record.first_layer :]
    if len(record.inputs) != len(layers) or len(record.outputs) != len(layers):
        return "skipped layers (LayerDrop)"
    capture = record.capture
    calls = [None if capture is None else capture.calls.get(x) for x in record.inputs]
    if any(c is None for c in calls):
        return "the blocks' call arguments were not captured (the backend was chosen while this forward ran)"
    if any(c.module is not layer for c, layer in zip(calls, layers)):
        return "the blocks ran out of order"
    if any(c.random for c in calls):
        return "a block draws random numbers (dropout): a recomputation would draw others"
    if any(c.positional for c in calls):
        return "positional side inputs"
    kwargs = calls[0].kwargs
    if not all(_plain(v) for v in kwargs.values()):
        return "side inputs it cannot share (a cache object or similar)"
    for call in calls[1:]:
        if call.kwargs.keys() != kwargs.keys() or not all(_same(kwargs[n], call.kwargs[n]) for n in kwargs):
            return "blocks with different side inputs"
    try:
        check_deterministic(layers)
    except HighwayBPError:
        return "active dropout (a recomputation would redraw it)"
    kinds = {type(b) for b in layers}
    shapes = {tuple((n, tuple(p.shape), p.requires_grad) for n, p in b.named_parameters()) for b in layers}
    if len(kinds) > 1 or len(shapes) > 1:
        return "blocks of different classes or parameter shapes"
    trainable = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
    if {id(p) for p in record.params} != trainable:
        return "parameters shared between blocks or outside them"
    return None


_said: set[str] = set()


def _say_once(message: str, *, warn: bool = True) -> None:
    """Log ``message`` once per process: a warning where the backend asked for is not what runs, else info."""
    if message not in _said:
        _said.add(message)
        (logger.warning if warn else logger.info)(message)


def batched_stack(record: RecordedForward, d: Tensor, extra: Sequence[Tensor | None]) -> BatchedStack | None:
    """The batched backend's stack for one recorded stack forward, or None: run the sequential engine. Says once
    per reason why (the backend asked for, or what the stack needs that batching cannot give)."""
    backend = record.config.backend
    if backend == "sequential":
        return None
    path = record.stack.path
    if backend == "auto":
        _say_once(
            f"Highway-BP: backend 'auto' runs {path} sequentially on {d.device.type}: the batched backend has not "
            "been measured faster on this device (set backend='batched' to use it anyway).",
            warn=False,
        )
        return None
    reason = why_not(record)
    if reason is not None:
        _say_once(f"Highway-BP: backend 'batched' falls back to sequential for {path}: {reason}.")
        return None
    layers = record.stack.layers[record.first_layer :]
    _say_once(
        f"Highway-BP: backend 'batched' runs {path} ({len(layers)} blocks) as one call per iteration.", warn=False
    )
    kwargs = record.capture.calls[record.inputs[0]].kwargs
    inputs = torch.stack([x.detach() for x in record.inputs])
    return BatchedStack(
        BatchedBlocks(layers, kwargs), inputs, d, need_input_grad=record.input_requires_grad, extra_grads=extra
    )
