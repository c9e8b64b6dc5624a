"""Highway-BP under FSDP2 (``torch.distributed.fsdp.fully_shard``, also through Accelerate's FSDP2 plugin).

Under FSDP2 ``layer.parameters()`` returns sharded ``DTensor`` parameters outside a layer's forward; the forward
reads *unsharded* ``nn.Parameter`` objects that FSDP all-gathers into (one object per parameter, reused every
step; its storage is freed when FSDP reshards). Ordinary backprop relies on two autograd hooks per
``fully_shard`` unit: a pre-backward hook on the unit's outputs (all-gather again) and a post-backward hook on its
inputs (reduce-scatter the unsharded ``.grad`` into the sharded one, then reshard).

Highway-BP cuts every block's graph at its output and differentiates the local graphs k + 1 times from the stack
entry's backward. ``FSDPHighway`` makes the two fit, with this parameter lifecycle ("keep gathered"):

- the stack entry records the unsharded parameter objects (the ones the local graphs use), so the parameter
  gradients Highway-BP returns land in their ``.grad`` through autograd, where FSDP's post-backward reads them;
- no post-backward hook inside the local graphs (it would reduce-scatter and free the weights during the first
  Highway sweep): every block's reduce-scatter runs once, from FSDP's end-of-backward callback, after the Highway
  backward has produced all gradients. Gradient accumulation (``set_requires_gradient_sync(False)``), mixed
  precision (reduce dtype) and resharding after backward are FSDP's own;
- the pre-backward hooks FSDP puts on each block's output re-gather the blocks (``reshard_after_forward=True``)
  while autograd walks down the exits, before the entry's backward reads the weights: during the Highway backward
  the whole stack is unsharded (as ``reshard_after_forward=False`` keeps it through the forward). All-gathers per
  step: one per block in the forward, one more in the backward with ``reshard_after_forward=True``; reduce-scatters:
  one per block. What it costs against FSDP backprop is measured in ``benchmarks/bench_fsdp.py``.

``attach(model)`` installs this on a patched, ``fully_shard``-ed model (either order of patching and sharding);
``detach(model)`` undoes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import HighwayBPError
from .sharding import ParameterLifecycle

_ATTR = "_hwbp_fsdp"


class FSDPHighwayError(HighwayBPError, NotImplementedError):
    """This FSDP set-up cannot run Highway-BP (the message says why and what to do)."""


def _fsdp_state_of(module: nn.Module):
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return _get_module_fsdp_state(module)


def fsdp2_states(model: nn.Module) -> list:
    """The FSDP2 states of ``model``'s modules, each once, in ``modules()`` order."""
    states: dict[int, object] = {}
    for module in model.modules():
        state = _fsdp_state_of(module)
        if state is not None:
            states.setdefault(id(state), state)
    return list(states.values())


def is_fsdp2(model: nn.Module) -> bool:
    """Whether some module of ``model`` is ``fully_shard``-ed (FSDP2)."""
    return bool(fsdp2_states(model))


class FSDPHighway:
    """The FSDP2 side of one patched model (see the module docstring)."""

    def __init__(self, model: nn.Module, patch):
        self.model, self.patch = model, patch
        self._restore: list = []
        owner: dict[int, tuple] = {}  # id(sharded param) -> (param group, FSDPParam)
        for state in fsdp2_states(model):
            for group in state._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    owner[id(fsdp_param.sharded_param)] = (group, fsdp_param)
        self.stack_groups: list[list] = []  # per stack: the param groups that own its layers' parameters
        for stack in _all_stacks(patch):
            groups: dict[int, object] = {}
            for layer in stack.layers:
                for param in layer.parameters():
                    if id(param) in owner:
                        group = owner[id(param)][0]
                        groups.setdefault(id(group), group)
            self.stack_groups.append(list(groups.values()))
        self._install()

    # ----- installation ------------------------------------------------------------------------------------------
    def _install(self) -> None:
        patch = self.patch
        # The patch's pre-hook must see a layer's input before FSDP wraps it (it replaces it with the leaf the
        # block's local graph starts from), whichever of patch_model and fully_shard ran first.
        patch.reinstall_hooks()
        # The stack entry records, and the once-per-stack graph check allows, the unsharded parameter objects.
        patch.lifecycle = _KeepGathered(self)
        # No FSDP post-backward hook inside a recorded block's local graph (see the module docstring).
        for s, groups in enumerate(self.stack_groups):
            for group in groups:
                original = type(group)._register_post_backward_hook.__get__(group)
                group._register_post_backward_hook = _skip_while_recording(patch, s, original)
                self._restore.append(lambda group=group: group.__dict__.pop("_register_post_backward_hook", None))

    def remove(self) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        if isinstance(self.patch.lifecycle, _KeepGathered):
            self.patch.lifecycle = ParameterLifecycle()

    # ----- parameters --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def unsharded_view(self, s: int) -> Iterator[None]:
        """The stack's layers show their unsharded parameter objects (their storage may be freed) while the patch
        collects parameters; each shows what FSDP set again afterwards."""
        swapped = []
        for group in self.stack_groups[s]:
            if not group.fsdp_params:
                continue
            if not all(hasattr(p, "_unsharded_param") for p in group.fsdp_params):
                # the first step: FSDP creates the unsharded parameter objects at a group's first all-gather
                group.unshard()
                group.wait_for_unshard()
                group._to_sharded()
            if group.is_unsharded:
                continue
            for fsdp_param in group.fsdp_params:
                fsdp_param._setattr_on_modules(fsdp_param._unsharded_param)
                swapped.append(fsdp_param)
        try:
            yield
        finally:
            for fsdp_param in swapped:
                fsdp_param._setattr_on_modules(fsdp_param.sharded_param)


def _all_stacks(patch) -> tuple:
    """Every stack the patch hooks, indexed as its hooks index them."""
    return patch.hooked_stacks


class _KeepGathered(ParameterLifecycle):
    """The stack entry and the forward's graph check see the unsharded parameter objects (see the module
    docstring); the whole stack stays gathered through the Highway backward."""

    def __init__(self, backend: FSDPHighway):
        self.backend = backend

    def block_parameters(self, stack_index, layers):
        with self.backend.unsharded_view(stack_index):
            return super().block_parameters(stack_index, layers)


def _skip_while_recording(patch, s: int, original):
    def register(args, kwargs):
        if patch.is_recording(s):
            return args, kwargs
        return original(args, kwargs)

    return register


def _patch_of(model: nn.Module):
    """The Highway-BP patch of ``model`` (inside any wrapper), or None."""
    from .api import unwrap_model
    from .patching import _ATTR as PATCH_ATTR

    return getattr(unwrap_model(model), PATCH_ATTR, None)


def attach(model: nn.Module) -> FSDPHighway | None:
    """Make the Highway-BP patch of ``model`` work under FSDP2 (no-op without FSDP2 or without a patch)."""
    from .api import unwrap_model

    target = unwrap_model(model)
    patch = _patch_of(target)
    if patch is None or not is_fsdp2(target):
        return None
    backend = getattr(patch, _ATTR, None)
    if backend is not None:
        backend.remove()
    backend = FSDPHighway(target, patch)
    setattr(patch, _ATTR, backend)
    return backend


def detach(model: nn.Module) -> None:

    patch = _patch_of(model)
    backend = getattr(patch, _ATTR, None) if patch is not None else None
    if backend is not None:
        backend.remove()
        delattr(patch, _ATTR)


def is_attached(model: nn.Module) -> bool:
    """Whether ``model``'s Highway-BP patch runs under FSDP2 (``attach`` ran for the current patch)."""

    patch = _patch_of(model)
    return patch is not None and getattr(patch, _ATTR, None) is not None


class _AttachAtForward:
    """Forward pre-hook on the outermost module: attaches the patch that exists when a forward starts (the Trainer
    and HighwayCallback patch the model after Accelerate sharded it, when training begins)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, module, args):

        patch = _patch_of(self.model)
        if patch is not None and getattr(patch, _ATTR, None) is None:
            attach(self.model)


def attach_when_patched(model: nn.Module) -> None:
    """Attach ``model``'s patch at every forward that finds it unattached (once per model; cheap otherwise)."""
    if getattr(model, "_hwbp_fsdp_watch", None) is None:
        model._hwbp_fsdp_watch = model.register_forward_pre_hook(_AttachAtForward(model), prepend=True)


def fsdp2_owned(model: nn.Module) -> set[int]:
    """The ids of the parameters (sharded and, once gathered, unsharded) that FSDP2 units of ``model`` manage."""
    owned: set[int] = set()
    for state in fsdp2_states(model):
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                owned.add(id(fsdp_param.sharded_param))
                if hasattr(fsdp_param, "_unsharded_param"):
                    owned.add(id(fsdp_param._unsharded_param))
    return owned
