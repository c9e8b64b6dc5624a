r"""Puts the Highway-BP engine under a model's residual stacks with forward hooks; patch and unpatch.

During a training forward (gradients enabled, some layer of the stack in training mode) the hooks cut the
stack's autograd graph at every block boundary and route it through small autograd Functions:

    h_0 -> block 1 -> y_1 --_BlockExit--> h_1 ~> leaf x_1 -> block 2 -> ... --_BlockExit--> h_L -> head
     \--_StackEntry(h_0, *params, *side inputs)--> token_0 --> token_1 --> ... --> token_L

Block 1 reads h_0 through ``_StackInput`` (an alias that the Highway backward never crosses) and block j >= 2
a fresh leaf x_{j-1} holding h_{j-1}'s value, so each block's local graph ends at its own input, its parameters
and its side inputs (tensors that require grad read besides the hidden state; each is replaced by a leaf).
``_BlockExit`` hands on the value of y_j with no edge into block j's graph and stores the gradient that
reaches h_j (d for the last block, e_j for the others); ``_SideExit`` does the same for side outputs (tensors
computed inside a block that the loss may read: attention maps, router logits). ``_StackEntry`` returns only a
scalar token; the token chain makes autograd call every exit before the entry. The entry's backward runs the
engine on the recorded local graphs (after one VJP of the side outputs, which adds to the e_j and to the
parameter gradients as docs/algorithm.md defines) and returns delta^(k)_0, the parameter gradients and the side
input gradients as ordinary autograd outputs: AccumulateGrad, DDP reducer hooks, GradScaler and gradient
accumulation see them as usual, and ordinary backprop carries them below the stack.

Ownership: what one training forward records (``_StackRecord``) is held by that forward's autograd graph (the
entry and exit nodes), never by the patch. Several training forwards can wait for one backward; a forward run
without gradients or in eval mode touches nothing; the memory of a forward is released exactly when autograd
releases its graph (after its backward, or when the loss is dropped). The patch itself holds settings, hooks
and, only while a stack's forward runs, that forward's bookkeeping; it deep-copies and pickles with the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import routing
from .config import HighwayConfig
from .discovery import Stack
from .engine import highway_backward

_ATTR = "_hwbp_patch"


# ----- autograd Functions ---------------------------------------------------------------------------------------
class _EngineFlag:
    """Set while Highway-BP itself backpropagates through a record's local graphs (holds no tensor)."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
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
        grads = _run_backward(record)
        if not record.retained:
            ctx.record = None
        return (None,) + grads


class _BlockExit(torch.autograd.Function):
    """Hands on a block's output value, cut from its graph; stores the gradient that reaches it."""

    @staticmethod
    def forward(ctx, record, index: int, value: Tensor, token: Tensor):
        ctx.record, ctx.index = record, index
        ctx.set_materialize_grads(False)
        return value, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, grad_token):
        _refuse_double_backward()
        if grad is not None:
            ctx.record.output_grads[ctx.index] = grad
        return None, None, None, _token_grad(ctx.record)


class _SideExit(torch.autograd.Function):
    """Hands on a side output's value, cut from its block's graph; stores the gradient the loss sends it."""

    @staticmethod
    def forward(ctx, record, index: int, value: Tensor, token: Tensor):
        ctx.record, ctx.index = record, index
        ctx.set_materialize_grads(False)
        return value, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, grad_token):
        _refuse_double_backward()
        if grad is not None:
            ctx.record.side_grads[ctx.index] = grad
        return None, None, None, _token_grad(ctx.record)


def _token_grad(record) -> Tensor:
    return torch.zeros((), dtype=record.token_dtype, device=record.token_device)


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
            raise RuntimeError(
                f"Highway-BP: the loss reads the hidden state after layer {ctx.layer_index}, which lies inside a "
                "group of layers (group_size > 1). Only hidden states at group boundaries can carry a loss: use "
                "group_size=1, or leave that hidden state out of the loss."
            )
        return None, None, grad


# ----- what one forward leaves for its backward ----------------------------------------------------------------
@dataclass(eq=False)
class _StackRecord:
    """One training forward of one stack. Held by its autograd graph (entry and exits), never by the patch."""

    patch: HighwayPatch
    stack: Stack
    config: HighwayConfig  # the settings of this forward
    first_layer: int  # layers below it were frozen and fed nothing that requires grad: they are not recorded
    num_blocks: int
    flag: _EngineFlag
    params: list[Tensor]
    side_leaves: list[Tensor]
    input_requires_grad: bool
    token_dtype: torch.dtype
    token_device: torch.device
    inputs: list[Tensor] = field(default_factory=list)  # x_{j-1} of each block, as its local graph sees it
    outputs: list[Tensor] = field(default_factory=list)  # y_j, attached to block j's local graph
    output_grads: dict[int, Tensor] = field(default_factory=dict)  # block -> gradient reaching its output
    side_outputs: list[tuple[int, Tensor]] = field(default_factory=list)  # (block, tensor in its local graph)
    side_grads: dict[int, Tensor] = field(default_factory=dict)  # side output -> gradient the loss sent it
    carried: list[tuple[int, Tensor]] = field(default_factory=list)  # (side output, the leaf later blocks read)
    retained: bool = False  # the last backward ran with retain_graph=True: the graphs are kept for the next one


@dataclass(eq=False)
class _StackForward:
    """Bookkeeping of the forward a stack is running now; held by the patch until the stack's last layer ran."""

    next_layer: int = 0
    record: _StackRecord | None = None
    token: Tensor | None = None
    last_exit: Tensor | None = None
    leaf_of: dict[int, Tensor] = field(default_factory=dict)  # id(side input) -> the leaf blocks read instead
    originals: list[Tensor] = field(default_factory=list)  # keeps those ids valid while the forward runs
    cut_of: dict[int, int] = field(default_factory=dict)  # id(cut side output) -> its index in the record
    leaf_ids: set[int] = field(default_factory=set)  # ids of the side-input and carried leaves
    marks: dict[str, int] | None = None  # collector sizes before the running layer
    block_starts: list[int] = field(default_factory=list)  # autograd sequence number where each block began
    rng_state: tuple[torch.device, Tensor] | None = None  # checkpointed without preserving the RNG


def _keep_graph() -> bool:
    """Whether the backward running now was asked to retain the graph (``retain_graph=True``)."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(getter()) if getter is not None else False


def _run_backward(record: _StackRecord) -> tuple:
    """Highway-BP(k) of one recorded stack forward: (grad of h_0, *grads of params, *grads of side inputs)."""
    _refuse_double_backward()
    stack = record.stack
    if len(record.outputs) != record.num_blocks:
        raise RuntimeError(
            f"Highway-BP: the training forward ran {len(record.outputs)} of the {record.num_blocks} blocks of "
            f"{stack.path}. Highway-BP needs the whole stack in every training forward."
        )
    _refuse_unrouted(record)
    keep = _keep_graph()
    wrt = record.params + record.side_leaves
    last = len(record.outputs) - 1
    d = record.output_grads.get(last)
    if d is None:
        d = torch.zeros_like(record.outputs[last])
    # e_j for j = 1..L-1 arrive at the block outputs; e_0 (a loss on h_0 itself) reaches h_0 through autograd.
    extra: list[Tensor | None] = [None] + [record.output_grads.get(j) for j in range(last)]
    direct: tuple[Tensor | None, ...] = (None,) * len(wrt)
    config = record.config
    record.flag.active = True
    try:
        if record.side_grads:
            direct = _route_side_outputs(record, extra, wrt)
        if keep or record.carried:
            # The next backward needs the local graphs again, or carried tensors need them after the parameter VJP:
            # run that VJP here, retaining the graphs.
            result = highway_backward(
                record.inputs,
                record.outputs,
                [],
                d,
                extra,
                k=config.k,
                tol=config.tol,
                need_input_grad=record.input_requires_grad,
                keep_block_grads=True,
            )
            carried = [leaf for _, leaf in record.carried]
            grads = (
                torch.autograd.grad(
                    record.outputs, wrt + carried, result.block_grads, retain_graph=True, allow_unused=True
                )
                if wrt or carried
                else ()
            )
            if carried:
                grads, result.input_grad = _route_carried(record, grads[len(wrt) :], grads[: len(wrt)], result, wrt)
            if not record.patch.keep_block_grads:
                result.block_grads = None
        else:
            result = highway_backward(
                record.inputs,
                record.outputs,
                wrt,
                d,
                extra,
                k=config.k,
                tol=config.tol,
                need_input_grad=record.input_requires_grad,
                keep_block_grads=record.patch.keep_block_grads,
            )
            grads = result.param_grads
    except RuntimeError as err:
        if "backward through the graph a second time" in str(err):
            raise RuntimeError(
                f"Highway-BP: the graph of a block of {stack.path} was already consumed when the Highway backward "
                "started: the loss reads a tensor computed inside a layer by a path Highway-BP does not route "
                "(it routes the layer output, hidden states, and what transformers' output capturing collects: "
                "attentions, router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            ) from err
        raise
    finally:
        record.flag.active = False
    grads = tuple(_add(g, extra_g) for g, extra_g in zip(grads, direct))
    record.patch._note_backward(result.iterations, result.block_grads)
    record.retained = keep
    record.output_grads.clear()
    record.side_grads.clear()
    if not keep:  # nothing of this forward outlives its backward, even while the caller keeps the loss
        held_lists = (record.inputs, record.outputs, record.side_outputs, record.params, record.side_leaves)
        for held in held_lists + (record.carried,):
            held.clear()
    return (result.input_grad,) + grads


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _route_side_outputs(record: _StackRecord, extra: list[Tensor | None], wrt: list[Tensor]) -> tuple:
    """One VJP of the side outputs that got gradients, with respect to their blocks' inputs, the parameters and the
    side inputs: e_{j-1} += (ds_j/dh_{j-1})^T g_j, and (ds_j/dtheta)^T g_j goes to the parameters directly."""
    indices = sorted(record.side_grads)
    blocks = sorted({record.side_outputs[i][0] for i in indices})
    inputs = [record.inputs[b] for b in blocks]
    wants_input = [b > 0 or record.input_requires_grad for b in blocks]
    targets = [x for x, wanted in zip(inputs, wants_input) if wanted] + wrt
    if not targets:
        return (None,) * len(wrt)
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
    return grads[position:]


def _route_carried(record: _StackRecord, carried_grads, grads, result, wrt: list[Tensor]) -> tuple:
    """A side output of block b that later blocks read is their side input: it gets sum_j (dg_j/dz)^T delta^(k)_j,
    then ordinary backprop into block b (its parameters; h_0 when b is the first block). Returns the parameter and
    side-input gradients and the stack input's gradient with that added."""
    pairs = [(record.side_outputs[side], g) for (side, _), g in zip(record.carried, carried_grads) if g is not None]
    if not pairs:
        return grads, result.input_grad
    blocks = sorted({block for (block, _), _ in pairs})
    inputs = [record.inputs[b] for b in blocks if b > 0 or record.input_requires_grad]
    below = torch.autograd.grad(
        [s for (_, s), _ in pairs], inputs + wrt, [g for _, g in pairs], retain_graph=True, allow_unused=True
    )
    input_grad = result.input_grad
    for b, g in zip([b for b in blocks if b > 0 or record.input_requires_grad], below):
        if g is None:
            continue
        if b > 0:
            raise RuntimeError(
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
            raise RuntimeError(
                f"Highway-BP: a gradient reached {where} through a block's graph, outside the Highway backward: "
                "the loss reads a tensor computed inside a layer that Highway-BP does not route (it routes the "
                "layer output, hidden states, and what transformers' output capturing collects: attentions, "
                "router logits). Compute the loss from those, or train this step with "
                "`with hf_hwbp.exact_backprop(model):`."
            )


# ----- hooks ---------------------------------------------------------------------------------------------------
class _PreHook:
    """Forward pre-hook of one layer. A small class, not a closure: a deep copy of the model gets hooks that point
    to the copy's patch, and the hooks pickle."""

    def __init__(self, patch: HighwayPatch, stack_index: int, layer_index: int):
        self.patch, self.stack_index, self.layer_index = patch, stack_index, layer_index

    # Hooks always run eagerly: under torch.compile the graph breaks at block boundaries, where they cut it anyway.
    @torch._dynamo.disable
    def __call__(self, module, args, kwargs):
        return self.patch._before_layer(self.stack_index, self.layer_index, module, args, kwargs)


class _PostHook(_PreHook):
    """Forward hook of one layer (see ``_PreHook``)."""

    @torch._dynamo.disable
    def __call__(self, module, args, output):
        return self.patch._after_layer(self.stack_index, self.layer_index, output)


def _checkpoint_kwargs(layer: nn.Module) -> dict | None:
    """The keyword arguments of a transformers layer's checkpointing (None when it does not checkpoint)."""
    if not getattr(layer, "gradient_checkpointing", False):
        return None
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return dict(func.keywords) if isinstance(func, functools.partial) else {}


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


# ----- the patch -----------------------------------------------------------------------------------------------
class HighwayPatch:
    """The Highway-BP state of one patched model: its stacks, settings and hooks.

    Read or change the settings between steps through ``config`` (or ``hf_hwbp.set_highway_k``); ``stacks`` says
    what discovery found; ``last_iterations`` is the number of Highway iterations the last backward ran (the
    largest over its stacks and forwards); ``recorded_forwards`` counts the stack forwards recorded so far.
    """

    def __init__(self, stacks: list[Stack], config: HighwayConfig, model_type: str | None = None):
        if not stacks:
            raise ValueError("Highway-BP needs at least one stack of layers.")
        self.stacks = list(stacks)
        self.config = config
        self.model_type = model_type
        self.enabled = True
        self.last_iterations: int | None = None
        self.last_block_grads: list[Tensor] | None = None
        self.keep_block_grads = False
        self.recorded_forwards = 0  # stack forwards recorded for Highway-BP (one per stack per training forward)
        self._forwards: list[_StackForward | None] = [None] * len(self.stacks)
        self._graph_checked = [False] * len(self.stacks)
        self._last_task: int | None = None
        self._handles: list = []
        for s, stack in enumerate(self.stacks):
            for i, layer in enumerate(stack.layers):
                self._handles.append(
                    layer.register_forward_pre_hook(_PreHook(self, s, i), with_kwargs=True, prepend=True)
                )
                self._handles.append(layer.register_forward_hook(_PostHook(self, s, i), prepend=True))

    # A copy (deepcopy, pickle) keeps settings and hooks, and starts with no forward running.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_forwards"] = [None] * len(self.stacks)
        state["_last_task"] = None
        return state

    # ----- layout -----------------------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The layers of the first stack (the only one for most models)."""
        return self.stacks[0].layers

    @property
    def num_layers(self) -> int:
        return sum(len(s) for s in self.stacks)

    def _blocks_of(self, stack: Stack) -> int:
        g = self.config.group_size
        return (len(stack) + g - 1) // g

    @property
    def num_blocks(self) -> int:
        """Highway blocks (groups of ``group_size`` layers) of the deepest stack: k >= this is exact everywhere."""
        return max(self._blocks_of(s) for s in self.stacks)

    @property
    def effective_k(self) -> int:
        """k clamped to the number of blocks (iterations past it change nothing)."""
        return min(self.config.k, self.num_blocks)

    def block_parameters(self) -> list[list[Tensor]]:
        """The trainable parameters of each Highway block (group of layers), stack by stack, bottom to top."""
        g = self.config.group_size
        blocks: list[list[Tensor]] = []
        for stack in self.stacks:
            for start in range(0, len(stack), g):
                blocks.append(_trainable(stack.layers[start : start + g]))
        return blocks

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forwards = [None] * len(self.stacks)

    def _note_backward(self, iterations: int, block_grads: list[Tensor] | None) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._last_task or self.last_iterations is None:
            self.last_iterations = iterations
        else:
            self.last_iterations = max(self.last_iterations, iterations)
        self._last_task = task
        self.last_block_grads = block_grads

    # ----- forward ----------------------------------------------------------------------------------------------
    def _trains(self, stack: Stack) -> bool:
        """Whether a forward of this stack starting now is a Highway training forward."""
        return (
            self.enabled
            and torch.is_grad_enabled()
            and torch._C._current_graph_task_id() == -1  # not a recomputation inside a backward
            and any(layer.training for layer in stack.layers)
        )

    def _before_layer(self, s: int, i: int, module: nn.Module, args: tuple, kwargs: dict):
        stack = self.stacks[s]
        if i == 0:
            if not self._trains(stack):
                return None  # a forward that does not train touches nothing
            self._check_forward(stack)
            fwd = self._forwards[s] = _StackForward()
        else:
            fwd = self._forwards[s]
            if fwd is None or fwd.next_layer != i:
                if not self._trains(stack):
                    return None
                raise RuntimeError(
                    f"Highway-BP: layer {i} of {stack.path} ran in a training forward right after layer "
                    f"{i - 2 if fwd is None else fwd.next_layer - 1}, not layer {i - 1}. Highway-BP needs every "
                    "training forward to run the whole stack in order (no LayerDrop: set the model's layerdrop "
                    "to 0); or call unpatch_model(model)."
                )
        if module is not stack.layers[i]:
            raise RuntimeError(
                f"Highway-BP: a copy of layer {i} of {stack.path} ran with the original's hooks (nn.DataParallel "
                "replicates modules this way). Use DistributedDataParallel (one process per device) instead."
            )
        fwd.next_layer = i + 1
        hidden = routing.split_hidden(args, kwargs)
        checkpointing = _checkpoint_kwargs(module)
        if checkpointing is not None and checkpointing.get("preserve_rng_state") is False:
            fwd.rng_state = (hidden.device, _rng_state(hidden.device))
        fwd.marks = routing.collector_marks(routing.collector())
        record = fwd.record
        if record is None:
            return self._maybe_start(s, i, fwd, hidden, args, kwargs)
        args, kwargs = routing.swap_tensors(
            args, kwargs, functools.partial(self._known_leaf, fwd, i, module), deep=False
        )
        if self._block_start(record, i):
            if hidden is not fwd.last_exit:
                raise RuntimeError(
                    f"Highway-BP: layer {i} of {stack.path} did not receive the output of layer {i - 1} unchanged. "
                    "Highway-BP supports stacks whose layers feed each other directly; pass layers=<ModuleList> of "
                    "such a stack, or call unpatch_model(model)."
                )
            leaf = hidden.detach().requires_grad_(True)
            record.inputs.append(leaf)
            fwd.block_starts.append(torch._C._autograd._get_sequence_nr())
            return routing.with_hidden(args, kwargs, leaf)
        return args, kwargs

    def _maybe_start(self, s: int, i: int, fwd: _StackForward, hidden: Tensor, args: tuple, kwargs: dict):
        """Start recording at the first layer whose block has something to train (or feeds something that does)."""
        stack = self.stacks[s]
        found: list[tuple[str, Tensor]] = []

        def collect(name: str, tensor: Tensor) -> Tensor:
            found.append((name, tensor))
            return tensor

        routing.swap_tensors(args, kwargs, collect, deep=True)
        g = self.config.group_size
        block_end = min((i // g + 1) * g, len(stack))
        params = _trainable(stack.layers[i:])
        if not (hidden.requires_grad or found or _trainable(stack.layers[i:block_end])):
            return None  # frozen, and nothing below needs a gradient: the layer runs as it would unpatched
        flag = _EngineFlag()
        originals = list({id(tensor): tensor for _, tensor in found}.values())
        for tensor in originals:
            if id(tensor) not in fwd.leaf_of:
                fwd.leaf_of[id(tensor)] = _leaf(fwd, tensor)
        fwd.originals.extend(originals)
        num_blocks = sum(1 for j in range(i, len(stack)) if j % g == g - 1 or j == len(stack) - 1)
        record = _StackRecord(
            patch=self,
            stack=stack,
            config=self.config.updated(),
            first_layer=i,
            num_blocks=num_blocks,
            flag=flag,
            params=params,
            side_leaves=[fwd.leaf_of[id(t)] for t in originals],
            input_requires_grad=hidden.requires_grad,
            token_dtype=hidden.dtype,
            token_device=hidden.device,
        )
        fwd.token = _StackEntry.apply(record, hidden, *params, *originals)
        fwd.record = record
        self.recorded_forwards += 1
        args, kwargs = routing.swap_tensors(args, kwargs, lambda _, t: fwd.leaf_of.get(id(t), t), deep=True)
        x0 = _StackInput.apply(flag, hidden) if hidden.requires_grad else hidden
        record.inputs.append(x0)
        fwd.block_starts.append(torch._C._autograd._get_sequence_nr())
        return routing.with_hidden(args, kwargs, x0)

    def _known_leaf(self, fwd: _StackForward, i: int, module: nn.Module, name: str, tensor: Tensor) -> Tensor:
        leaf = fwd.leaf_of.get(id(tensor))
        if leaf is not None:
            return leaf
        if id(tensor) in fwd.leaf_ids:
            return tensor
        side = fwd.cut_of.get(id(tensor))
        if side is not None:  # a side output of an earlier block that later blocks read (T5's position bias)
            block, original = fwd.record.side_outputs[side]
            if block > 0 and _reaches(original, fwd.record.inputs[block]):
                raise RuntimeError(
                    f"Highway-BP: layer {i} of {fwd.record.stack.path} reads a tensor that an earlier layer returned "
                    f"and that depends on that layer's hidden state "
                    f"(`{routing.argument_name(module, name)}`): its gradient would feed the Highway iteration it "
                    "depends on. Train this model with ordinary backprop (unpatch_model(model))."
                )
            leaf = fwd.leaf_of[id(tensor)] = _leaf(fwd, tensor)
            fwd.record.carried.append((side, leaf))
            return leaf
        argument = routing.argument_name(module, name)
        raise RuntimeError(
            f"Highway-BP: layer {i} of {fwd.record.stack.path} receives `{argument}`, a tensor that requires grad that "
            f"layer {fwd.record.first_layer} did not receive and that no earlier layer returned. Highway-BP routes "
            "the side inputs that the stack's first layer receives too (encoder states, prefix keys and values, "
            "parameters passed in) and the tensors a layer returns for the next ones (T5's position bias). Train "
            "this model with ordinary backprop (unpatch_model(model)), or pass that tensor to every layer."
        )

    def _after_layer(self, s: int, i: int, output):
        fwd = self._forwards[s]
        if fwd is None or fwd.next_layer != i + 1:
            return None
        stack = self.stacks[s]
        last_layer = i == len(stack) - 1
        if last_layer:
            self._forwards[s] = None  # the patch keeps nothing of a forward past its stack
        if fwd.rng_state is not None:
            self._check_rng(stack, i, fwd)
        record = fwd.record
        if record is None:
            return None
        hidden = routing.output_hidden(output)
        if not hidden.requires_grad and not record.outputs and self._block_end(record, i):
            fwd.record = fwd.token = None  # its trainable parameters did not take part: still the frozen prefix
            self.recorded_forwards -= 1
            return None
        output = self._cut_side_outputs(record, fwd, output)
        if not self._block_end(record, i):
            return routing.with_output_hidden(output, _GroupInnerGuard.apply(record.flag, i, hidden))
        index = len(record.outputs)
        record.outputs.append(hidden)
        exit_hidden, fwd.token = _BlockExit.apply(record, index, hidden.detach(), fwd.token)
        fwd.last_exit = exit_hidden
        if last_layer and not self._graph_checked[s]:
            self._check_local_graphs(s, record, fwd)
        return routing.with_output_hidden(output, exit_hidden)

    def _cut_side_outputs(self, record: _StackRecord, fwd: _StackForward, output):
        block = len(record.outputs)
        replaced = {}
        for position, tensor in routing.output_extras(output):
            if id(tensor) not in fwd.leaf_ids:  # a side input handed on unchanged is not a side output
                replaced[position] = self._side_exit(record, fwd, block, tensor)
        for values, position, tensor in routing.new_collected(routing.collector(), fwd.marks):
            values[position] = self._side_exit(record, fwd, block, tensor)
        return routing.with_output_extras(output, replaced) if replaced else output

    @staticmethod
    def _side_exit(record: _StackRecord, fwd: _StackForward, block: int, tensor: Tensor) -> Tensor:
        record.side_outputs.append((block, tensor))
        cut, fwd.token = _SideExit.apply(record, len(record.side_outputs) - 1, tensor.detach(), fwd.token)
        fwd.cut_of[id(cut)] = len(record.side_outputs) - 1
        fwd.originals.append(cut)
        return cut

    def _block_start(self, record: _StackRecord, i: int) -> bool:
        return i % self.config.group_size == 0 or i == record.first_layer

    def _block_end(self, record: _StackRecord, i: int) -> bool:
        g = self.config.group_size
        return i % g == g - 1 or i == len(record.stack) - 1

    # ----- checks -----------------------------------------------------------------------------------------------
    def _check_forward(self, stack: Stack) -> None:
        for layer in stack.layers:
            kwargs = _checkpoint_kwargs(layer)
            if kwargs is not None and kwargs.get("use_reentrant") is not False:
                raise RuntimeError(
                    "Highway-BP supports activation checkpointing only in its non-reentrant form (each Highway "
                    "iteration then recomputes the layer, as backprop's single sweep does): reentrant checkpointing "
                    "accumulates parameter gradients behind autograd's back. Call "
                    "model.activation_checkpointing_enable() (non-reentrant by default), or "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}); "
                    "or model.activation_checkpointing_disable()."
                )

    def _check_rng(self, stack: Stack, i: int, fwd: _StackForward) -> None:
        (device, before), fwd.rng_state = fwd.rng_state, None
        if not torch.equal(before, _rng_state(device)):
            raise RuntimeError(
                f"Highway-BP: layer {i} of {stack.path} draws random numbers (dropout) and is checkpointed with "
                "preserve_rng_state=False: each of the k + 1 Highway sweeps would recompute it with new dropout "
                "masks, none of them the forward's. Keep preserve_rng_state=True (the default) in the "
                "checkpointing kwargs, or turn dropout off."
            )

    def _check_local_graphs(self, s: int, record: _StackRecord, fwd: _StackForward) -> None:
        """Once per stack: no block reads, without receiving it as an argument, a tensor that requires grad from
        outside its layers (its gradient would be lost). Walks the recorded local graphs."""
        stack = self.stacks[s]
        allowed = {id(p) for layer in stack.layers for p in layer.parameters()}
        allowed |= {id(x) for x in record.inputs[1:]} | {id(z) for z in record.side_leaves}
        allowed |= {id(z) for _, z in record.carried}
        stops = {id(record.inputs[0].grad_fn)} if record.inputs[0].grad_fn is not None else set()
        for block, (output, start) in enumerate(zip(record.outputs, fwd.block_starts)):
            pending, seen = [output.grad_fn], {}
            while pending:
                node = pending.pop()
                if node is None or id(node) in seen or id(node) in stops:
                    continue
                seen[id(node)] = node  # holding the node keeps its id unique during the walk
                variable = getattr(node, "variable", None)
                if variable is not None:
                    if id(variable) not in allowed and isinstance(variable, nn.Parameter):
                        raise RuntimeError(
                            f"Highway-BP: block {block} of {stack.path} reads a parameter "
                            f"({tuple(variable.shape)}) that is neither one of its layers' parameters nor passed to "
                            "it as an argument, so its gradient cannot be routed. Pass it to the layer as an "
                            "argument, or register it in the layer; or call unpatch_model(model)."
                        )
                    continue
                if node._sequence_nr() < start:
                    raise RuntimeError(
                        f"Highway-BP: block {block} of {stack.path} reads a tensor that requires grad, computed "
                        f"outside its layers ({node.name()}), without receiving it as an argument, so its gradient "
                        "cannot be routed. Pass it to the layer as an argument; or call unpatch_model(model)."
                    )
                pending.extend(fn for fn, _ in node.next_functions)
        self._graph_checked[s] = True


def _reaches(tensor: Tensor, leaf: Tensor) -> bool:
    """Whether ``tensor``'s autograd graph reaches the leaf ``leaf``."""
    pending, seen = [tensor.grad_fn], {}
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if getattr(node, "variable", None) is leaf:
            return True
        pending.extend(fn for fn, _ in node.next_functions)
    return False


def _leaf(fwd: _StackForward, tensor: Tensor) -> Tensor:
    """The leaf that blocks read in place of a side input (or of a carried side output)."""
    leaf = tensor.detach().requires_grad_(True)
    fwd.leaf_ids.add(id(leaf))
    return leaf


def _trainable(layers) -> list[Tensor]:
    seen: dict[int, Tensor] = {}
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def get_patch(model: nn.Module) -> HighwayPatch | None:
    return getattr(model, _ATTR, None)
