"""What one training forward of one stack records, and the Highway-BP backward that consumes it.

The recorder (``recorder.py``) cuts each block's local graph out of the model's graph and records it in a
``_StackRecord``, the one place that says what each block read and handed on. The autograd Functions here stitch
the cut graph back together so that autograd calls every exit of a stack (which store the gradients reaching the
block outputs and the side outputs) before the stack's entry, whose backward runs ``run_backward``: the routing of
side outputs (``routing.backward``), the engine's recursion and its parameter step on the recorded graphs
(``engine.RecordedStack``, or the stack a backend builds from the record: ``batched_adapter``), the routing of
tensors a block hands on, and what the returned tensors that retain their gradient get. A record is held by its
autograd graph (the entry and the exits), never by the patch.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .batched_adapter import batched_stack
from .config import HighwayConfig
from .discovery import Stack
from .engine import RecordedStack, StatePacking, run_recursion
from .errors import HighwayBPError
from .forward_checks import rng_state
from .routing.backward import add_grads, carried_into_blocks, give_retained, side_output_vjp
from .sharding import ParameterLifecycle


# ----- autograd Functions ---------------------------------------------------------------------------------------
class _EngineFlag:
    """Set while Highway-BP itself backpropagates through a record's local graphs (holds no tensor)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


def _refuse_double_backward(*_) -> None:
    """Raises when the running backward creates a graph (``create_graph=True``). Also a tensor hook: the patch
    puts it on what the model returns, so that the refusal comes before any parameter above the stack (the head,
    the final norm) gets a gradient."""
    if torch.is_grad_enabled():
        raise HighwayBPError(
            "Highway-BP does not support create_graph=True (double backward, e.g. gradient penalties or "
            "Hessian-vector products) through a patched stack. Run that computation inside "
            "`with hf_hwbp.exact_backprop(model):` (ordinary backprop), or unpatch_model(model)."
        )


class _StackEntry(torch.autograd.Function):
    """Emits the token that starts the exit chain; its backward is the whole Highway-BP backward of one stack."""

    @staticmethod
    def forward(ctx, record, h0: Tensor, *tensors: Tensor):
        ctx.record = record
        return h0.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        record = ctx.record
        if record is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors after they "
                "have already been freed). Highway-BP frees a stack's recorded graph in the first backward, as "
                "autograd does. To backpropagate two losses of one forward, call (l1 + l2).backward() once, or "
                "pass retain_graph=True to the first backward."
            )
        grads = run_backward(record)
        if not record.retained:
            ctx.record = None
        return (None,) + grads


class _Exit(torch.autograd.Function):
    """Hands on a value cut from its block's graph (a block output, or a side output such as an attention map) and
    chains the token; its backward stores the gradient that reaches the value in ``grads[index]`` (the record's
    ``output_grads`` or ``side_grads``)."""

    @staticmethod
    def forward(ctx, record, grads: dict, index: int, value: Tensor, token: Tensor):
        ctx.record, ctx.grads, ctx.index = record, grads, index
        ctx.set_materialize_grads(False)
        return value, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, grad_token):
        _refuse_double_backward()
        if grad is not None:
            ctx.grads[ctx.index] = grad
        record = ctx.record
        return None, None, None, None, torch.zeros((), dtype=record.token_dtype, device=record.token_device)


class _StackInput(torch.autograd.Function):
    """Block 1's view of h_0: ordinary autograd crosses it (a loss on h_0 itself); the Highway backward does not."""

    @staticmethod
    def forward(ctx, flag: _EngineFlag, h0: Tensor):
        ctx.flag = flag
        return h0.view_as(h0)

    @staticmethod
    def backward(ctx, grad):
        return None, (None if ctx.flag.active else grad)


class _GroupInnerGuard(torch.autograd.Function):
    """Identity on a hidden state inside a group of layers; refuses gradients from outside the stack."""

    @staticmethod
    def forward(ctx, flag: _EngineFlag, layer_index: int, hidden: Tensor):
        ctx.flag, ctx.layer_index = flag, layer_index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.flag.active:
            raise HighwayBPError(
                f"Highway-BP: the loss reads the hidden state after layer {ctx.layer_index}, which lies inside a "
                "group of layers (group_size > 1). Only hidden states at group boundaries can carry a loss: use "
                "group_size=1, or leave that hidden state out of the loss."
            )
        return None, None, grad


# ----- what one forward leaves for its backward ----------------------------------------------------------------
@dataclass(eq=False)
class IterationLog:
    """How many Highway iterations the last backward ran: written by the records' backwards (and by forwards that
    will run none), read through ``last_highway_iterations(model)``. Records hold this small object, not the patch,
    so a held loss keeps no model alive; reading never consumes the value.

    ``last`` is None when the last training step ran no Highway-BP (eval mode, ``exact_backprop``, disabled) and
    the number of blocks when it was an exact step run as ordinary backprop (the same gradient as k = L).
    """

    last: int | None = None
    block_grads: list | None = None  # delta^(k)_1..L of the last stack backward, when asked for (tuples: streams)
    _writer: int | None = None  # the backward's graph task that wrote ``last`` (-2: a forward did)

    def backward_ran(self, iterations: int, block_grads: list[Tensor] | None) -> None:
        """A stack's Highway backward ran: the largest count over the stacks and forwards of one backward."""
        task = torch._C._current_graph_task_id()
        same_backward = task == self._writer and self.last is not None
        self.last = max(self.last, iterations) if same_backward else iterations
        self._writer = task
        self.block_grads = block_grads

    def forward_without_highway(self, iterations: int | None) -> None:
        """A training forward whose backward runs no Highway iteration: ordinary backprop of an exact step
        (``iterations`` = the stack's blocks) or no Highway-BP at all (None)."""
        same_forward = self._writer == -2 and self.last is not None and iterations is not None
        self.last = max(self.last, iterations) if same_forward else iterations
        self._writer = -2
        self.block_grads = None


@dataclass(eq=False)
class _StackRecord:
    """One training forward of one stack: what each block read and handed on. Held by its autograd graph (entry and
    exits), never by the patch.

    Block indices are 0-based over the recorded blocks (block 0 starts at ``first_layer``)."""

    log: IterationLog  # where the backward reports its iterations
    stack_index: int  # the stack's index in HighwayPatch.hooked_stacks (what the lifecycle calls use)
    lifecycle: ParameterLifecycle  # gathers the blocks' parameters around each VJP (FSDP2, ZeRO-3), or nothing
    keep_block_grads: bool  # report delta^(k)_1..L too (fidelity metrics, tests)
    stack: Stack
    config: HighwayConfig  # the settings of this forward
    first_layer: int  # layers below it were frozen and fed nothing that requires grad: they are not recorded
    flag: _EngineFlag
    params: list[Tensor]  # the trainable parameters of the recorded layers, each once (ParameterLifecycle's)
    side_leaves: list[Tensor]  # the leaves blocks read in place of side inputs (encoder states, prefix keys, ...)
    input_requires_grad: bool
    token_dtype: torch.dtype
    token_device: torch.device
    capture: object | None = None  # a backend's capture of what each block was called with (batched_adapter)
    block_layers: list[list[int]] = field(default_factory=list)  # the stack's layer indices each block ran
    inputs: list[Tensor] = field(default_factory=list)  # x_{j-1} of each block, as its local graph sees it
    outputs: list[Tensor] = field(default_factory=list)  # y_j, attached to block j's local graph
    exits: list[weakref.ref] = field(default_factory=list)  # the tensor the model got in place of each y_j
    output_grads: dict[int, Tensor] = field(default_factory=dict)  # block -> gradient reaching its output
    side_outputs: list[tuple[int, Tensor]] = field(default_factory=list)  # (block, tensor in its local graph)
    returned_sides: list[weakref.ref] = field(default_factory=list)  # the tensor the model got for each of them
    side_grads: dict[int, Tensor] = field(default_factory=dict)  # side output -> gradient the loss sent it
    carried: list[tuple[int, Tensor]] = field(default_factory=list)  # (side output, the leaf later blocks read)
    side_positions: list[int | None] = field(default_factory=list)  # each side output's place in its layer's output
    # Residual streams besides the hidden state (LUKE's entity states): decided at the first block boundary (None
    # until then); (argument name, position in the layer's output) of each. Block b's state is then
    # (inputs[b], *stream_inputs[b]) -> (outputs[b], *the side outputs stream_exits[b]).
    streams: list[tuple[str, int]] | None = None
    stream_inputs: list[list[Tensor]] = field(default_factory=list)
    stream_exits: list[list[int]] = field(default_factory=list)
    # id(side leaf) -> (stream, the view of it block 0 read, or None): block 0's stream inputs that are side leaves
    stream_leaves: dict[int, tuple[int, Tensor | None]] = field(default_factory=dict)
    retained: bool = False  # the last backward ran with retain_graph=True: the graphs are kept for the next one

    @property
    def path(self) -> str:
        return self.stack.path

    @property
    def stream_sides(self) -> dict[int, tuple[int, int]]:
        """side output -> (block, stream) for the side outputs that are a block's stream outputs (stream >= 1)."""
        return {side: (b, s) for b, sides in enumerate(self.stream_exits) for s, side in enumerate(sides, start=1)}

    def state_input(self, block: int) -> tuple[Tensor, ...]:
        """Block ``block``'s input state: its hidden state, then each stream's."""
        return (self.inputs[block], *(self.stream_inputs[block] if self.streams else ()))

    def state_output(self, block: int) -> tuple[Tensor, ...]:
        """Block ``block``'s output state, in its local graph: its hidden state, then each stream's."""
        sides = self.stream_exits[block] if self.streams else ()
        return (self.outputs[block], *(self.side_outputs[side][1] for side in sides))

    @property
    def input_wanted(self) -> bool:
        """Whether some stream of the stack input requires grad (delta_0 is delivered)."""
        return any(x.requires_grad for x in self.state_input(0))

    @property
    def routes_side_paths(self) -> bool:
        """Whether anything besides the hidden state enters or leaves the blocks through autograd."""
        return bool(self.side_outputs or self.side_grads or self.carried or self.side_leaves)

    def release(self) -> None:
        """Drop everything of this forward (after a backward that does not retain the graph)."""
        for held in (self.inputs, self.outputs, self.exits, self.side_outputs, self.returned_sides, self.params):
            held.clear()
        for held in (self.side_leaves, self.carried, self.block_layers, self.stream_inputs, self.stream_exits):
            held.clear()
        self.side_positions.clear()
        self.stream_leaves.clear()


def _keep_graph() -> bool:
    """Whether the backward running now was asked to retain the graph (``retain_graph=True``)."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def run_backward(record: _StackRecord) -> tuple:
    """Highway-BP(k) of one recorded stack forward: (grad of h_0, *grads of params, *grads of side inputs)."""
    _refuse_double_backward()
    _refuse_unrouted(record)
    keep = _keep_graph()
    # A block-0 stream input that is a side leaf (LUKE's entity embeddings) gets its part of delta_0, not a VJP.
    everything = record.params + record.side_leaves
    wrt = [t for t in everything if id(t) not in record.stream_leaves]
    last = len(record.outputs) - 1
    streams = bool(record.streams)
    packing = StatePacking(record.state_output(last))  # one stream: the identity
    # The top state's streams that no gradient reached stay None: the engine leaves them out of the top block's VJPs.
    d = _state_parts(record, last)
    d = [torch.zeros_like(record.outputs[last]) if d[0] is None else d[0], *d[1:]]
    d = d[0] if not streams else d
    # e_j for j = 1..L-1 arrive at the block outputs; e_0 (a loss on h_0 itself) reaches h_0 through autograd.
    extra: list[Tensor | None] = [None] + [_state_grad(record, packing, j) for j in range(last)]
    carried_leaves = [leaf for _, leaf in record.carried]
    retained_sides = _retained_sides(record)  # side outputs the caller keeps the gradient of: their own VJP targets
    direct: tuple[Tensor | None, ...] = (None,) * len(wrt)
    carried_direct: tuple[Tensor | None, ...] = (None,) * len(carried_leaves)
    gate = record.stack.residual_gate
    gates = [gate(output.detach()) for output in record.outputs] if gate is not None else None
    lifecycle = record.lifecycle
    gathered = functools.partial(lifecycle.gathered, record.stack_index)
    x0 = record.inputs[0]
    x0_grad = x0.grad if x0.retains_grad else None  # our VJPs through block 1 must not show in a retained h_0
    device = record.outputs[0].device
    rng_before = rng_state(device)
    record.flag.active = True
    try:
        if record.side_grads:
            direct, carried_direct = side_output_vjp(record, extra, wrt, carried_leaves, gathered, packing)
        stacked = None if streams else batched_stack(record, d, extra)  # None: the sequential engine
        if stacked is None:
            blocks = range(len(record.outputs))
            stacked = RecordedStack(
                [record.state_input(b) for b in blocks] if streams else record.inputs,
                [record.state_output(b) for b in blocks] if streams else record.outputs,
                d,
                extra,
                need_input_grad=record.input_wanted,
                residual_gates=gates,
                around_blocks=gathered,
            )
        delta, iterations = run_recursion(stacked, record.config.k, record.config.tol)
        input_grad = delta[0] if record.input_wanted else None  # flat over the streams
        # One parameter VJP of every block with its delta^(k)_j. It keeps the local graphs when the next backward
        # needs them again (retain_graph=True) or when carried tensors still need their sources' graphs.
        targets = wrt + carried_leaves + [s for _, s, _ in retained_sides]
        retain = keep or bool(carried_leaves)
        if not isinstance(stacked, RecordedStack):
            grads = tuple(stacked.param_grads(delta, targets))
        elif lifecycle.per_block_parameter_step:
            grads = _parameter_step_by_block(record, stacked, delta, targets, retain, direct, retained_sides)
            direct = (None,) * len(wrt)  # added block by block, before the lifecycle takes a block's gradients
        else:
            grads = stacked.parameter_vjps(delta, targets, retain_graph=retain)
        side_more = list(grads[len(wrt) + len(carried_leaves) :])
        carried_grads = [
            add_grads(g, s) for g, s in zip(grads[len(wrt) : len(wrt) + len(carried_leaves)], carried_direct)
        ]
        grads = grads[: len(wrt)]
        if carried_leaves:
            # A carried tensor's gradient: through the blocks that read it (the VJP above) and through the side
            # outputs that read it (the side-output VJP before the engine).
            grads, input_grad = carried_into_blocks(record, carried_grads, grads, input_grad, wrt, gathered, packing)
        _refuse_new_random_numbers(record, device, rng_before)
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise HighwayBPError(
                f"Highway-BP: the graph of a block of {record.path} was already consumed when the Highway backward "
                "started: the loss reads a tensor computed inside a layer by a path Highway-BP does not route "
                "(it routes the layer output, hidden states, and what transformers' output capturing collects: "
                "attentions, router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            ) from err
        raise
    finally:
        record.flag.active = False
        lifecycle.backward_finished(record.stack_index)
    if x0.retains_grad:
        x0.grad = x0_grad
    carried_of = {side: g for (side, _), g in zip(record.carried, carried_grads)}
    give_retained(
        _retained_states(record, delta, x0, packing),
        [(t, add_grads(more, carried_of.get(i))) for (i, _, t), more in zip(retained_sides, side_more)],
    )
    grads = tuple(add_grads(g, extra_g) for g, extra_g in zip(grads, direct))
    h0 = packing.unpack(input_grad) if input_grad is not None else (None,) * packing.streams
    if record.stream_leaves:  # block 0's stream inputs that are side leaves: their part of delta_0
        given = iter(grads)
        grads = tuple(
            _stream_leaf_grad(record, t, h0) if id(t) in record.stream_leaves else next(given) for t in everything
        )
    input_grad = h0[0] if record.input_requires_grad else None
    kept = [packing.unpack(v) if streams else v for v in delta[1:]] if record.keep_block_grads else None
    record.log.backward_ran(iterations, kept)  # with streams: a tuple per state
    record.retained = keep
    record.output_grads.clear()
    record.side_grads.clear()
    if not keep:  # nothing of this forward outlives its backward, even while the caller keeps the loss
        record.release()
    return (input_grad,) + grads


def _refuse_new_random_numbers(record: _StackRecord, device: torch.device, before: Tensor) -> None:
    """Recomputing a checkpointed block in the Highway backward drew random numbers: its checkpoint does not restore
    the forward's RNG state (preserve_rng_state=False behind a function the forward could not read), so each sweep
    used other dropout masks than the forward. Refused before the blocks' gradients are handed to autograd."""
    if not torch.equal(before, rng_state(device)):
        raise HighwayBPError(
            f"Highway-BP: recomputing a checkpointed layer of {record.path} in the Highway backward drew new random "
            "numbers (dropout under activation checkpointing with preserve_rng_state=False): each of the k + 1 "
            "sweeps used other dropout masks than the forward, so the stack's gradients are not delivered. Keep "
            "preserve_rng_state=True (the default) in the checkpointing kwargs, or turn dropout off."
        )


def _split(grads: tuple, *sizes: int) -> list[tuple]:
    """``grads`` cut into consecutive parts of ``sizes`` and the rest."""
    parts, start = [], 0
    for size in sizes:
        parts.append(tuple(grads[start : start + size]))
        start += size
    return [*parts, tuple(grads[start:])]


def _retained_sides(record: _StackRecord) -> list[tuple[int, Tensor, Tensor]]:
    """(index, tensor in its block's graph, returned tensor) of each side output whose returned tensor retains its
    gradient (``retain_grad()``); a stream's state is no side output here (``_retained_states``)."""
    found = []
    streams = record.stream_sides
    for i, ((_, inside), ref) in enumerate(zip(record.side_outputs, record.returned_sides)):
        if i in streams:
            continue
        returned = ref()
        if returned is not None and returned.retains_grad:
            found.append((i, inside, returned))
    return found


def _stream_leaf_grad(record: _StackRecord, leaf: Tensor, h0: tuple) -> Tensor | None:
    """A stream's part of delta_0, for the side leaf that stream of h_0 started from (through the view of it that
    block 0 read, when it read one)."""
    stream, view = record.stream_leaves[id(leaf)]
    g = h0[stream]
    if g is None or view is None:
        return g
    return torch.autograd.grad(view, leaf, g, retain_graph=True)[0]


def _state_parts(record: _StackRecord, block: int) -> list[Tensor | None]:
    """The gradient the loss sent each stream of block ``block``'s output state (None where none)."""
    sides = record.stream_exits[block] if record.streams else ()
    return [record.output_grads.get(block), *(record.side_grads.get(side) for side in sides)]


def _state_grad(record: _StackRecord, packing: StatePacking, block: int) -> Tensor | None:
    """The gradient the loss sent block ``block``'s output state, flat over its streams; None when none."""
    return packing.pack(_state_parts(record, block))


def _retained_states(record: _StackRecord, delta, x0: Tensor, packing: StatePacking) -> list[tuple[Tensor, Tensor]]:
    """(returned state, what it gets beyond the gradient the loss sent it) for each returned hidden state (or stream
    state) that retains its gradient: delta^(k)_j minus e_j at a block output, delta^(k)_0 at the stack input
    (whose e_0 reaches it through autograd, not through the engine)."""
    found = []
    if x0.retains_grad and record.input_requires_grad:
        found.append((x0, packing.unpack(delta[0])[0]))
    last = len(record.exits) - 1
    for j, ref in enumerate(record.exits[:last]):
        parts = packing.unpack(delta[j + 1])
        sides = record.stream_exits[j] if record.streams else ()
        exits = [(ref, record.output_grads.get(j))]
        exits += [(record.returned_sides[side], record.side_grads.get(side)) for side in sides]
        for (held, e), part in zip(exits, parts):
            returned = held()
            if returned is not None and returned.retains_grad:
                found.append((returned, part if e is None else part - e))
    return found


def _parameter_step_by_block(
    record: _StackRecord,
    stack: RecordedStack,
    delta: list[Tensor],
    targets: list[Tensor],
    retain: bool,
    direct: tuple[Tensor | None, ...],
    retained_sides: list[tuple[int, Tensor, Tensor]],
) -> tuple[Tensor | None, ...]:
    """The parameter step one block at a time, from the top (a lifecycle that gathers one block's parameters at a
    time): each block's VJP with respect to its own parameters, every side input and carried tensor, and its own
    retained side outputs, plus what its parameters got directly from side outputs (``direct``, in the order of
    ``targets``), then ``take_parameter_grads``; the sums over blocks, in the order of ``targets``."""
    lifecycle, s = record.lifecycle, record.stack_index
    position = {id(t): n for n, t in enumerate(targets)}
    shared = targets[len(record.params) : len(targets) - len(retained_sides)]  # side inputs and carried tensors
    own_sides = {
        j: [inside for i, inside, _ in retained_sides if record.side_outputs[i][0] == j]
        for j in range(len(record.outputs))
    }
    totals: list[Tensor | None] = list(direct) + [None] * (len(targets) - len(direct))
    pending = set(range(len(record.params)))  # parameters whose direct term has not been handed to a block yet
    for j in range(len(record.outputs) - 1, -1, -1):
        params = lifecycle.block_parameters(s, [record.stack.layers[i] for i in record.block_layers[j]])
        unknown = [tuple(p.shape) for p in params if id(p) not in position]
        if unknown:
            raise HighwayBPError(
                f"Highway-BP: the parameter lifecycle ({type(lifecycle).__name__}) gives block {j} of "
                f"{record.path} parameters {unknown} that it did not give for the whole stack when the forward "
                "started: block_parameters must return the same tensors for a block alone as within the stack."
            )
        others = shared + own_sides[j]
        prefetch = [j - 1] if j > 0 else []
        grads = stack.parameter_vjps(delta, params + others, [j], prefetch=prefetch, retain_graph=retain)
        own = []
        for p, g in zip(params, grads[: len(params)]):
            n = position[id(p)]
            if n in pending:  # the side outputs' direct term joins the first block that holds the parameter
                pending.discard(n)
                g, totals[n] = add_grads(g, totals[n]), None
            own.append(g)
        taken = lifecycle.take_parameter_grads(s, j, params, own)
        if len(taken) != len(params):
            raise HighwayBPError(
                f"Highway-BP: {type(lifecycle).__name__}.take_parameter_grads returned {len(taken)} gradients for "
                f"the {len(params)} parameters of block {j}: it must return one (or None) per parameter, in order."
            )
        for tensor, g in zip(params + others, list(taken) + list(grads[len(params) :])):
            if g is not None:
                totals[position[id(tensor)]] = add_grads(totals[position[id(tensor)]], g)
    return tuple(totals)


def _refuse_unrouted(record: _StackRecord) -> None:
    """A gradient in a block-input or side-input leaf came through a block's graph outside Highway-BP."""
    streams = [x for xs in record.stream_inputs[1:] for x in xs]
    for position, leaf in enumerate(record.inputs[1:] + record.side_leaves + [z for _, z in record.carried] + streams):
        if leaf.grad is not None:
            where = (
                f"the input of block {position + 1} of {record.path}"
                if position < len(record.inputs) - 1
                else f"a side input of {record.path}"
            )
            raise HighwayBPError(
                f"Highway-BP: a gradient reached {where} through a block's graph, outside the Highway backward: "
                "the loss reads a tensor computed inside a layer that Highway-BP does not route (it routes the "
                "layer output, hidden states, and what transformers' output capturing collects: attentions, "
                "router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            )
