"""What one training forward of one stack records, and the Highway-BP backward that consumes it.

The forward side (``patching.py``) cuts each block's local graph out of the model's graph and records it in a
``_StackRecord``; the autograd Functions here stitch the cut graph back together so that autograd calls every
exit of a stack (which store the gradients reaching the block outputs and the side outputs) before the stack's
entry, whose backward runs ``run_backward``: one VJP of the side outputs (docs/algorithm.md, side outputs), the
engine (k input-only sweeps, one parameter VJP), and the routing of tensors a block hands on to the blocks above.
A record is held by its autograd graph (the entry and the exits), never by the patch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .batched import batched_stack
from .config import HighwayConfig
from .discovery import Stack
from .engine import RecordedStack, run_recursion
from .errors import HighwayBPError
from .sharding import ParameterLifecycle


# ----- autograd Functions ---------------------------------------------------------------------------------------
class _EngineFlag:
    """Set while Highway-BP itself backpropagates through a record's local graphs (holds no tensor)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


def _refuse_double_backward() -> None:
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
    block_grads: list[Tensor] | None = None  # delta^(k)_1..L of the last stack backward, when asked for
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
    """One training forward of one stack. Held by its autograd graph (entry and exits), never by the patch."""

    log: IterationLog  # where the backward reports its iterations
    stack_index: int  # the stack's index in HighwayPatch.hooked_stacks (what the lifecycle calls use)
    lifecycle: ParameterLifecycle  # gathers the blocks' parameters around each VJP (FSDP2, ZeRO-3), or nothing
    keep_block_grads: bool  # report delta^(k)_1..L too (fidelity metrics, tests)
    stack: Stack
    config: HighwayConfig  # the settings of this forward
    first_layer: int  # layers below it were frozen and fed nothing that requires grad: they are not recorded
    flag: _EngineFlag
    params: list[Tensor]
    side_leaves: list[Tensor]
    input_requires_grad: bool
    token_dtype: torch.dtype
    token_device: torch.device
    block_layers: list[list[int]] = field(default_factory=list)  # the stack's layer indices each block ran
    inputs: list[Tensor] = field(default_factory=list)  # x_{j-1} of each block, as its local graph sees it
    outputs: list[Tensor] = field(default_factory=list)  # y_j, attached to block j's local graph
    output_grads: dict[int, Tensor] = field(default_factory=dict)  # block -> gradient reaching its output
    side_outputs: list[tuple[int, Tensor]] = field(default_factory=list)  # (block, tensor in its local graph)
    side_grads: dict[int, Tensor] = field(default_factory=dict)  # side output -> gradient the loss sent it
    carried: list[tuple[int, Tensor]] = field(default_factory=list)  # (side output, the leaf later blocks read)
    retained: bool = False  # the last backward ran with retain_graph=True: the graphs are kept for the next one


def _keep_graph() -> bool:
    """Whether the backward running now was asked to retain the graph (``retain_graph=True``)."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def run_backward(record: _StackRecord) -> tuple:
    """Highway-BP(k) of one recorded stack forward: (grad of h_0, *grads of params, *grads of side inputs)."""
    _refuse_double_backward()
    stack = record.stack
    _refuse_unrouted(record)
    keep = _keep_graph()
    wrt = record.params + record.side_leaves
    last = len(record.outputs) - 1
    d = record.output_grads.get(last)
    if d is None:
        d = torch.zeros_like(record.outputs[last])
    # e_j for j = 1..L-1 arrive at the block outputs; e_0 (a loss on h_0 itself) reaches h_0 through autograd.
    extra: list[Tensor | None] = [None] + [record.output_grads.get(j) for j in range(last)]
    carried_leaves = [leaf for _, leaf in record.carried]
    direct: tuple[Tensor | None, ...] = (None,) * len(wrt)
    carried_direct: tuple[Tensor | None, ...] = (None,) * len(carried_leaves)
    config = record.config
    gate = stack.residual_gate
    gates = [gate(output.detach()) for output in record.outputs] if gate is not None else None
    lifecycle = record.lifecycle
    gathered = functools.partial(lifecycle.gathered, record.stack_index)
    record.flag.active = True
    try:
        if record.side_grads:
            direct, carried_direct = _route_side_outputs(record, extra, wrt, carried_leaves, gathered)
        stacked = batched_stack(record, d, extra)  # None: the sequential engine on the recorded graphs
        if stacked is None:
            stacked = RecordedStack(
                record.inputs,
                record.outputs,
                d,
                extra,
                need_input_grad=record.input_requires_grad,
                residual_gates=gates,
                around_blocks=gathered,
            )
        delta, iterations = run_recursion(stacked, config.k, config.tol)
        input_grad = delta[0] if record.input_requires_grad else None
        # One parameter VJP of every block with its delta^(k)_j. It keeps the local graphs when the next backward
        # needs them again (retain_graph=True) or when carried tensors still need their sources' graphs.
        targets = wrt + carried_leaves
        retain = keep or bool(carried_leaves)
        if not isinstance(stacked, RecordedStack):
            grads = tuple(stacked.param_grads(delta, targets))
        elif lifecycle.per_block_parameter_step:
            grads = _parameter_step_by_block(record, stacked, delta, targets, retain, direct)
            direct = (None,) * len(wrt)  # added block by block, before the lifecycle takes a block's gradients
        else:
            grads = stacked.parameter_vjps(delta, targets, retain_graph=retain)
        if carried_leaves:
            # A carried tensor's gradient: through the blocks that read it (the VJP above) and through the side
            # outputs that read it (the side-output VJP before the engine).
            carried_grads = [_add(g, s) for g, s in zip(grads[len(wrt) :], carried_direct)]
            grads, input_grad = _route_carried(record, carried_grads, grads[: len(wrt)], input_grad, wrt, gathered)
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise HighwayBPError(
                f"Highway-BP: the graph of a block of {stack.path} was already consumed when the Highway backward "
                "started: the loss reads a tensor computed inside a layer by a path Highway-BP does not route "
                "(it routes the layer output, hidden states, and what transformers' output capturing collects: "
                "attentions, router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            ) from err
        raise
    finally:
        record.flag.active = False
        lifecycle.backward_finished(record.stack_index)
    grads = tuple(_add(g, extra_g) for g, extra_g in zip(grads, direct))
    record.log.backward_ran(iterations, list(delta[1:]) if record.keep_block_grads else None)
    record.retained = keep
    record.output_grads.clear()
    record.side_grads.clear()
    if not keep:  # nothing of this forward outlives its backward, even while the caller keeps the loss
        held_lists = (record.inputs, record.outputs, record.side_outputs, record.params, record.side_leaves)
        for held in held_lists + (record.carried, record.block_layers):
            held.clear()
    return (input_grad,) + grads


def _parameter_step_by_block(
    record: _StackRecord,
    stack: RecordedStack,
    delta: list[Tensor],
    targets: list[Tensor],
    retain: bool,
    direct: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...]:
    """The parameter step one block at a time, from the top (a lifecycle that gathers one block's parameters at a
    time): each block's VJP with respect to its own parameters and every side input, plus what its parameters got
    directly from side outputs (``direct``, in the order of ``targets``), then ``take_parameter_grads``; the sums
    over blocks, in the order of ``targets``."""
    lifecycle, s = record.lifecycle, record.stack_index
    position = {id(t): n for n, t in enumerate(targets)}
    others = targets[len(record.params) :]  # side inputs and carried tensors: any block may read them
    totals: list[Tensor | None] = list(direct) + [None] * (len(targets) - len(direct))
    pending = set(range(len(record.params)))  # parameters whose direct term has not been handed to a block yet
    for j in range(len(record.outputs) - 1, -1, -1):
        params = lifecycle.block_parameters(s, [record.stack.layers[i] for i in record.block_layers[j]])
        unknown = [tuple(p.shape) for p in params if id(p) not in position]
        if unknown:
            raise HighwayBPError(
                f"Highway-BP: the parameter lifecycle ({type(lifecycle).__name__}) gives block {j} of "
                f"{record.stack.path} parameters {unknown} that it did not give for the whole stack when the forward "
                "started: block_parameters must return the same tensors for a block alone as within the stack."
            )
        prefetch = [j - 1] if j > 0 else []
        grads = stack.parameter_vjps(delta, params + others, [j], prefetch=prefetch, retain_graph=retain)
        own = []
        for p, g in zip(params, grads[: len(params)]):
            n = position[id(p)]
            if n in pending:  # the side outputs' direct term joins the first block that holds the parameter
                pending.discard(n)
                g, totals[n] = _add(g, totals[n]), None
            own.append(g)
        taken = lifecycle.take_parameter_grads(s, j, params, own)
        if len(taken) != len(params):
            raise HighwayBPError(
                f"Highway-BP: {type(lifecycle).__name__}.take_parameter_grads returned {len(taken)} gradients for "
                f"the {len(params)} parameters of block {j}: it must return one (or None) per parameter, in order."
            )
        for tensor, g in zip(params + others, list(taken) + list(grads[len(params) :])):
            if g is not None:
                totals[position[id(tensor)]] = _add(totals[position[id(tensor)]], g)
    return tuple(totals)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _route_side_outputs(
    record: _StackRecord, extra: list[Tensor | None], wrt: list[Tensor], carried: list[Tensor], gathered
) -> tuple[tuple, tuple]:
    """One VJP of the side outputs that got gradients, with respect to their blocks' inputs, the parameters, the
    side inputs and the carried tensors (a later block's attention map reads the position bias an earlier block
    handed on): e_{j-1} += (ds_j/dh_{j-1})^T g_j; (ds_j/dtheta)^T g_j goes to the parameters and side inputs
    directly, (ds_j/dz)^T g_j to each carried tensor z. Returns (those direct gradients, the carried ones)."""
    indices = sorted(record.side_grads)
    blocks = sorted({record.side_outputs[i][0] for i in indices})
    inputs = [record.inputs[b] for b in blocks]
    wants_input = [b > 0 or record.input_requires_grad for b in blocks]
    targets = [x for x, wanted in zip(inputs, wants_input) if wanted] + wrt + carried
    if not targets:
        return (None,) * len(wrt), (None,) * len(carried)
    with gathered(blocks, [len(record.outputs) - 1]):  # the first input-VJP of the sweeps is the top block's
        grads = torch.autograd.grad(
            [record.side_outputs[i][1] for i in indices],
            targets,
            [record.side_grads[i] for i in indices],
            retain_graph=True,
            allow_unused=True,
        )
    position = 0
    for b, wanted in zip(blocks, wants_input):
        if wanted:
            extra[b] = _add(extra[b], grads[position])
            position += 1
    return grads[position : position + len(wrt)], grads[position + len(wrt) :]


def _route_carried(record: _StackRecord, carried_grads, grads, input_grad, wrt: list[Tensor], gathered) -> tuple:
    """A side output of block b that later blocks read is their side input: it gets sum_j (dg_j/dz)^T delta^(k)_j,
    then ordinary backprop into block b (its parameters; h_0 when b is the first block). Returns the parameter and
    side-input gradients and the stack input's gradient with that added."""
    pairs = [(record.side_outputs[side], g) for (side, _), g in zip(record.carried, carried_grads) if g is not None]
    if not pairs:
        return grads, input_grad
    blocks = sorted({block for (block, _), _ in pairs})
    inputs = [record.inputs[b] for b in blocks if b > 0 or record.input_requires_grad]
    with gathered(blocks, []):
        below = torch.autograd.grad(
            [s for (_, s), _ in pairs], inputs + wrt, [g for _, g in pairs], retain_graph=True, allow_unused=True
        )
    for b, g in zip([b for b in blocks if b > 0 or record.input_requires_grad], below):
        if g is None:
            continue
        if b > 0:
            raise HighwayBPError(
                f"Highway-BP: block {b} of {record.stack.path} returns a tensor that the blocks above it read and "
                "that depends on its hidden state: its gradient would feed the Highway iteration it depends on. "
                "Train this model with ordinary backprop (unpatch_model(model))."
            )
        input_grad = _add(input_grad, g)
    return tuple(_add(a, b) for a, b in zip(grads, below[len(inputs) :])), input_grad


def _refuse_unrouted(record: _StackRecord) -> None:
    """A gradient in a block-input or side-input leaf came through a block's graph outside Highway-BP."""
    for position, leaf in enumerate(record.inputs[1:] + record.side_leaves + [z for _, z in record.carried]):
        if leaf.grad is not None:
            where = (
                f"the input of block {position + 1} of {record.stack.path}"
                if position < len(record.inputs) - 1
                else f"a side input of {record.stack.path}"
            )
            raise HighwayBPError(
                f"Highway-BP: a gradient reached {where} through a block's graph, outside the Highway backward: "
                "the loss reads a tensor computed inside a layer that Highway-BP does not route (it routes the "
                "layer output, hidden states, and what transformers' output capturing collects: attentions, "
                "router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            )
