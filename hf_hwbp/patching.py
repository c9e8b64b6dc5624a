"""The patch: Highway-BP's settings and hooks on one model, installed by ``patch_model`` and removed by
``unpatch_model``.

Forward pre-hooks and hooks on every layer of the model's residual stacks, and on the model itself, decide which
forward of a stack is recorded for Highway-BP: a training forward (gradients enabled, outside a backward, some
layer in training mode) that is not an exact step (k reaching the number of blocks runs the model's own backward,
the same gradient at backprop's cost). A forward run without gradients or in eval mode touches nothing. The
recording itself is ``recorder.StackForward``'s; what it checks is ``forward_checks``; the backward is ``record``'s.

Ownership: what one training forward records is held by that forward's autograd graph, never by the patch. The
patch holds settings, hooks and, only while a stack's forward runs, that forward's bookkeeping; it deep-copies and
pickles with the model. Engines that shard parameters use the patch through ``lifecycle``, ``hooked_stacks``,
``is_recording`` and ``reinstall_hooks`` (``hf_hwbp.sharding``); the batched backend's capture of the blocks'
calls is installed here when that backend is chosen (``batched_adapter``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from . import forward_checks, sharding
from .batched_adapter import BlockCallCapture
from .config import HighwayConfig
from .discovery import Stack, describe
from .errors import HighwayBPError
from .record import IterationLog, _refuse_double_backward
from .recorder import RecordingSettings, StackForward
from .routing import forward as routing

logger = logging.get_logger(__name__)

# The default of ``HighwayPatch.exact_steps_by_autograd``: exact steps run the model's own backward.
EXACT_STEPS_BY_AUTOGRAD = True

_ATTR = "_hwbp_patch"


# ----- hooks ---------------------------------------------------------------------------------------------------
# Small classes, not closures: a deep copy of the model gets hooks that point to the copy's patch, and they pickle.
# Hooks always run eagerly: under torch.compile the graph breaks at block boundaries, where they cut it anyway.
class _PreHook:
    """Forward pre-hook of one layer."""

    def __init__(self, patch: HighwayPatch, stack_index: int, layer_index: int):
        self.patch, self.stack_index, self.layer_index = patch, stack_index, layer_index

    @torch._dynamo.disable
    def __call__(self, module, args, kwargs):
        return self.patch._before_layer(self.stack_index, self.layer_index, module, args, kwargs)


class _PostHook(_PreHook):
    """Forward hook of one layer."""

    @torch._dynamo.disable
    def __call__(self, module, args, output):
        return self.patch._after_layer(self.stack_index, self.layer_index, output)


class _GradModeProbe:
    """Forward pre-hook on the submodules of a checkpointed layer: whether the layer's own computation runs with
    gradients enabled (the reentrant form of checkpointing runs it without, and recomputes it in its backward).
    Every submodule, not only the direct children: a layer may call its work through a list it never calls itself
    (T5's block holds its sublayers in an ``nn.ModuleList``)."""

    def __init__(self, patch: HighwayPatch, stack_index: int):
        self.patch, self.stack_index = patch, stack_index

    @torch._dynamo.disable
    def __call__(self, module, args):
        fwd = self.patch._forwards[self.stack_index]
        if fwd is not None and fwd.active and torch._C._current_graph_task_id() == -1:
            fwd.grad_mode_seen.append(torch.is_grad_enabled())


class _RootPreHook:
    """Forward pre-hook of the patched model: a forward of the model begins (a stack run twice in it is refused)."""

    def __init__(self, patch: HighwayPatch):
        self.patch = patch

    @torch._dynamo.disable
    def __call__(self, module, args):
        patch = self.patch
        if patch._root_depth == 0:
            patch._root_trains = patch._root_recorded = False
            patch._returned.clear()
            if module.training and patch._in_training_forward():
                sharding.connect(module, patch)  # may refuse the set-up: nothing of this forward has started yet
                patch._root_trains = patch.enabled
            patch._root_calls += 1
            patch._root_saw_layer = False
        patch._root_depth += 1


class _RootPostHook(_RootPreHook):
    """Forward hook of the patched model (always called): the model's forward ends. A training forward that ran no
    layer of a stack through its hooks is refused; what a recorded forward returns refuses ``create_graph=True``."""

    @torch._dynamo.disable
    def __call__(self, module, args, output):
        patch = self.patch
        patch._root_depth = max(0, patch._root_depth - 1)
        if patch._root_depth > 0:
            return None
        patch._forwards = [None] * len(patch._forwards)  # a stack whose last layers LayerDrop skipped ends here
        patch._finished = [None] * len(patch._forwards)
        if patch._root_trains and not patch._root_saw_layer and patch.stacks:
            raise HighwayBPError(
                f"Highway-BP: a training forward of {type(module).__name__} ran no layer of "
                f"{describe(patch.stacks)} through its module call (a model that calls layer.forward() directly "
                "bypasses the hooks Highway-BP needs), so Highway-BP would silently not apply. Train this model "
                "with ordinary backprop (unpatch_model(model)), or pass layers= with modules the model calls."
            )
        if patch._root_recorded and output is not None:
            # The Highway backward cannot create a graph: refuse before the head or the final norm get a gradient.
            # (The block outputs and side outputs the stack returned refuse it themselves.)
            for tensor in routing.output_tensors(output):
                if tensor.grad_fn is not None and id(tensor) not in patch._returned:
                    tensor.register_hook(_refuse_double_backward)
        patch._returned.clear()
        return None


# ----- the patch -----------------------------------------------------------------------------------------------
class HighwayPatch:
    """The Highway-BP state of one patched model: its stacks, settings and hooks.

    Read or change the settings between steps through ``config`` (or ``hf_hwbp.set_highway_config``): a backend
    chosen there is installed at once. ``stacks`` says what discovery found (less any list the first training
    forward showed is not a residual stack); ``last_iterations`` is the number of Highway iterations whose gradient
    the last training backward delivered (see ``IterationLog``); ``recorded_forwards`` counts the stack forwards
    recorded for Highway-BP.

    ``exact_steps_by_autograd`` (default True): a stack whose k reaches its number of blocks (with no ``tol``) is
    trained with the model's own backward, the same gradient as Highway-BP(k = L) at backprop's cost; False runs
    the Highway engine for it (tests that check the engine's exactness against autograd set it).

    For engines that shard parameters (FSDP2, ZeRO-3; ``hf_hwbp.sharding``): ``lifecycle`` (the
    ``ParameterLifecycle`` the Highway backward gathers parameters through), ``hooked_stacks`` (the stacks as the
    lifecycle's ``stack_index`` counts them), ``is_recording(stack_index)`` and ``reinstall_hooks()``.
    """

    def __init__(
        self, stacks: list[Stack], config: HighwayConfig, model_type: str | None = None, root: nn.Module | None = None
    ):
        if not stacks:
            raise HighwayBPError("Highway-BP needs at least one stack of layers.")
        self._stacks = list(stacks)
        self.model_type = model_type
        self.enabled = True
        self.log = IterationLog()
        self.keep_block_grads = False
        self.exact_steps_by_autograd = EXACT_STEPS_BY_AUTOGRAD
        self.recorded_forwards = 0  # stack forwards recorded for Highway-BP (one per stack per training forward)
        self._rejected: dict[int, str] = {}  # stack index -> why its first training forward showed it is no stack
        self._forwards: list[StackForward | None] = [None] * len(self._stacks)
        self._counted: list[bool] = [False] * len(self._stacks)  # the running forward is in recorded_forwards
        self._graph_checked = [False] * len(self._stacks)
        self._root = root
        self._root_calls = 0  # forwards of the patched model (its outermost call)
        self._root_depth = 0  # > 0 while the patched model's forward runs
        self._run_roots: list[int | None] = [None] * len(self._stacks)  # the model forward of each stack's last run
        # Layers applied at several depths (ALBERT's shared groups, a loop over one block): a recorded pass over a
        # stack's layers that the next pass continues, in the same forward of the model, on its output; and the
        # most passes one forward of each stack made (its depth is that many times its layers).
        self._finished: list[StackForward | None] = [None] * len(self._stacks)
        self._passes = [stack.repeats for stack in self._stacks]
        self._pass_count = [0] * len(self._stacks)
        self._root_active = [False] * len(self._stacks)  # the first pass of the stack's last forward was recorded
        self._root_trains = False  # the running forward of the patched model is a training forward
        self._root_saw_layer = False  # ... and has run a layer of a stack through its hooks
        self._root_recorded = False  # ... and recorded a stack for Highway-BP
        self._returned: set[int] = set()  # ids of what the recorded stacks handed the running model forward
        self._warned_eval = False
        self._said: set[tuple] = set()  # settings already warned about
        self._lifecycle = sharding.ParameterLifecycle()
        self._handles: list = []
        self._probed: set[int] = set()  # ids of the checkpointed layers whose children carry a _GradModeProbe
        self._capture: BlockCallCapture | None = None
        self._install_hooks()
        self.config = config

    # A copy (deepcopy, pickle) keeps settings and hooks, and starts with no forward running.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_forwards"] = [None] * len(self._stacks)
        state["_finished"] = [None] * len(self._stacks)
        state["_counted"] = [False] * len(self._stacks)
        state["_root_depth"] = 0
        state["_returned"] = set()
        return state

    # ----- settings ---------------------------------------------------------------------------------------------
    @property
    def config(self) -> HighwayConfig:
        """The settings the next training forward records with (a backend chosen here is installed at once)."""
        return self._config

    @config.setter
    def config(self, config: HighwayConfig) -> None:
        if not isinstance(config, HighwayConfig):
            raise TypeError(f"config must be a HighwayConfig, got {type(config).__name__}.")
        if not isinstance(config.k, int):
            raise ValueError(
                f"k={config.k!r} is a training setting (HighwayCallback / HighwayTrainer resolve it per step); a "
                "patched model runs an int k. Pass e.g. k=<number of layers>, tol=1e-3."
            )
        self._config = config
        want_capture = config.backend == "batched"
        if want_capture and self._capture is None:
            self._capture = BlockCallCapture([stack.layers for stack in self._stacks], self.is_recording)
        elif not want_capture and self._capture is not None:
            self._capture.remove()
            self._capture = None

    def warn_about_settings(self) -> None:
        """Warn, once per setting, where the settings do less than they seem to: a k past the number of blocks (it
        is clamped: exact backprop), a group_size that puts a whole stack into one block (plain backprop)."""
        k, g, blocks = self.config.k, self.config.group_size, self.num_blocks
        if k > blocks and ("k", k, blocks) not in self._said:
            self._said.add(("k", k, blocks))
            logger.warning(
                f"Highway-BP: k={k} is more than the {blocks} Highway blocks of {describe(self.stacks)}: it is clamped "
                f"to {blocks}, which is exact backprop (the model's own backward). Use a k below {blocks} for "
                "Highway-BP."
            )
        for stack in self.stacks:
            if len(stack) > 1 and self._blocks_of(stack) == 1 and ("group_size", g, stack.path) not in self._said:
                self._said.add(("group_size", g, stack.path))
                logger.warning(
                    f"Highway-BP: group_size={g} puts all {len(stack)} layers of {stack.path} into one Highway block: "
                    f"that is plain backprop (no Highway iteration can run). Use a group_size below {len(stack)}."
                )

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
        """Highway blocks of one forward of the stack: per pass over its layers, times the passes."""
        g = self.config.group_size
        passes = max(self._passes[s] for s, known in enumerate(self._stacks) if known is stack)
        return (len(stack) + g - 1) // g * passes

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
    def last_block_grads(self):
        """delta^(k)_1..L of the last stack backward (kept only while ``keep_block_grads`` is set)."""
        return self.log.block_grads

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """The trainable parameters of each Highway block (group of layers), stack by stack, bottom to top."""
        g = self.config.group_size
        return [
            sharding.trainable_parameters(stack.layers[start : start + g])
            for stack in self.stacks
            for start in range(0, len(stack), g)
        ]

    # ----- hooks ------------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        """The layers' hooks and the root's, each in front of the hooks already there."""
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                self._handles.append(
                    layer.register_forward_pre_hook(_PreHook(self, s, i), with_kwargs=True, prepend=True)
                )
                self._handles.append(layer.register_forward_hook(_PostHook(self, s, i), prepend=True))
        if self._root is not None:
            self._handles.append(self._root.register_forward_pre_hook(_RootPreHook(self), prepend=True))
            self._handles.append(self._root.register_forward_hook(_RootPostHook(self), always_call=True))
        self._probed = set()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def remove(self) -> None:
        """Remove every hook (the backend's too); the model runs as it would unpatched. Resets ``lifecycle``."""
        self._remove_hooks()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._forwards = [None] * len(self._stacks)
        self._finished = [None] * len(self._stacks)
        self._lifecycle = sharding.ParameterLifecycle()

    def _probe_checkpointed(self, s: int) -> None:
        """Put a grad-mode probe on the submodules of each checkpointed layer of stack ``s`` (once per layer)."""
        for layer in self._stacks[s].layers:
            if forward_checks.is_checkpointed(layer) and id(layer) not in self._probed:
                self._probed.add(id(layer))
                for module in layer.modules():
                    if module is not layer:
                        self._handles.append(module.register_forward_pre_hook(_GradModeProbe(self, s)))

    def _checkpointed_ancestor(self, s: int) -> str | None:
        """The name of a module around stack ``s`` that transformers checkpoints (Swin checkpoints its stages, whose
        blocks are the stacks), or None."""
        if self._root is None:
            return None
        names = {id(module): name for name, module in self._root.named_modules()}
        parents = {id(child): parent for parent in self._root.modules() for child in parent.children()}
        module = parents.get(id(self._stacks[s].layers[0]))
        while module is not None:
            if forward_checks.is_checkpointed(module):
                return names.get(id(module)) or type(module).__name__
            module = parents.get(id(module))
        return None

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

    def _refuse_reentrant_around(self, s: int, i: int) -> None:
        """A stack that runs with gradients off inside a training forward of the model, within a module that
        transformers checkpoints: the reentrant form of checkpointing around the stack, which recomputes it inside
        its own backward where Highway-BP does not record (its blocks would silently get backprop's gradient)."""
        stack = self._stacks[s]
        if not (self._root_depth > 0 and self._root_trains and torch._C._current_graph_task_id() == -1):
            return
        if torch.is_grad_enabled() or not any(layer.training for layer in stack.layers) or self._exact_step(stack):
            return
        enclosing = self._checkpointed_ancestor(s)
        if enclosing is not None:
            forward_checks.refuse_reentrant_checkpointing(stack, i, enclosing=enclosing)

    def _exact_step(self, stack: Stack) -> bool:
        """k reaches this stack's blocks and nothing stops the iterations early: the model's own backward gives the
        same gradient at backprop's cost."""
        return self.exact_steps_by_autograd and self.config.tol is None and self.config.k >= self._blocks_of(stack)

    def _start_run(self, s: int, i: int) -> StackForward:
        """A forward of stack ``s`` begins at layer ``i`` (0, or later when LayerDrop skipped the first layers).
        Returns its bookkeeping, ``active`` when Highway-BP records it. Every refusal here comes before any backward."""
        stack = self._stacks[s]
        root_call = self._root_calls if self._root_depth > 0 else None
        repeat = root_call is not None and self._run_roots[s] == root_call
        if repeat and not self._root_active[s]:
            self._pass_count[s] += 1  # a pass of an exact step or of an unrecorded forward: count the depth
            self._passes[s] = max(self._passes[s], self._pass_count[s])
            self._forwards[s] = StackForward(stack, next_layer=i)  # decided at the forward's first pass
            return self._forwards[s]
        self._pass_count[s] = 1
        self._root_active[s] = False
        self._finished[s] = None
        fwd = self._forwards[s] = StackForward(stack, next_layer=i)
        self._counted[s] = False
        self._run_roots[s] = root_call
        if self._root_depth == 0:
            self._returned.clear()  # the stack runs outside a forward of the patched model
        if not self._in_training_forward():
            self._refuse_reentrant_around(s, i)
            return fwd  # no gradient, or a checkpointed layer's recomputation: touches nothing
        if not self.enabled:
            self.log.forward_without_highway(None)  # exact_backprop: Highway-BP is off for this step
            return fwd
        if not any(layer.training for layer in stack.layers):
            self._warn_eval(stack)
            self.log.forward_without_highway(None)
            return fwd
        forward_checks.check_stack_settings(stack, self.config)
        if self._exact_step(stack):
            self.log.forward_without_highway(self._blocks_of(stack))  # the model's own backward: exact, as k = L
            return fwd
        if repeat:
            raise HighwayBPError(
                f"Highway-BP: {stack.path} ran a second time in one forward of the model without continuing its "
                "previous run (a layer shared across depths is followed through the unrolled depth only when each "
                "pass starts at the first layer, on the output of the pass before). Train this model with ordinary "
                "backprop (unpatch_model(model)), or pass layers= with a list whose layers run once each."
            )
        self._probe_checkpointed(s)
        fwd.active = self._root_active[s] = True
        fwd.settings = RecordingSettings(
            stack_index=s,
            config=self.config,
            lifecycle=self._lifecycle,
            log=self.log,
            keep_block_grads=self.keep_block_grads,
            capture=self._capture,
            check_graph=not self._graph_checked[s],
            returned=self._returned,
        )
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
        fwd = self._forwards[s]
        if fwd is None and i == 0 and self._finished[s] is not None:
            fwd = self._next_pass(s)  # the same layers again, one depth further (unrolled)
        elif fwd is None or i < fwd.next_layer:
            fwd = self._start_run(s, i)  # a new forward of the stack
        if not fwd.active:
            fwd.next_layer = i + 1
            return None
        result = fwd.before_layer(i, module, args, kwargs)
        self._count(s, fwd)
        return result

    def _after_layer(self, s: int, i: int, output):
        fwd = self._forwards[s]
        if s in self._rejected or fwd is None or fwd.next_layer != i + 1:
            return None
        stack = self._stacks[s]
        if i == len(stack) - 1:
            self._forwards[s] = None  # the patch keeps nothing of a forward past its stack ...
            if fwd.active and self._root_depth > 0:
                self._finished[s] = fwd  # ... but what a next pass over its layers continues, until the model's ends
        if not fwd.active:
            return None
        what = fwd.changed_shape(i, output)
        if what is not None:
            return self._not_a_stack(s, fwd, what)
        output = fwd.after_layer(i, output)
        self._count(s, fwd)
        if fwd.graph_checked:
            self._graph_checked[s] = True  # every block of one whole forward was checked
        return output

    def _next_pass(self, s: int) -> StackForward:
        """Stack ``s`` runs its layers again in the same forward of the model: its record goes on over the unrolled
        depth (each pass's blocks after the last one's; the shared parameters' gradient sums over depths)."""
        fwd, self._finished[s] = self._finished[s], None
        self._pass_count[s] += 1
        self._passes[s] = max(self._passes[s], self._pass_count[s])
        fwd.next_layer = 0
        self._forwards[s] = fwd
        return fwd

    def _count(self, s: int, fwd: StackForward) -> None:
        """Keep ``recorded_forwards`` in step with the running forward (its record may start, or be let go)."""
        recording = fwd.record is not None
        if recording != self._counted[s]:
            self._counted[s] = recording
            self.recorded_forwards += 1 if recording else -1
        self._root_recorded = self._root_recorded or recording

    def _not_a_stack(self, s: int, fwd: StackForward, what: str):
        """A layer changed the hidden state's shape: the list is not a residual stack (a convolutional feature
        encoder, a stage that down-samples). Before anything was cut from the model's graph (the first layer, no
        side input replaced), Highway-BP lets it go: the list trains with ordinary backprop. Later, it refuses."""
        stack = self._stacks[s]
        if not fwd.untouched:
            raise HighwayBPError(
                f"Highway-BP: {what}: the layers of a residual stack keep the hidden state's shape, so {stack.path} is "
                "not one. Pass the model's residual stack(s) with patch_model(model, k, layers=...), or train it with "
                "ordinary backprop (unpatch_model(model))."
            )
        self._rejected[s] = what
        self._forwards[s] = None
        if self._counted[s]:
            self._counted[s] = False
            self.recorded_forwards -= 1
        logger.warning(
            f"Highway-BP: {what}, so it is not a residual stack: it trains with ordinary backprop. Highway-BP runs on "
            f"{describe(self.stacks) if self.stacks else 'no stack'}."
        )
        return None
