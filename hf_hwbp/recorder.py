r"""The recorder: one training forward of one stack, cut at every block boundary while it runs.

    h_0 -> block 1 -> y_1 --_Exit--> h_1 ~> leaf x_1 -> block 2 -> ... --_Exit--> h_L -> head
     \--_StackEntry(h_0, *params, *side inputs)--> token_0 --> token_1 --> ... --> token_L

Block 1 reads h_0 through ``_StackInput`` (an alias that the Highway backward never crosses) and block j >= 2 a
fresh leaf x_{j-1} holding h_{j-1}'s value, so each block's local graph ends at its own input, its parameters and
its side inputs (tensors that require grad read besides the hidden state; each is replaced by a leaf). ``_Exit``
hands on the value of y_j with no edge into block j's graph and stores the gradient that reaches h_j (d for the
last block, e_j for the others); it does the same for side outputs (tensors computed inside a block that the loss
may read: attention maps, router logits). ``_StackEntry`` returns only a scalar token; the token chain makes
autograd call every exit before the entry, whose backward is ``record.run_backward``.

A layer may hand on more than the hidden state: a second residual stream (LUKE's entity states, LiLT's layout
states) is a tensor that a layer returns at a position of its output and the next layer receives under the argument
name where the layer before received a tensor of the same shape and dtype. The record decides at its first block
boundary which arguments are streams (``_streams_in``); from then on each block reads a fresh leaf per stream too,
and each stream output leaves through an ``_Exit`` like a side output, marked as the stream it is.

What the forward recorded lives in its ``_StackRecord`` (what each block read and handed on), held by the autograd
graph; ``StackForward`` is the bookkeeping the patch holds only while the stack's layers run. The patch decides
whether a forward is recorded at all (``patching.py``); the checks live in ``forward_checks.py``.
"""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import forward_checks
from .config import HighwayConfig
from .discovery import Stack
from .errors import HighwayBPError
from .record import IterationLog, _EngineFlag, _Exit, _GroupInnerGuard, _StackEntry, _StackInput, _StackRecord
from .routing import forward as routing
from .sharding import ParameterLifecycle


@dataclass(eq=False)
class RecordingSettings:
    """What a recorded forward takes from the patch when it starts (nothing that points back to the patch)."""

    stack_index: int
    config: HighwayConfig
    lifecycle: ParameterLifecycle
    log: IterationLog
    keep_block_grads: bool
    capture: object | None  # the batched backend's capture of block calls (or None)
    check_graph: bool  # walk each block's recorded graph (until one whole forward of the stack was checked)
    returned: set[int]  # ids of the tensors this forward hands the model in place of block outputs and side outputs


@dataclass(eq=False)
class StackForward:
    """The forward a stack is running now; held by the patch until the stack's last layer ran.

    ``active``: a training forward that Highway-BP records (the patch decides). The record starts at the first
    layer whose block has something to train or feeds something that does (frozen layers below run as they would
    unpatched)."""

    stack: Stack
    next_layer: int = 0
    active: bool = False
    settings: RecordingSettings | None = None
    input_shape: tuple | None = None  # (shape, dtype) of the running layer's hidden state
    record: _StackRecord | None = None
    token: Tensor | None = None
    last_exit: Tensor | None = None
    leaf_of: dict[int, Tensor] = field(default_factory=dict)  # id(side input) -> the leaf blocks read instead
    originals: list[Tensor] = field(default_factory=list)  # keeps those ids valid while the forward runs
    cut_of: dict[int, int] = field(default_factory=dict)  # id(cut side output) -> its index in the record
    leaf_ids: set[int] = field(default_factory=set)  # ids of the side-input and carried leaves
    leaf_views: list[Tensor] = field(default_factory=list)  # views of side-input leaves (per-layer slices)
    marks: dict[str, int] | None = None  # collector sizes before the running layer
    block_starts: list[int] = field(default_factory=list)  # autograd sequence number where each block began
    rng_state: tuple[torch.device, Tensor] | None = None  # checkpointed without preserving the RNG
    grad_mode_seen: list[bool] = field(default_factory=list)  # grad mode inside the running layer (checkpointed)
    graph_checked: bool = False  # the block ending at the stack's last layer was checked
    received: dict[str, Tensor] = field(default_factory=dict)  # top-level tensor arguments the last layer read
    previous_sides: set[int] = field(default_factory=set)  # the side outputs the last layer returned

    # ----- before a layer ---------------------------------------------------------------------------------------
    def before_layer(self, i: int, module: nn.Module, args: tuple, kwargs: dict):
        """The patch's pre-hook on an active forward: returns the layer's new (args, kwargs), or None."""
        stack, config = self.stack, self.settings.config
        skipped = i > self.next_layer  # LayerDrop: the layers between did not run in this forward
        if skipped and config.group_size > 1:
            raise HighwayBPError(
                f"Highway-BP: layers {self.next_layer}..{i - 1} of {stack.path} were skipped in this training "
                "forward (LayerDrop), which Highway-BP follows only with group_size=1 (each executed layer is a "
                "block). Set group_size=1, or the model's layerdrop to 0."
            )
        if module is not stack.layers[i]:
            raise HighwayBPError(
                f"Highway-BP: a copy of layer {i} of {stack.path} ran with the original's hooks (nn.DataParallel "
                "replicates modules this way). Use DistributedDataParallel (one process per device) instead."
            )
        self.next_layer = i + 1
        hidden = routing.split_hidden(args, kwargs)
        self.input_shape = (hidden.shape, hidden.dtype)
        self.grad_mode_seen.clear()
        if forward_checks.is_checkpointed(module) and not forward_checks.preserves_rng_state(module):
            self.rng_state = (hidden.device, forward_checks.rng_state(hidden.device))
        self.marks = routing.collector_marks(routing.collector())
        record = self.record
        if record is None:
            return self._maybe_start(i, module, hidden, args, kwargs)
        args, kwargs = self._streams_in(i, module, args, kwargs)
        if routing.has_grad_inputs(args, kwargs):
            args, kwargs = routing.replace_tensors(
                args, kwargs, functools.partial(self._known_leaf, i, module), deep=False
            )
        self.received = {name: t for name, (_, t) in routing.top_level_tensors(module, args, kwargs).items()}
        if not self._block_start(i):
            record.block_layers[-1].append(i)
            return args, kwargs
        if hidden is not self.last_exit:
            raise HighwayBPError(
                f"Highway-BP: layer {i} of {stack.path} did not receive the output of the layer that ran before it "
                "unchanged. Highway-BP supports stacks whose layers feed each other directly; pass "
                "layers=<ModuleList> of such a stack, or call unpatch_model(model)."
            )
        return routing.with_hidden(args, kwargs, self._begin_block(i, hidden.detach().requires_grad_(True)))

    def _begin_block(self, i: int, block_input: Tensor) -> Tensor:
        self.record.block_layers.append([i])
        self.record.inputs.append(block_input)
        self.block_starts.append(torch._C._autograd._get_sequence_nr())
        return block_input

    def _maybe_start(self, i: int, module: nn.Module, hidden: Tensor, args: tuple, kwargs: dict):
        """Start recording at the first layer whose block has something to train (or feeds something that does)."""
        stack, settings = self.stack, self.settings
        found: list[Tensor] = []
        routing.replace_tensors(args, kwargs, lambda _, tensor: found.append(tensor) or tensor, deep=True)
        g = settings.config.group_size
        block_end = min((i // g + 1) * g, len(stack))
        if not (hidden.requires_grad or found or _trainable(stack.layers[i:block_end])):
            return None  # frozen, and nothing below needs a gradient: the layer runs as it would unpatched
        flag = _EngineFlag()
        # A view of a larger tensor that requires grad (Gemma 3n's `per_layer_input`, one layer's slice of all the
        # layers' inputs) stands for that tensor: the blocks read views of its leaf, so each later layer's slice is
        # routed too, its gradient that block's VJP at each iteration (docs/algorithm.md, per-layer side inputs).
        bases = {id(t): base for t in found if (base := _viewed_base(t, hidden)) is not None}
        views = [t for t in found if id(t) in bases]
        originals = list({id(t): t for t in (bases.get(id(t), t) for t in found)}.values())
        for tensor in originals:
            if id(tensor) not in self.leaf_of:
                self.leaf_of[id(tensor)] = self._leaf(tensor)
        self.originals.extend(originals + views)
        for view in views:
            self.leaf_of[id(view)] = self._view_of_leaf(view)
        params = settings.lifecycle.block_parameters(settings.stack_index, stack.layers[i:])
        record = _StackRecord(
            log=settings.log,
            stack_index=settings.stack_index,
            lifecycle=settings.lifecycle,
            keep_block_grads=settings.keep_block_grads,
            stack=stack,
            config=copy.copy(settings.config),
            first_layer=i,
            flag=flag,
            params=params,
            side_leaves=[self.leaf_of[id(t)] for t in originals],
            input_requires_grad=hidden.requires_grad,
            token_dtype=hidden.dtype,
            token_device=hidden.device,
            capture=settings.capture,
        )
        self.token = _StackEntry.apply(record, hidden, *params, *originals)
        self.record = record
        if originals:
            args, kwargs = routing.replace_tensors(args, kwargs, lambda _, t: self.leaf_of.get(id(t), t), deep=True)
        self.received = {name: t for name, (_, t) in routing.top_level_tensors(module, args, kwargs).items()}
        x0 = _StackInput.apply(flag, hidden) if hidden.requires_grad else hidden
        settings.returned.add(id(x0))
        return routing.with_hidden(args, kwargs, self._begin_block(i, x0))

    def _streams_in(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The residual streams besides the hidden state (docs/algorithm.md, "Several residual streams"): at the
        record's first block boundary, the arguments that continue a stream decide the streams (and block 0's
        stream inputs and outputs, recorded as a side input and side outputs, become its state's); at every block
        boundary each stream's argument is replaced by a fresh leaf, the input of the block's state."""
        record, stack = self.record, self.stack
        top = routing.top_level_tensors(module, args, kwargs)
        continued = {
            name: (key, t, side) for name, (key, t) in top.items() if (side := self._continues(name, t)) is not None
        }
        if not self._block_start(i):
            if continued:
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {stack.path} hands on a residual stream besides its hidden state "
                    f"(`{next(iter(continued))}`), which Highway-BP follows only with group_size=1 (each layer a "
                    "block). Set group_size=1 (set_highway_config(model, group_size=1)), or unpatch_model(model)."
                )
            return args, kwargs
        if record.streams is None:
            self._decide_streams(i, continued)
        if not record.streams:
            return args, kwargs
        last = record.stream_exits[-1]
        replaced: dict[int | str, Tensor] = {}
        leaves = []
        for s, (name, _) in enumerate(record.streams):
            key, tensor, side = continued.get(name, (None, None, None))
            if side != last[s]:
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {stack.path} did not receive the `{name}` stream that the layer "
                    "before returned, unchanged. Highway-BP follows residual streams that each layer hands on to the "
                    "next directly; pass layers= with such a stack, or call unpatch_model(model)."
                )
            leaf = replaced[key] = tensor.detach().requires_grad_(True)
            self.leaf_ids.add(id(leaf))
            leaves.append(leaf)
        record.stream_inputs.append(leaves)
        return routing.with_arguments(args, kwargs, replaced)

    def _continues(self, name: str, tensor: Tensor) -> int | None:
        """The side output ``tensor`` is when it continues a stream: the layer before returned it (at a position of
        its output) and received, under the same argument name, a tensor of its shape and dtype; else None."""
        side = self.cut_of.get(id(tensor))
        if side is None or side not in self.previous_sides or self.record.side_positions[side] is None:
            return None
        before = self.received.get(name)
        if before is None or before.shape != tensor.shape or before.dtype != tensor.dtype:
            return None
        return side

    def _decide_streams(self, i: int, continued: dict[str, tuple]) -> None:
        """The first block boundary: the arguments that continue a stream are the state's streams."""
        record, stack = self.record, self.stack
        record.streams = [(name, record.side_positions[side]) for name, (_, _, side) in continued.items()]
        if not record.streams:
            return
        dtypes = {t.dtype for _, t, _ in continued.values()} | {record.outputs[0].dtype}
        if stack.residual_gate is not None or len(dtypes) > 1:
            raise HighwayBPError(
                f"Highway-BP: layer {i} of {stack.path} hands on residual streams besides its hidden state "
                f"({', '.join(name for name, _ in record.streams)}), which Highway-BP follows only for blocks "
                "h + g(h) of one dtype. Train this model with ordinary backprop (unpatch_model(model))."
            )
        inputs = [self.received[name] for name, _ in record.streams]
        record.stream_inputs.append(inputs)
        record.stream_exits.append([side for _, _, side in continued.values()])
        views = {id(v): v for v in self.leaf_views}
        sides = {id(z): z for z in record.side_leaves}
        for s, ((name, _), tensor) in enumerate(zip(record.streams, inputs), start=1):
            # Block 0's stream input is the leaf of a stream of h_0 that requires grad (LUKE's entity embeddings),
            # or a view of one (the output of a Linear on a 3-d input is a view): it gets its part of delta_0.
            view = views.get(id(tensor))
            leaf = sides.get(id(tensor) if view is None else id(view._base))  # a view of a leaf: made from the leaf
            if view is not None and (leaf is None or sum(v._base is view._base for v in self.leaf_views) > 1):
                raise HighwayBPError(
                    f"Highway-BP: the `{name}` stream of {stack.path} starts as a view of a tensor that other "
                    "views are read from too, which Highway-BP does not route. Train this model with ordinary "
                    "backprop (unpatch_model(model))."
                )
            if leaf is not None:
                record.stream_leaves[id(leaf)] = (s, view)

    def _known_leaf(self, i: int, module: nn.Module, name: str, tensor: Tensor) -> Tensor:
        """The leaf a later layer reads in place of a side input (or of a side output an earlier layer returned)."""
        record = self.record
        leaf = self.leaf_of.get(id(tensor))
        if (leaf is not None and id(leaf) in record.stream_leaves) or id(tensor) in record.stream_sides:
            raise HighwayBPError(
                f"Highway-BP: layer {i} of {record.path} reads a residual stream "
                f"(`{routing.argument_name(module, name)}`) that is not the one the layer before returned: only the "
                "next layer may read a stream's state. Train this model with ordinary backprop (unpatch_model(model))."
            )
        if leaf is not None:
            return leaf
        if id(tensor) in self.leaf_ids:
            return tensor
        base = tensor._base
        if base is not None and id(self.leaf_of.get(id(base))) in record.stream_leaves:
            raise HighwayBPError(
                f"Highway-BP: layer {i} of {record.path} reads a view of the tensor a residual stream started from "
                f"(`{routing.argument_name(module, name)}`). Train this model with ordinary backprop "
                "(unpatch_model(model))."
            )
        if base is not None and id(base) in self.leaf_of and self.leaf_of[id(base)] is not base:
            self.originals.append(tensor)  # a per-layer slice of a side input: a view of its leaf
            leaf = self.leaf_of[id(tensor)] = self._view_of_leaf(tensor)
            return leaf
        side = self.cut_of.get(id(tensor))
        if side is not None:  # a side output of an earlier block that later blocks read (T5's position bias)
            block, original = record.side_outputs[side]
            state = record.state_input(block) if block > 0 else ()  # the hidden state and any streams
            if any(forward_checks.reaches(original, x) for x in state):
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {record.path} reads a tensor that an earlier layer returned and that "
                    f"depends on that layer's hidden state (`{routing.argument_name(module, name)}`): its gradient "
                    "would feed the Highway iteration it depends on. Train this model with ordinary backprop "
                    "(unpatch_model(model))."
                )
            if any(forward_checks.reaches(original, carried) for _, carried in record.carried):
                # Its gradient would reach the tensor it was computed from only through a block's graph that the
                # routing of carried tensors does not follow (each goes into the block that returned it).
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {record.path} reads a tensor that an earlier layer returned "
                    f"(`{routing.argument_name(module, name)}`) and computed from another tensor a layer handed on, "
                    "not as a residual stream of its own (one the first layer receives under the same name). Train "
                    "this model with ordinary backprop (unpatch_model(model))."
                )
            leaf = self.leaf_of[id(tensor)] = self._leaf(tensor)
            record.carried.append((side, leaf))
            return leaf
        raise HighwayBPError(
            f"Highway-BP: layer {i} of {record.path} receives `{routing.argument_name(module, name)}`, a tensor that "
            f"requires grad that layer {record.first_layer} did not receive and that no earlier layer returned. "
            "Highway-BP routes the side inputs that the stack's first layer receives too (encoder states, prefix keys "
            "and values, parameters passed in) and the tensors a layer returns for the next ones (T5's position "
            "bias). Train this model with ordinary backprop (unpatch_model(model)), or pass that tensor to every "
            "layer."
        )

    def _leaf(self, tensor: Tensor) -> Tensor:
        """The leaf that blocks read in place of a side input (or of a carried side output)."""
        leaf = tensor.detach().requires_grad_(True)
        self.leaf_ids.add(id(leaf))
        return leaf

    def _view_of_leaf(self, view: Tensor) -> Tensor:
        """The same view of the leaf of ``view``'s base (the leaf shares the base's storage)."""
        leaf = self.leaf_of[id(view._base)].as_strided(view.size(), view.stride(), view.storage_offset())
        self.leaf_ids.add(id(leaf))
        self.leaf_views.append(leaf)
        return leaf

    # ----- after a layer ----------------------------------------------------------------------------------------
    def changed_shape(self, i: int, output) -> str | None:
        """What layer ``i`` did to the hidden state's shape or dtype (None: kept them)."""
        hidden = routing.output_hidden(output)
        (shape, dtype) = self.input_shape
        if (hidden.shape, hidden.dtype) == (shape, dtype):
            return None
        what = f"layer {i} of {self.stack.path} maps a {tuple(shape)} state to a {tuple(hidden.shape)} one"
        return what + (f" ({dtype} to {hidden.dtype})" if dtype != hidden.dtype else "")

    @property
    def untouched(self) -> bool:
        """Nothing was cut from the model's graph yet (the list can still be let go)."""
        record = self.record
        return record is None or (not record.outputs and not self.originals and not record.side_outputs)

    def after_layer(self, i: int, output):
        """The patch's hook on an active forward whose layer kept the state's shape: the new output, or None."""
        stack = self.stack
        if self.rng_state is not None:
            (device, before), self.rng_state = self.rng_state, None
            forward_checks.check_rng(stack, i, device, before)
        record = self.record
        if record is None:
            return None
        if self.grad_mode_seen and not any(self.grad_mode_seen):
            forward_checks.refuse_reentrant_checkpointing(stack, i)
        hidden = routing.output_hidden(output)
        if not hidden.requires_grad and not record.outputs and self._block_end(i):
            self.record = self.token = None  # its trainable parameters did not take part: still the frozen prefix
            return None
        output = self._cut_side_outputs(i, output)
        if not self._block_end(i):
            return routing.with_output_hidden(output, _GroupInnerGuard.apply(record.flag, i, hidden))
        index = len(record.outputs)
        record.outputs.append(hidden)
        exit_hidden, self.token = _Exit.apply(record, record.output_grads, index, hidden.detach(), self.token)
        record.exits.append(weakref.ref(exit_hidden))
        self.settings.returned.add(id(exit_hidden))
        self.last_exit = exit_hidden
        if self.settings.check_graph:
            self._check_graph(index)
            self.graph_checked = i == len(stack) - 1
        return routing.with_output_hidden(output, exit_hidden)

    def _cut_side_outputs(self, i: int, output):
        record = self.record
        block = len(record.outputs)
        replaced = {}
        sides_before = len(record.side_outputs)
        for position, tensor in routing.output_extras(output):
            if id(tensor) not in self.leaf_ids:  # a side input handed on unchanged is not a side output
                replaced[position] = self._side_exit(block, tensor, position)
        for values, position, tensor in routing.new_collected(routing.collector(), self.marks):
            values[position] = self._side_exit(block, tensor, None)
        if record.streams and self._block_end(i):  # the block's stream outputs: the rest of its state
            missing = [name for name, position in record.streams if position not in replaced]
            if missing:
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {record.path} does not return the `{missing[0]}` stream as a tensor "
                    "that requires grad, as the layers before it did. Train this model with ordinary backprop "
                    "(unpatch_model(model))."
                )
            record.stream_exits.append([self.cut_of[id(replaced[position])] for _, position in record.streams])
        self.previous_sides = set(range(sides_before, len(record.side_outputs)))
        return routing.with_output_extras(output, replaced) if replaced else output

    def _side_exit(self, block: int, tensor: Tensor, position: int | None) -> Tensor:
        record = self.record
        record.side_outputs.append((block, tensor))
        record.side_positions.append(position)
        index = len(record.side_outputs) - 1
        cut, self.token = _Exit.apply(record, record.side_grads, index, tensor.detach(), self.token)
        record.returned_sides.append(weakref.ref(cut))
        self.settings.returned.add(id(cut))
        self.cut_of[id(cut)] = index
        self.originals.append(cut)
        return cut

    def _check_graph(self, block: int) -> None:
        record, settings = self.record, self.settings
        allowed = {id(p) for p in settings.lifecycle.block_parameters(settings.stack_index, self.stack.layers)}
        allowed |= {id(x) for x in record.inputs[1:]} | {id(z) for z in record.side_leaves}
        allowed |= {id(z) for _, z in record.carried} | {id(x) for xs in record.stream_inputs for x in xs}
        stops = {id(record.inputs[0].grad_fn)} if record.inputs[0].grad_fn is not None else set()
        stops |= {id(view.grad_fn) for view in self.leaf_views}  # views of side-input leaves (allowed)
        forward_checks.check_block_graph(
            self.stack, block, record.outputs[block], self.block_starts[block], allowed, stops
        )

    def _block_start(self, i: int) -> bool:
        return i % self.settings.config.group_size == 0 or i == self.record.first_layer

    def _block_end(self, i: int) -> bool:
        g = self.settings.config.group_size
        return i % g == g - 1 or i == len(self.stack) - 1


def _viewed_base(tensor: Tensor, hidden: Tensor) -> Tensor | None:
    """The tensor ``tensor`` is a view of, when that one requires grad and is not the hidden state's."""
    base = tensor._base
    if base is None or not base.requires_grad or base is hidden or base is hidden._base:
        return None
    return base


def _trainable(layers) -> list[Tensor]:
    return [p for layer in layers for p in layer.parameters() if p.requires_grad]
