r"""Puts the Highway-BP engine under a model's residual stacks with forward hooks; patch and unpatch.

During a training forward (gradients enabled, some layer of the stack in training mode) the hooks cut the
stack's autograd graph at every block boundary and route it through small autograd Functions:

    h_0 -> block 1 -> y_1 --_Exit--> h_1 ~> leaf x_1 -> block 2 -> ... --_Exit--> h_L -> head
     \--_StackEntry(h_0, *params, *side inputs)--> token_0 --> token_1 --> ... --> token_L

Block 1 reads h_0 through ``_StackInput`` (an alias that the Highway backward never crosses) and block j >= 2
a fresh leaf x_{j-1} holding h_{j-1}'s value, so each block's local graph ends at its own input, its parameters
and its side inputs (tensors that require grad read besides the hidden state; each is replaced by a leaf).
``_Exit`` hands on the value of y_j with no edge into block j's graph and stores the gradient that reaches h_j
(d for the last block, e_j for the others); it does the same for side outputs (tensors computed inside a block
that the loss may read: attention maps, router logits). ``_StackEntry`` returns only a
scalar token; the token chain makes autograd call every exit before the entry. The entry's backward
(``record.py``) runs the engine on the recorded local graphs (after one VJP of the side outputs, which adds to
the e_j and to the parameter gradients as docs/algorithm.md defines) and returns delta^(k)_0, the parameter
gradients and the side input gradients as ordinary autograd outputs: AccumulateGrad, DDP reducer hooks,
GradScaler and gradient accumulation see them as usual, and ordinary backprop carries them below the stack.

Ownership: what one training forward records (``_StackRecord``) is held by that forward's autograd graph (the
entry and exit nodes), never by the patch. Several training forwards can wait for one backward; a forward run
without gradients or in eval mode touches nothing; the memory of a forward is released exactly when autograd
releases its graph (after its backward, or when the loss is dropped). The patch itself holds settings, hooks
and, only while a stack's forward runs, that forward's bookkeeping; it deep-copies and pickles with the model.

What is checked in the forward, before any gradient exists (docs/algorithm.md, "What is a residual stack"): each
layer keeps the hidden state's shape (a list whose first layer does not, such as a convolutional feature encoder,
is let go and trains with ordinary backprop), receives the output of the layer run before it, and runs once per
forward of the model. Layers that LayerDrop skipped are left out of that forward's stack. Steps whose k reaches
the number of blocks run the model's own backward (the same gradient, at backprop's cost).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.utils import logging

from . import routing, sharding
from .config import HighwayConfig
from .discovery import Stack, describe
from .errors import HighwayBPError, UnsupportedModelError
from .record import (
    IterationLog,
    _EngineFlag,
    _Exit,
    _GroupInnerGuard,
    _StackEntry,
    _StackInput,
    _StackRecord,
)

logger = logging.get_logger(__name__)

# The default of ``HighwayPatch.exact_steps_by_autograd``: exact steps run the model's own backward.
EXACT_STEPS_BY_AUTOGRAD = True

_ATTR = "_hwbp_patch"


@dataclass(eq=False)
class _StackForward:
    """Bookkeeping of the forward a stack is running now; held by the patch until the stack's last layer ran."""

    next_layer: int = 0
    active: bool = False  # recorded for Highway-BP (a training forward that is not an exact step)
    input_shape: tuple | None = None  # (shape, dtype) of the running layer's hidden state
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


class _RootHook:
    """Forward pre-hook (+1) and hook (-1) of the patched model: which of its forwards a stack runs in (a stack run
    twice in one forward is refused), and whether a training forward ran any layer of a stack through its hooks."""

    def __init__(self, patch: HighwayPatch, step: int):
        self.patch, self.step = patch, step

    @torch._dynamo.disable
    def __call__(self, module, *_):
        patch = self.patch
        if self.step > 0 and patch._root_depth == 0:
            patch._root_trains = False
            if module.training and patch._in_training_forward():
                sharding.connect(module, patch)  # may refuse the set-up: nothing of this forward has started yet
                patch._root_trains = patch.enabled
            patch._root_calls += 1
            patch._root_saw_layer = False
        patch._root_depth = max(0, patch._root_depth + self.step)
        if patch._root_depth == 0:  # a stack whose last layers LayerDrop skipped ends with the model's forward
            patch._forwards = [None] * len(patch._forwards)
            if self.step < 0 and patch._root_trains and not patch._root_saw_layer and patch.stacks:
                raise HighwayBPError(
                    f"Highway-BP: a training forward of {type(module).__name__} ran no layer of "
                    f"{describe(patch.stacks)} through its module call (a model that calls layer.forward() directly "
                    "bypasses the hooks Highway-BP needs), so Highway-BP would silently not apply. Train this model "
                    "with ordinary backprop (unpatch_model(model)), or pass layers= with modules the model calls."
                )


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
    what discovery found (less any list the first training forward showed is not a residual stack);
    ``last_iterations`` is the number of Highway iterations the last backward ran (the largest over its stacks and
    forwards; None when the last training step ran none); ``recorded_forwards`` counts the stack forwards recorded.

    ``exact_steps_by_autograd`` (default True): a stack whose k reaches its number of blocks (with no ``tol``) is
    trained with the model's own backward, the same gradient as Highway-BP(k = L) at backprop's cost; False runs
    the Highway engine for it (the tests do, to check the engine's exactness against autograd).

    For engines that shard parameters (FSDP2, ZeRO-3; ``hf_hwbp.sharding``): ``lifecycle`` (the
    ``ParameterLifecycle`` the Highway backward gathers parameters through), ``hooked_stacks`` (the stacks as the
    lifecycle's ``stack_index`` counts them), ``is_recording(stack_index)`` and ``reinstall_hooks()``.
    """

    def __init__(
        self, stacks: list[Stack], config: HighwayConfig, model_type: str | None = None, root: nn.Module | None = None
    ):
        if not stacks:
            raise ValueError("Highway-BP needs at least one stack of layers.")
        self._stacks = list(stacks)
        self.config = config
        self.model_type = model_type
        self.enabled = True
        self.log = IterationLog()
        self.keep_block_grads = False
        self.exact_steps_by_autograd = EXACT_STEPS_BY_AUTOGRAD
        self.recorded_forwards = 0  # stack forwards recorded for Highway-BP (one per stack per training forward)
        self._rejected: dict[int, str] = {}  # stack index -> why its first training forward showed it is no stack
        self._forwards: list[_StackForward | None] = [None] * len(self._stacks)
        self._graph_checked = [False] * len(self._stacks)
        self._root_calls = 0  # forwards of the patched model (its outermost call)
        self._root_depth = 0  # > 0 while the patched model's forward runs
        self._run_roots: list[int | None] = [None] * len(self._stacks)  # the model forward of each stack's last run
        self._root_trains = False  # the running forward of the patched model is a training forward
        self._root_saw_layer = False  # ... and has run a layer of a stack through its hooks
        self._warned_eval = False
        self._lifecycle = sharding.ParameterLifecycle()
        self._root = root
        self._handles: list = []
        self._install_hooks()

    def _install_hooks(self) -> None:
        """The layers' hooks and the root's, each in front of the hooks already there."""
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                self._handles.append(
                    layer.register_forward_pre_hook(_PreHook(self, s, i), with_kwargs=True, prepend=True)
                )
                self._handles.append(layer.register_forward_hook(_PostHook(self, s, i), prepend=True))
        if self._root is not None:
            self._handles.append(self._root.register_forward_pre_hook(_RootHook(self, +1), prepend=True))
            self._handles.append(self._root.register_forward_hook(_RootHook(self, -1), always_call=True))

    # A copy (deepcopy, pickle) keeps settings and hooks, and starts with no forward running.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_forwards"] = [None] * len(self._stacks)
        state["_root_depth"] = 0
        return state

    # ----- layout -----------------------------------------------------------------------------------------------
    @property
    def stacks(self) -> list[Stack]:
        """The residual stacks Highway-BP runs on, in forward order."""
        return [stack for s, stack in enumerate(self._stacks) if s not in self._rejected]

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
        return max((self._blocks_of(s) for s in self.stacks), default=0)

    @property
    def effective_k(self) -> int:
        """k clamped to the number of blocks (iterations past it change nothing)."""
        return min(self.config.k, self.num_blocks)

    @property
    def last_iterations(self) -> int | None:
        return self.log.last

    @last_iterations.setter
    def last_iterations(self, value: int | None) -> None:
        self.log.last = value

    @property
    def last_block_grads(self) -> list[Tensor] | None:
        """delta^(k)_1..L of the last stack backward (kept only while ``keep_block_grads`` is set)."""
        return self.log.block_grads

    def block_parameters(self) -> list[list[Tensor]]:
        """The trainable parameters of each Highway block (group of layers), stack by stack, bottom to top."""
        g = self.config.group_size
        blocks: list[list[Tensor]] = []
        for stack in self.stacks:
            for start in range(0, len(stack), g):
                blocks.append(_trainable(stack.layers[start : start + g]))
        return blocks

    def remove(self) -> None:
        """Remove the hooks; the model runs as it would unpatched. Resets ``lifecycle``."""
        self._remove_hooks()
        self._forwards = [None] * len(self._stacks)
        self._lifecycle = sharding.ParameterLifecycle()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ----- the seam for engines that shard parameters (hf_hwbp.sharding) ---------------------------------------
    @property
    def lifecycle(self) -> sharding.ParameterLifecycle:
        """How the Highway backward gathers the blocks' parameters and hands on their gradients (default: ordinary
        tensors, nothing to do). Read by each training forward when it starts recording a stack."""
        return self._lifecycle

    @lifecycle.setter
    def lifecycle(self, value: sharding.ParameterLifecycle) -> None:
        if not isinstance(value, sharding.ParameterLifecycle):
            raise TypeError(f"lifecycle must be a hf_hwbp.sharding.ParameterLifecycle, got {type(value).__name__}.")
        self._lifecycle = value

    @property
    def hooked_stacks(self) -> tuple[Stack, ...]:
        """Every stack the patch hooks, indexed as the lifecycle's ``stack_index`` (those a training forward showed
        are no residual stack included; ``stacks`` leaves them out)."""
        return tuple(self._stacks)

    def is_recording(self, stack_index: int) -> bool:
        """Whether a training forward of that stack is being recorded for Highway-BP right now (between the layer
        where its record started and its last layer)."""
        fwd = self._forwards[stack_index]
        return fwd is not None and fwd.record is not None

    def reinstall_hooks(self) -> None:
        """Remove the patch's layer and root hooks and register them again in front of every other hook. The patch
        must see a layer's input first (it replaces it with the leaf the block's local graph starts from); a wrapper
        that prepends its own hooks after patching (FSDP2's ``fully_shard``) calls this."""
        if not self._handles:
            raise HighwayBPError("Highway-BP: reinstall_hooks() on a patch that was removed (unpatch_model).")
        self._remove_hooks()
        self._install_hooks()

    # ----- forward ----------------------------------------------------------------------------------------------
    def _in_training_forward(self) -> bool:
        """Gradients on, outside any backward (a checkpointed layer's recomputation runs inside one)."""
        return torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1

    def _exact_step(self, stack: Stack) -> bool:
        """k reaches this stack's blocks and nothing stops the iterations early: the model's own backward gives the
        same gradient at backprop's cost."""
        return self.exact_steps_by_autograd and self.config.tol is None and self.config.k >= self._blocks_of(stack)

    def _start_run(self, s: int, i: int) -> _StackForward:
        """A forward of stack ``s`` begins at layer ``i`` (0, or later when LayerDrop skipped the first layers).
        Returns its bookkeeping, ``active`` when Highway-BP records it. Every refusal here comes before any backward."""
        stack = self._stacks[s]
        root_call = self._root_calls if self._root_depth > 0 else None
        fwd = self._forwards[s] = _StackForward(next_layer=i)
        if not self._in_training_forward():
            return fwd  # no gradient, or a checkpointed layer's recomputation: touches nothing
        if not self.enabled:
            self.log.forward_without_highway(None)  # inside exact_backprop(model): ordinary backprop
            return fwd
        if not any(layer.training for layer in stack.layers):
            self._warn_eval(stack)
            self.log.forward_without_highway(None)
            return fwd
        self._check_forward(stack)
        if self._exact_step(stack):
            self.log.forward_without_highway(self._blocks_of(stack))
            return fwd
        if root_call is not None and self._run_roots[s] == root_call:
            raise HighwayBPError(
                f"Highway-BP: {stack.path} ran a second time in one forward of the model (one group of layers shared "
                "across depths, as ALBERT's, or a loop over the same layers). Highway-BP needs a stack whose layers "
                "each run once per forward, in order. Train this model with ordinary backprop "
                "(unpatch_model(model)), or pass layers= with a list whose layers run once each."
            )
        self._run_roots[s] = root_call
        fwd.active = True
        return fwd

    def _warn_eval(self, stack: Stack) -> None:
        if not self._warned_eval:
            self._warned_eval = True
            logger.warning(
                f"Highway-BP: a forward with gradients enabled ran with {stack.path} in eval mode, so its backward is "
                "ordinary backprop (Highway-BP trains a model in training mode only; from_pretrained returns models "
                "in eval mode). Call model.train() before training. This is said once."
            )

    def _before_layer(self, s: int, i: int, module: nn.Module, args: tuple, kwargs: dict):
        self._root_saw_layer = True
        if s in self._rejected:
            return None
        stack = self._stacks[s]
        fwd = self._forwards[s]
        if fwd is None or i < fwd.next_layer:
            fwd = self._start_run(s, i)  # a new forward of the stack
        if not fwd.active:
            fwd.next_layer = i + 1
            return None
        skipped = i > fwd.next_layer  # LayerDrop: the layers between did not run in this forward
        if skipped and self.config.group_size > 1:
            raise HighwayBPError(
                f"Highway-BP: layers {fwd.next_layer}..{i - 1} of {stack.path} were skipped in this training forward "
                "(LayerDrop), which Highway-BP follows only with group_size=1 (each executed layer is a block). Set "
                "group_size=1, or the model's layerdrop to 0."
            )
        if module is not stack.layers[i]:
            raise HighwayBPError(
                f"Highway-BP: a copy of layer {i} of {stack.path} ran with the original's hooks (nn.DataParallel "
                "replicates modules this way). Use DistributedDataParallel (one process per device) instead."
            )
        fwd.next_layer = i + 1
        hidden = routing.split_hidden(args, kwargs)
        fwd.input_shape = (hidden.shape, hidden.dtype)
        checkpointing = _checkpoint_kwargs(module)
        if checkpointing is not None and checkpointing.get("preserve_rng_state") is False:
            fwd.rng_state = (hidden.device, _rng_state(hidden.device))
        fwd.marks = routing.collector_marks(routing.collector())
        record = fwd.record
        if record is None:
            return self._maybe_start(s, i, fwd, hidden, args, kwargs)
        if routing.has_grad_inputs(args, kwargs):
            args, kwargs = routing.replace_tensors(
                args, kwargs, functools.partial(self._known_leaf, fwd, i, module), deep=False
            )
        if self._block_start(record, i):
            if hidden is not fwd.last_exit:
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {stack.path} did not receive the output of the layer that ran before "
                    "it unchanged. Highway-BP supports stacks whose layers feed each other directly; pass "
                    "layers=<ModuleList> of such a stack, or call unpatch_model(model)."
                )
            leaf = hidden.detach().requires_grad_(True)
            record.block_layers.append([i])
            record.inputs.append(leaf)
            fwd.block_starts.append(torch._C._autograd._get_sequence_nr())
            return routing.with_hidden(args, kwargs, leaf)
        record.block_layers[-1].append(i)
        return args, kwargs

    def _maybe_start(self, s: int, i: int, fwd: _StackForward, hidden: Tensor, args: tuple, kwargs: dict):
        """Start recording at the first layer whose block has something to train (or feeds something that does)."""
        stack = self._stacks[s]
        found: list[tuple[str, Tensor]] = []

        def collect(name: str, tensor: Tensor) -> Tensor:
            found.append((name, tensor))
            return tensor

        routing.replace_tensors(args, kwargs, collect, deep=True)
        g = self.config.group_size
        block_end = min((i // g + 1) * g, len(stack))
        if not (hidden.requires_grad or found or _trainable(stack.layers[i:block_end])):
            return None  # frozen, and nothing below needs a gradient: the layer runs as it would unpatched
        flag = _EngineFlag()
        originals = list({id(tensor): tensor for _, tensor in found}.values())
        for tensor in originals:
            if id(tensor) not in fwd.leaf_of:
                fwd.leaf_of[id(tensor)] = _leaf(fwd, tensor)
        fwd.originals.extend(originals)
        lifecycle = self._lifecycle
        params = lifecycle.block_parameters(s, stack.layers[i:])
        record = _StackRecord(
            log=self.log,
            stack_index=s,
            lifecycle=lifecycle,
            keep_block_grads=self.keep_block_grads,
            stack=stack,
            config=copy.copy(self.config),
            first_layer=i,
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
        if originals:
            args, kwargs = routing.replace_tensors(args, kwargs, lambda _, t: fwd.leaf_of.get(id(t), t), deep=True)
        x0 = _StackInput.apply(flag, hidden) if hidden.requires_grad else hidden
        record.block_layers.append([i])
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
                raise HighwayBPError(
                    f"Highway-BP: layer {i} of {fwd.record.stack.path} reads a tensor that an earlier layer returned "
                    f"and that depends on that layer's hidden state "
                    f"(`{routing.argument_name(module, name)}`): its gradient would feed the Highway iteration it "
                    "depends on. Train this model with ordinary backprop (unpatch_model(model))."
                )
            leaf = fwd.leaf_of[id(tensor)] = _leaf(fwd, tensor)
            fwd.record.carried.append((side, leaf))
            return leaf
        argument = routing.argument_name(module, name)
        raise HighwayBPError(
            f"Highway-BP: layer {i} of {fwd.record.stack.path} receives `{argument}`, a tensor that requires grad that "
            f"layer {fwd.record.first_layer} did not receive and that no earlier layer returned. Highway-BP routes "
            "the side inputs that the stack's first layer receives too (encoder states, prefix keys and values, "
            "parameters passed in) and the tensors a layer returns for the next ones (T5's position bias). Train "
            "this model with ordinary backprop (unpatch_model(model)), or pass that tensor to every layer."
        )

    def _after_layer(self, s: int, i: int, output):
        fwd = self._forwards[s]
        if s in self._rejected or fwd is None or fwd.next_layer != i + 1:
            return None
        stack = self._stacks[s]
        if i == len(stack) - 1:
            self._forwards[s] = None  # the patch keeps nothing of a forward past its stack
        if not fwd.active:
            return None
        hidden = routing.output_hidden(output)
        if (hidden.shape, hidden.dtype) != fwd.input_shape:
            return self._not_a_stack(s, i, fwd, hidden)
        if fwd.rng_state is not None:
            self._check_rng(stack, i, fwd)
        record = fwd.record
        if record is None:
            return None
        if not hidden.requires_grad and not record.outputs and self._block_end(record, i):
            fwd.record = fwd.token = None  # its trainable parameters did not take part: still the frozen prefix
            self.recorded_forwards -= 1
            return None
        output = self._cut_side_outputs(record, fwd, output)
        if not self._block_end(record, i):
            return routing.with_output_hidden(output, _GroupInnerGuard.apply(record.flag, i, hidden))
        index = len(record.outputs)
        record.outputs.append(hidden)
        exit_hidden, fwd.token = _Exit.apply(record, record.output_grads, index, hidden.detach(), fwd.token)
        fwd.last_exit = exit_hidden
        if not self._graph_checked[s]:
            self._check_local_graph(s, record, fwd, index)
            self._graph_checked[s] = i == len(stack) - 1  # every block of one whole forward was checked
        return routing.with_output_hidden(output, exit_hidden)

    def _not_a_stack(self, s: int, i: int, fwd: _StackForward, hidden: Tensor):
        """Layer ``i`` changed the hidden state's shape: the list is not a residual stack (a convolutional feature
        encoder, a stage that down-samples). Before anything was cut from the model's graph (the first layer, no
        side input replaced), Highway-BP lets it go: the list trains with ordinary backprop. Later, it refuses."""
        stack = self._stacks[s]
        (shape, dtype), record = fwd.input_shape, fwd.record
        what = f"layer {i} of {stack.path} maps a {tuple(shape)} state to a {tuple(hidden.shape)} one"
        if dtype != hidden.dtype:
            what += f" ({dtype} to {hidden.dtype})"
        untouched = record is None or (not record.outputs and not fwd.originals and not record.side_outputs)
        if not untouched:
            raise HighwayBPError(
                f"Highway-BP: {what}: the layers of a residual stack keep the hidden state's shape, so {stack.path} is "
                "not one. Pass the model's residual stack(s) with patch_model(model, k, layers=...), or train it with "
                "ordinary backprop (unpatch_model(model))."
            )
        self._rejected[s] = what
        self._forwards[s] = None
        if record is not None:
            self.recorded_forwards -= 1
        logger.warning(
            f"Highway-BP: {what}, so it is not a residual stack: it trains with ordinary backprop. Highway-BP runs on "
            f"{describe(self.stacks) if self.stacks else 'no stack'}."
        )
        return None

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
        index = len(record.side_outputs) - 1
        cut, fwd.token = _Exit.apply(record, record.side_grads, index, tensor.detach(), fwd.token)
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
        if stack.residual_gate is not None and self.config.group_size > 1:
            raise UnsupportedModelError(
                f"Highway-BP: the layers of {stack.path} have a gated residual path (act(h + g(h))), which is defined "
                "per layer: group_size must be 1 for this model (set_highway_config(model, group_size=1))."
            )
        for layer in stack.layers:
            kwargs = _checkpoint_kwargs(layer)
            if kwargs is not None and kwargs.get("use_reentrant") is not False:
                raise HighwayBPError(
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
            raise HighwayBPError(
                f"Highway-BP: layer {i} of {stack.path} draws random numbers (dropout) and is checkpointed with "
                "preserve_rng_state=False: each of the k + 1 Highway sweeps would recompute it with new dropout "
                "masks, none of them the forward's. Keep preserve_rng_state=True (the default) in the "
                "checkpointing kwargs, or turn dropout off."
            )

    def _check_local_graph(self, s: int, record: _StackRecord, fwd: _StackForward, block: int) -> None:
        """Until one whole forward of the stack was checked, at each block's exit: the block reads no tensor that
        requires grad from outside its layers without receiving it as an argument (its gradient would be lost).
        Walks the block's recorded local graph; raises in the forward, before any gradient exists."""
        stack = self._stacks[s]
        allowed = {id(p) for p in record.lifecycle.block_parameters(s, stack.layers)}
        allowed |= {id(x) for x in record.inputs[1:]} | {id(z) for z in record.side_leaves}
        allowed |= {id(z) for _, z in record.carried}
        stops = {id(record.inputs[0].grad_fn)} if record.inputs[0].grad_fn is not None else set()
        start = fwd.block_starts[block]
        pending, seen = [record.outputs[block].grad_fn], {}
        while pending:
            node = pending.pop()
            if node is None or id(node) in seen or id(node) in stops:
                continue
            seen[id(node)] = node  # holding the node keeps its id unique during the walk
            variable = getattr(node, "variable", None)
            if variable is not None:
                if id(variable) not in allowed and isinstance(variable, nn.Parameter):
                    raise HighwayBPError(
                        f"Highway-BP: block {block} of {stack.path} reads a parameter "
                        f"({tuple(variable.shape)}) that is neither one of its layers' parameters nor passed to "
                        "it as an argument, so its gradient cannot be routed. Pass it to the layer as an "
                        "argument, or register it in the layer; or call unpatch_model(model)."
                    )
                continue
            if node._sequence_nr() < start:
                raise HighwayBPError(
                    f"Highway-BP: block {block} of {stack.path} reads a tensor that requires grad, computed "
                    f"outside its layers ({node.name()}), without receiving it as an argument, so its gradient "
                    "cannot be routed. Pass it to the layer as an argument; or call unpatch_model(model)."
                )
            pending.extend(fn for fn, _ in node.next_functions)


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
