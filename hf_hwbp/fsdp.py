"""Highway-BP under FSDP2 (``torch.distributed.fsdp.fully_shard``, also through Accelerate's FSDP2 plugin).

Under FSDP2 a layer's ``parameters()`` are sharded ``DTensor`` s outside its forward; the forward reads *unsharded*
``nn.Parameter`` objects that FSDP all-gathers into (one object per parameter, reused every step; its storage is
freed when FSDP reshards). FSDP's backprop gathers a unit again when the gradient reaches its output, and
reduce-scatters its gradients and reshards it when the gradient has crossed it.

Highway-BP differentiates every block's recorded local graph k + 1 times, in an order of its own (each sweep from
the top block to the bottom one, then the parameter step), from the stack entry's backward. ``FSDP2Lifecycle``
(a ``hf_hwbp.sharding.ParameterLifecycle``) gives FSDP's memory to that order:

- a block's unsharded parameters exist only while its VJPs run: each autograd call through a block's local graph
  gathers the block (``gathered``), with the block the next call needs all-gathered ahead (one prefetch, as FSDP's
  backward does), and reshards it afterwards. So at most two blocks are gathered at once, as in FSDP's backprop;
  the price is (k + 1) times FSDP's backward all-gathers, minus the VJPs that Highway-BP reuses. The pre-backward
  hooks FSDP put on the block outputs, which would gather the whole stack before the Highway backward starts, leave
  the gathering to the lifecycle while a forward is recorded;
- the parameter step runs block by block from the top (``per_block_parameter_step``); each block's gradients are
  accumulated into its unsharded ``.grad`` and reduce-scattered at once by FSDP's own post-backward
  (``take_parameter_grads``), so the unsharded gradients of the whole stack never exist together. Accumulation
  without gradient sync, the reduce dtype, resharding after backward are FSDP's own; FSDP's end-of-backward
  callback still reduces whatever reaches an unsharded ``.grad`` later (a tensor a block hands on to the next);
- the post-backward function FSDP puts on a block's input lies inside the block's local graph: during the lifecycle's
  autograd calls it neither reduces nor reshards (Highway-BP calls it at the block's parameter step).

``lifecycle="keep_gathered"`` (``set_lifecycle``) keeps each block gathered from its first VJP to its parameter step
(FSDP's backward all-gathers, the whole stack's unsharded parameters at once); with ``reshard_after_forward=False``
both lifecycles keep the blocks gathered, as FSDP does. A fully_shard unit that holds parameters of several blocks
(or of layers and modules outside the stack) is gathered at its first use and stays so until FSDP's
end-of-backward callback reduces and reshards it.

No call is needed: the patch calls ``connect`` at the start of every training forward, which installs the lifecycle
on a patched model under FSDP2 (``fully_shard`` before or after ``patch_model``, Accelerate, any Trainer), or refuses
a set-up it cannot connect with ``HighwayBPError`` before any gradient. ``attach(model)`` is the same done
explicitly, with checks. What it costs: ``benchmarks/bench_fsdp.py`` and docs/fsdp.md.

``_Group`` is the only code of hf_hwbp that reads private names of torch (FSDP2's parameter groups); each is listed
in ``TORCH_PRIVATE_NAMES`` and tests/test_fsdp.py fails when torch moves one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from transformers.utils import logging

from .errors import HighwayBPError
from .sharding import ParameterLifecycle

logger = logging.get_logger(__name__)

LIFECYCLES = ("per_block", "keep_gathered")
_WAY_OUT = (
    "Shard each layer of the stack and then the whole model, in that order: `for layer in layers: "
    "fully_shard(layer)`, then `fully_shard(model)` (Accelerate: fsdp_version: 2 with fsdp_auto_wrap_policy "
    "TRANSFORMER_BASED_WRAP); or train without Highway-BP (unpatch_model(model), or use_highway_bp=False)."
)


class FSDPHighwayError(HighwayBPError, NotImplementedError):
    """This FSDP set-up cannot run Highway-BP (the message says why and what to do)."""


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


# ----- torch's FSDP2 internals: the one place hf_hwbp reads them -------------------------------------------------
TORCH_PRIVATE_NAMES = {
    "FSDPModule": ("_get_fsdp_state",),
    "FSDPState": ("_fsdp_param_groups", "_is_root"),
    "FSDPParamGroup": (
        "fsdp_params",
        "post_forward_mesh_info",
        "is_unsharded",
        "unshard",
        "wait_for_unshard",
        "reshard",
        "post_backward",
        "reduce_grads",
        "reshard_after_backward",
        "unshard_in_backward",
        "unshard_async_op",
        "_training_state",
        "_all_gather_result",
    ),
    "FSDPParam": ("sharded_param", "_unsharded_param", "_module_info", "_orig_size", "param_dtype", "orig_dtype"),
    "ParamModuleInfo": ("module", "shared_modules"),
    "TrainingState": ("PRE_BACKWARD",),
}


class _Group:
    """One FSDP2 parameter group (what one ``fully_shard`` call gathers and reduces as one) through the internals of
    torch's FSDP2 that Highway-BP needs. FSDP's own hooks drive it in the forward; the lifecycle drives it in the
    Highway backward exactly as FSDP's pre-backward (gather, prefetch) and post-backward (reduce, reshard) would."""

    def __init__(self, group, state, name: str):
        self._group, self._state, self.name = group, state, name
        self.layers: set[tuple[int, int]] = set()  # (stack index, layer index) of the layers it holds parameters of
        self.outside = False  # it also holds parameters of modules outside every stack layer

    @property
    def size(self) -> int:
        """Bytes of its unsharded parameters (in the dtype the forward reads)."""
        return sum(p._orig_size.numel() * (p.param_dtype or p.orig_dtype).itemsize for p in self._group.fsdp_params)

    @staticmethod
    def of(root: nn.Module) -> list[_Group]:
        """The FSDP2 parameter groups of ``root``'s modules, each once, in ``named_modules()`` order."""
        fsdp_module = _fsdp_module_class()
        groups: dict[int, _Group] = {}
        if fsdp_module is None:
            return []
        for name, module in root.named_modules():
            if isinstance(module, fsdp_module):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    groups.setdefault(id(group), _Group(group, module._get_fsdp_state(), name or "<root>"))
        return list(groups.values())

    # ----- what it holds -----
    def owners(self) -> Iterator[tuple[nn.Module, object]]:
        """(module that registers the parameter, the parameter's FSDP handle) for each parameter, shared ones too."""
        for fsdp_param in self._group.fsdp_params:
            info = fsdp_param._module_info
            for module in (info.module, *info.shared_modules):
                yield module, fsdp_param

    def known_ids(self) -> set[int]:
        """The ids of its sharded parameters and, once gathered, unsharded ones."""
        ids = set()
        for fsdp_param in self._group.fsdp_params:
            ids.add(id(fsdp_param.sharded_param))
            if hasattr(fsdp_param, "_unsharded_param"):
                ids.add(id(fsdp_param._unsharded_param))
        return ids

    def unsharded(self, fsdp_param) -> nn.Parameter | None:
        """The unsharded parameter a forward reads (None when frozen). FSDP creates these objects at a group's first
        all-gather: before the first step that is one all-gather now."""
        if not fsdp_param.sharded_param.requires_grad:
            return None
        if not hasattr(fsdp_param, "_unsharded_param"):
            self._group.unshard()
            self._group.wait_for_unshard()
            self._group.reshard()
        param = fsdp_param._unsharded_param
        if not param.requires_grad:  # FSDP copies requires_grad over at its next all-gather; the record needs it now
            param.requires_grad_(True)
        return param

    @property
    def root_known(self) -> bool | None:
        """Whether a root FSDP state above this group was found (None: FSDP has not initialized it yet)."""
        is_root = self._state._is_root
        return None if is_root is None else not is_root

    @property
    def reshards_after_forward(self) -> bool:
        return self._group.post_forward_mesh_info is not None

    @property
    def is_gathered(self) -> bool:
        return self._group.is_unsharded

    @property
    def gather_pending(self) -> bool:
        return self._group._all_gather_result is not None

    # ----- the backward -----
    def allow_gather_in_backward(self, allowed: bool) -> None:
        """FSDP's pre-backward hooks (on the block outputs) gather this group only when allowed."""
        self._group.unshard_in_backward = allowed

    def _unshard(self) -> None:
        group, allowed = self._group, self._group.unshard_in_backward
        group._training_state = type(group._training_state).PRE_BACKWARD  # the streams of FSDP's pre-backward
        group.unshard_in_backward = True
        try:
            group.unshard(group.unshard_async_op)
        finally:
            group.unshard_in_backward = allowed

    def prefetch(self) -> None:
        """Start the all-gather (FSDP's backward prefetch); ``gather`` waits for it."""
        if not self.is_gathered and not self.gather_pending:
            self._unshard()

    def gather(self) -> None:
        if not self.is_gathered:
            self._unshard()
            self._group.wait_for_unshard()

    def release(self) -> None:
        if self.is_gathered:
            self._group.reshard()
        elif self.gather_pending:  # a prefetch nobody used: finish it, so that no stale all-gather outlives the step
            self._group.wait_for_unshard()
            self._group.reshard()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """FSDP's post-backward function on the block's input (inside the local graph) neither reduces nor reshards
        during the lifecycle's autograd calls."""
        group = self._group
        saved = (group.reduce_grads, group.reshard_after_backward)
        group.reduce_grads = group.reshard_after_backward = False
        try:
            yield
        finally:
            group.reduce_grads, group.reshard_after_backward = saved

    def reduce(self, grads: Sequence[tuple[nn.Parameter, Tensor]]) -> None:
        """Accumulate the gradients into the unsharded ``.grad`` and run FSDP's post-backward now (reduce-scatter,
        or keep without gradient sync; reshard after backward). FSDP's end-of-backward callback runs it once more:
        it reduces whatever reaches ``.grad`` later and does nothing otherwise."""
        for param, grad in grads:
            param.grad = grad if param.grad is None else param.grad + grad
        self._group.post_backward()
        self._group._training_state = type(self._group._training_state).PRE_BACKWARD


def fsdp2_owned(model: nn.Module) -> set[int]:
    """The ids of the parameters (sharded and, once gathered, unsharded) that FSDP2 units of ``model`` manage."""
    owned: set[int] = set()
    for group in _Group.of(model):
        owned |= group.known_ids()
    return owned


def is_fsdp2(model: nn.Module) -> bool:
    """Whether some module of ``model`` is ``fully_shard``-ed (FSDP2)."""
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())


# ----- which blocks a recorded forward ran ------------------------------------------------------------------------
class _LayerWatch:
    """Forward pre-hook (and hook) of one stack layer: which layers each recorded forward of the stack ran, split
    into Highway blocks as the patch splits them (the lifecycle's calls name blocks by their index in the record)."""

    def __init__(self, lifecycle: FSDP2Lifecycle, stack_index: int, layer_index: int, after: bool):
        self.lifecycle, self.stack_index, self.layer_index, self.after = lifecycle, stack_index, layer_index, after

    def __call__(self, module, *_):
        lifecycle = self.lifecycle
        patch = lifecycle._patch_ref()
        if patch is None or patch.lifecycle is not lifecycle:  # unpatched, or replaced: the hooks go too
            lifecycle.uninstall()
        elif self.after:
            lifecycle._layer_ran(patch, self.stack_index, self.layer_index)
        else:
            lifecycle._layer_starts(patch, self.stack_index, self.layer_index)


class FSDP2Lifecycle(ParameterLifecycle):
    """The per-block parameter lifecycle of a patched model under FSDP2 (see the module docstring)."""

    per_block_parameter_step = True

    def __init__(self, patch, groups: list[_Group], fingerprint: tuple, lifecycle: str = "per_block"):
        if lifecycle not in LIFECYCLES:
            raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}.")
        self.lifecycle = lifecycle
        self.fingerprint = fingerprint
        self._patch_ref = weakref.ref(patch)  # the patch holds the lifecycle
        self._stacks = patch.hooked_stacks
        self._groups = groups
        self._layer_index: dict[int, tuple[int, int]] = {}  # id(layer module) -> (stack, layer)
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                self._layer_index[id(layer)] = (s, i)
        self._layer_groups: dict[tuple[int, int], list[_Group]] = {}
        self._layer_params: dict[tuple[int, int], list[tuple[_Group | None, object]]] = {}
        self._assign(groups)
        self._unsharded_group: dict[int, _Group] = {}  # id(unsharded param) -> its group
        self._records: dict[int, list[list[list[int]]]] = {s: [] for s in range(len(self._stacks))}
        self._open: dict[int, bool] = {s: False for s in range(len(self._stacks))}
        self._gathered_by_me: set[_Group] = set()
        self._held_back: set[_Group] = set()  # groups whose FSDP pre-backward gathering is left to the lifecycle
        self._block_layers: dict[int, set[int]] = {}  # stack -> layers of the block whose parameter step runs
        self._seen_blocks: dict[int, list[list[int]]] = {}  # stack -> the blocks its running parameter step showed
        self._handles: list = []
        self.stats = LifecycleStats()

    def _assign(self, groups: list[_Group]) -> None:
        """Which groups hold each layer's parameters, and which parameters of a layer no group manages."""
        module_layer: dict[int, tuple[int, int]] = {}
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                for module in layer.modules():
                    module_layer.setdefault(id(module), (s, i))
        managed: set[int] = set()
        for group in groups:
            managed |= group.known_ids()
            for module, fsdp_param in group.owners():
                where = module_layer.get(id(module))
                if where is None:
                    group.outside = True
                    continue
                group.layers.add(where)
                self._layer_params.setdefault(where, []).append((group, fsdp_param))
                if group not in self._layer_groups.setdefault(where, []):
                    self._layer_groups[where].append(group)
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                for param in layer.parameters():  # parameters no FSDP unit manages (fully_shard's ignored_params)
                    if id(param) not in managed:
                        self._layer_params.setdefault((s, i), []).append((None, param))

    # ----- installation ------------------------------------------------------------------------------------------
    def check_layout(self) -> None:
        """Refuse a layout the lifecycle cannot run; say which units will stay gathered through the backward."""
        for group in self._groups:
            if group.layers and not group.outside:  # a unit of the stack's own (the model's root unit holds more)
                self._check_root(group)
        spread = [g for g in self._groups if g.layers and not self._one_block(g)]
        if spread:
            names = ", ".join(f"{g.name} ({len(g.layers)} layers{', and more' if g.outside else ''})" for g in spread)
            logger.warning(
                f"Highway-BP under FSDP2: the fully_shard unit(s) {names} hold parameters of several Highway blocks: "
                "they stay gathered through the Highway backward and FSDP reduces them once at its end. For FSDP's "
                "memory, shard each layer (Accelerate: fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP)."
            )

    @property
    def _group_size(self) -> int:
        patch = self._patch_ref()
        return patch.config.group_size if patch is not None else 1

    def _one_block(self, group: _Group) -> bool:
        g = self._group_size
        return not group.outside and len({(s, i // g) for s, i in group.layers}) <= 1

    def install(self, patch) -> None:
        for s, stack in enumerate(self._stacks):
            for i, layer in enumerate(stack.layers):
                self._handles.append(layer.register_forward_pre_hook(_LayerWatch(self, s, i, after=False)))
                self._handles.append(layer.register_forward_hook(_LayerWatch(self, s, i, after=True)))
        patch.lifecycle = self
        patch.reinstall_hooks()  # the patch sees a layer's input before FSDP's hooks wrap it

    def uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._allow_gather_in_backward()

    def forward_started(self) -> None:
        """A training forward of the model starts: FSDP's own backward gathering is back for every group until a
        stack starts recording (an exact step runs FSDP's own backward)."""
        for s in self._open:
            self._open[s] = False
        self._allow_gather_in_backward()

    def _allow_gather_in_backward(self) -> None:
        for group in self._held_back:
            group.allow_gather_in_backward(True)
        self._held_back.clear()

    # ----- the forward -------------------------------------------------------------------------------------------
    def _layer_starts(self, patch, s: int, i: int) -> None:
        if not patch.is_recording(s):
            return
        records = self._records[s]
        if not self._open[s] or not records or i <= records[-1][-1][-1]:
            records.append([[i]])  # a new recorded forward of the stack: its first block
            self._open[s] = True
        elif i % patch.config.group_size == 0:
            records[-1].append([i])
        else:
            records[-1][-1].append(i)

    def _layer_ran(self, patch, s: int, i: int) -> None:
        if not self._open[s] or patch.is_recording(s):
            return
        self._open[s] = False
        if i != len(self._stacks[s]) - 1:  # the patch dropped the record (a frozen first block): not recorded after all
            self._records[s].pop()

    def block_parameters(self, stack_index: int, layers: Sequence[nn.Module]) -> list[Tensor]:
        found: dict[int, Tensor] = {}
        in_backward = not torch.is_grad_enabled()  # the patch calls it from a training forward or from the backward
        block_layers = set()
        for layer in layers:
            where = self._layer_index.get(id(layer))
            if where is None:
                raise HighwayBPError(f"Highway-BP: {type(layer).__name__} is not a layer of the patched stacks.")
            block_layers.add(where[1])
            for group, handle in self._layer_params.get(where, []):
                if group is None:
                    param = handle if handle.requires_grad else None
                else:
                    if not in_backward and not group.outside:
                        self._check_root(group, initialized=True)
                    param = group.unsharded(handle)
                    if param is not None:
                        self._unsharded_group[id(param)] = group
                if param is not None:
                    found.setdefault(id(param), param)
        if in_backward:  # the parameter step of one block (from the top): which record's backward runs
            self._block_layers[stack_index] = block_layers
            self._seen_blocks.setdefault(stack_index, []).insert(0, sorted(block_layers))
        else:  # a recorded forward starts, or checks its graph
            self._hold_back(stack_index)
        return list(found.values())

    @staticmethod
    def _check_root(group: _Group, initialized: bool = False) -> None:
        """A block's unit must lie under the model's FSDP root unit. FSDP finds the root at the first forward of the
        outermost unit, before any layer runs: a unit still uninitialized when its layer runs has no root above."""
        known = group.root_known
        if known is False or (known is None and initialized):
            raise FSDPHighwayError(
                f"Highway-BP under FSDP2: the fully_shard unit {group.name} is its own root (no fully_shard unit above "
                "it). The parameters outside the stack would not be sharded nor their gradients reduced, and "
                "Highway-BP gathers a block only inside the model's FSDP root. " + _WAY_OUT
            )

    def _hold_back(self, s: int) -> None:
        """A forward of stack ``s`` is recorded: FSDP's pre-backward hooks on the block outputs must not gather the
        blocks (the lifecycle does, one at a time). Groups holding parameters outside the stack keep FSDP's."""
        for i in range(len(self._stacks[s])):
            for group in self._layer_groups.get((s, i), []):
                if not group.outside and group not in self._held_back:
                    group.allow_gather_in_backward(False)
                    self._held_back.add(group)

    # ----- the Highway backward ----------------------------------------------------------------------------------
    def _layers_of(self, s: int, blocks: Sequence[int]) -> set[int]:
        """The layers of those blocks of the recorded forward whose backward runs (every pending one that has them,
        when several forwards of the stack wait for one backward and LayerDrop ran different layers)."""
        records = self._records[s]
        if not records:
            raise HighwayBPError(
                "Highway-BP under FSDP2: a Highway backward started for a forward that the FSDP2 lifecycle did not "
                "see. Run the forward and the backward with the same sharded model."
            )
        layers: set[int] = set()
        for record in records:
            for b in blocks:
                if b < len(record):
                    layers.update(record[b])
        return layers

    def _groups_of(self, s: int, layers: set[int]) -> list[_Group]:
        groups: dict[int, _Group] = {}
        for i in sorted(layers):
            for group in self._layer_groups.get((s, i), []):
                groups.setdefault(id(group), group)
        return list(groups.values())

    def _releases(self, group: _Group) -> bool:
        """Whether the lifecycle reshards a group right after each autograd call: a group of one block that FSDP
        reshards after the forward (else the group stays gathered until FSDP's post-backward reshards it)."""
        return self.lifecycle == "per_block" and group.reshards_after_forward and self._one_block(group)

    @contextlib.contextmanager
    def _gathered(self, s: int, blocks: Sequence[int], prefetch: Sequence[int]) -> Iterator[None]:
        groups = self._groups_of(s, self._layers_of(s, blocks))
        for group in groups:
            if not group.is_gathered and not group.gather_pending:
                self.stats.gathers += 1
            group.gather()
            self._gathered_by_me.add(group)
        self.stats.observe(self._gathered_by_me)
        if prefetch:
            for group in self._groups_of(s, self._layers_of(s, prefetch)):
                if group not in groups and not group.is_gathered and not group.gather_pending:
                    group.prefetch()
                    self.stats.prefetches += 1
                    self._gathered_by_me.add(group)
            self.stats.observe(self._gathered_by_me)
        with contextlib.ExitStack() as quiet:
            for group in groups:
                quiet.enter_context(group.quiet())
            yield
        for group in groups:
            if self._releases(group):
                group.release()
                self._gathered_by_me.discard(group)

    def gathered(self, stack_index: int, blocks: Sequence[int], prefetch: Sequence[int] = ()) -> AbstractContextManager:
        return self._gathered(stack_index, blocks, prefetch)

    def take_parameter_grads(
        self, stack_index: int, block: int, params: list[Tensor], grads: list[Tensor | None]
    ) -> list[Tensor | None]:
        block_layers = {(stack_index, i) for i in self._block_layers.pop(stack_index, set())}
        taken: list[Tensor | None] = list(grads)
        to_reduce: dict[_Group, list[tuple[nn.Parameter, Tensor]]] = {}
        for n, (param, grad) in enumerate(zip(params, grads)):
            group = self._unsharded_group.get(id(param))
            if group is None or group.outside or not group.layers <= block_layers:
                continue  # autograd delivers it; FSDP's end-of-backward callback reduces it
            to_reduce.setdefault(group, [])
            if grad is not None:
                to_reduce[group].append((param, grad))
            taken[n] = None
        for group, pairs in to_reduce.items():
            group.reduce(pairs)
            self.stats.reduces += 1
            self._gathered_by_me.discard(group)
        return taken

    def backward_finished(self, stack_index: int) -> None:
        records, seen = self._records[stack_index], self._seen_blocks.pop(stack_index, None)
        if records:  # the record whose blocks the parameter step showed (the oldest when they all look alike)
            records.pop(records.index(seen) if seen in records else 0)
        self._block_layers.pop(stack_index, None)
        if not any(self._records.values()):
            for group in list(self._gathered_by_me):
                if self._releases(group) or group.gather_pending:
                    group.release()
            self._gathered_by_me.clear()
            self._allow_gather_in_backward()


class LifecycleStats:
    """What the lifecycle did (the tests and the benchmark read it): all-gathers it started (``gathers`` waited for,
    ``prefetches`` ahead), reduces it ran, and the most groups it held gathered at once (``peak_groups``, with
    ``peak_bytes`` of their unsharded parameters)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.gathers = self.prefetches = self.reduces = 0
        self.peak_groups = self.peak_bytes = 0

    def observe(self, groups: set[_Group]) -> None:
        self.peak_groups = max(self.peak_groups, len(groups))
        self.peak_bytes = max(self.peak_bytes, sum(g.size for g in groups))


# ----- connecting a patched model --------------------------------------------------------------------------------
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # patched model -> its lifecycle's name
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # patch -> layout found to need no lifecycle


def _fingerprint(root: nn.Module, patch) -> tuple:
    """What ``connect``'s decision depends on: the module classes (``fully_shard`` and FSDP1 change them, Accelerate
    and DeepSpeed wrap), the stacks, and whether the parameters are ZeRO-3 partitioned. Cheap to compute."""
    first = next(iter(patch.hooked_stacks[0].layers[0].parameters()), None) if patch.hooked_stacks else None
    return tuple(map(type, root.modules())), len(patch.hooked_stacks), hasattr(first, "ds_id")


def connect(root: nn.Module, patch) -> None:
    """Install the FSDP2 lifecycle on the patch of ``root`` when ``root`` is sharded with FSDP2 (see the module
    docstring); refuse (``HighwayBPError``) a distributed set-up Highway-BP cannot run. Called by the patch at the
    start of every training forward; does nothing more than compare a fingerprint when nothing changed."""
    lifecycle = patch.lifecycle
    fingerprint = _fingerprint(root, patch)
    if isinstance(lifecycle, FSDP2Lifecycle) and lifecycle.fingerprint == fingerprint:
        _check_backend(patch)
        lifecycle.forward_started()
        return
    if not isinstance(lifecycle, FSDP2Lifecycle) and _PLAIN.get(patch) == fingerprint:
        return
    from .distributed_support import check_distributed_support

    check_distributed_support(root)  # FSDP1, ZeRO-3, tensor parallelism: refused
    groups = _Group.of(root)
    if not groups:
        if isinstance(lifecycle, FSDP2Lifecycle):
            lifecycle.uninstall()
            patch.lifecycle = ParameterLifecycle()
        _PLAIN[patch] = fingerprint
        return
    _check_backend(patch)
    name = _SETTINGS.get(root, lifecycle.lifecycle if isinstance(lifecycle, FSDP2Lifecycle) else "per_block")
    new = FSDP2Lifecycle(patch, groups, fingerprint, name)
    new.check_layout()
    if isinstance(lifecycle, FSDP2Lifecycle):
        lifecycle.uninstall()
    new.install(patch)


def _check_backend(patch) -> None:
    if patch.config.backend == "batched":
        raise FSDPHighwayError(
            "Highway-BP under FSDP2: backend='batched' differentiates every block at once through their stacked "
            "weights, which would need the whole stack gathered and bypasses FSDP's gradient reduction. Use "
            "backend='sequential' (or 'auto') under FSDP2."
        )


def attach(model: nn.Module, lifecycle: str | None = None) -> FSDP2Lifecycle:
    """Connect the Highway-BP patch of an FSDP2 model now (a patched model also connects itself at its first training
    forward: this call is optional) and return its lifecycle; ``lifecycle`` sets it (``set_lifecycle``). Raises
    ``HighwayBPError`` on a model that is not patched or not sharded with FSDP2, or that cannot run."""
    from .api import highway_state, is_patched, unwrap_model

    target = unwrap_model(model)
    if not is_patched(target):
        raise HighwayBPError(
            "hf_hwbp.fsdp.attach: the model is not patched for Highway-BP. Call hf_hwbp.patch_model(model, k) (before "
            "or after fully_shard); a patched model connects itself to FSDP2 at its first training forward."
        )
    if not is_fsdp2(target):
        raise FSDPHighwayError(
            "hf_hwbp.fsdp.attach: no module of the model is sharded with FSDP2 (torch.distributed.fsdp.fully_shard). "
            + _WAY_OUT
        )
    if lifecycle is not None:
        set_lifecycle(target, lifecycle)
    patch = highway_state(target)
    connect(target, patch)
    return patch.lifecycle


def set_lifecycle(model: nn.Module, lifecycle: str) -> None:
    """Choose how a patched FSDP2 model's Highway backward holds the blocks' parameters: ``"per_block"`` (the
    default: FSDP's memory, more all-gathers) or ``"keep_gathered"`` (FSDP's all-gathers, the whole stack's unsharded
    parameters at once). Kept for the model through patching and sharding, in either order."""
    from .api import highway_state, is_patched, unwrap_model

    if lifecycle not in LIFECYCLES:
        raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}.")
    target = unwrap_model(model)
    _SETTINGS[target] = lifecycle
    if is_patched(target) and isinstance(highway_state(target).lifecycle, FSDP2Lifecycle):
        highway_state(target).lifecycle.lifecycle = lifecycle


def is_attached(model: nn.Module) -> bool:
    """Whether ``model``'s Highway-BP patch runs under FSDP2 (its lifecycle is installed)."""
    from .api import highway_state, is_patched

    return is_patched(model) and isinstance(highway_state(model).lifecycle, FSDP2Lifecycle)


__all__ = [
    "LIFECYCLES",
    "FSDP2Lifecycle",
    "FSDPHighwayError",
    "attach",
    "connect",
    "fsdp2_owned",
    "is_attached",
    "is_fsdp2",
    "set_lifecycle",
]
