"""The blocks of one Highway iteration as ONE batched call on one device: stacked weights, ``torch.func``.

Highway-BP's input-VJPs of one iteration are independent of each other: on an accelerator that a single block
under-uses (small batch, deep stack), they can run as one call over the blocks' stacked weights instead of L
calls one after the other. ``BatchedStack`` is a ``HighwayStack`` for ``hf_hwbp.engine.run_recursion`` whose
inflow is that call: ``torch.func.vmap`` over the block index of ``torch.func.vjp`` of
``torch.func.functional_call`` (the blocks must share one architecture). The recursion, the reuse of final
deltas (only blocks 1..fresh_until are recomputed, as a slice of the stack) and the adaptive stop are the
engine's; the scan is a reverse cumulative sum along the stacked block dimension.

It keeps no autograd graph: each batched call recomputes the blocks' forwards from their recorded inputs
(one forward + one input-VJP per iteration, batched), and the parameter step is one more batched VJP with
respect to the stacked weights. So it needs blocks whose forward is deterministic (no active dropout) and the
blocks' weights as they were in the forward (restack with ``refresh()`` after an optimizer step).

    stack = BatchedStack(layers, block_inputs, d, layer_kwargs)
    delta, iterations = run_recursion(stack, k)
    stack.accumulate_param_grads(delta)                       # .grad of every block's parameters
    input_grad = delta[0]                                     # for the embeddings
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary
from transformers.cache_utils import Cache
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _check_deterministic(blocks: Sequence[nn.Module]) -> None:
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                raise ValueError(
                    "Batched Highway VJPs recompute each block's forward, which an active dropout would change: "
                    "set the dropout probabilities to 0 (or call .eval()), or use the recorded-graph engine "
                    "(hf_hwbp.patch_model)."
                )
        dropout = getattr(getattr(block, "attn", None), "attn_dropout", None)  # GPT-2 attention dropout
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            raise ValueError("Batched Highway VJPs need attention dropout 0 (it is recomputed).")


class BatchedBlocks:
    """L blocks of one architecture as one function of stacked weights.

    Args:
        blocks: the blocks, bottom to top (same class and parameter shapes).
        kwargs: the side inputs every block receives (masks, position ids / embeddings), shared by all.
    """

    def __init__(self, blocks: Sequence[nn.Module], kwargs: dict | None = None):
        blocks = list(blocks)
        if not blocks:
            raise ValueError("BatchedBlocks needs at least one block.")
        kinds = {type(b) for b in blocks}
        shapes = {tuple((n, tuple(p.shape)) for n, p in b.named_parameters()) for b in blocks}
        if len(kinds) > 1 or len(shapes) > 1:
            raise ValueError("Batched VJPs need blocks of one architecture (same class and parameter shapes).")
        _check_deterministic(blocks)
        self.blocks = blocks
        self.kwargs = dict(kwargs or {})
        self.template = copy.deepcopy(blocks[0]).to("meta")
        self.names = [n for n, p in blocks[0].named_parameters() if p.requires_grad]
        self.refresh()

    def refresh(self) -> None:
        """Restack the blocks' current weights (after an optimizer step)."""
        named = [dict(_named_tensors(b)) for b in self.blocks]
        with torch.no_grad():
            self.params = {n: torch.stack([t[n] for t in named]) for n in self.names}
            self.frozen = {n: torch.stack([t[n] for t in named]) for n in _frozen_names(self.blocks[0], self.names)}

    def _call(self, params: dict, frozen: dict, x: Tensor) -> Tensor:
        out = torch.func.functional_call(self.template, {**params, **frozen}, (x,), self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def input_vjps(self, inputs: Tensor, grads: Tensor, blocks: slice = slice(None)) -> Tensor:
        """J_j^T grads[j] (the block's input-VJP minus the identity path) for the blocks in ``blocks``, in one
        batched call. ``inputs[j]`` is block j's input (stacked along dim 0), ``grads[j]`` its output gradient."""
        params = {n: p[blocks] for n, p in self.params.items()}
        frozen = {n: t[blocks] for n, t in self.frozen.items()}

        def one(p, f, x, g):
            _, pullback = torch.func.vjp(lambda inp: self._call(p, f, inp), x)
            return pullback(g)[0] - g

        return torch.func.vmap(one)(params, frozen, inputs, grads)

    def param_vjps(self, inputs: Tensor, grads: Tensor) -> dict[str, Tensor]:
        """(dg_j/dtheta_j)^T grads[j] for every block, stacked: name -> [L, *shape]."""

        def one(p, f, x, g):
            _, pullback = torch.func.vjp(lambda q: self._call(q, f, x), p)
            return pullback(g)[0]

        return torch.func.vmap(one)(self.params, self.frozen, inputs, grads)


def _named_tensors(block: nn.Module):
    yield from block.named_parameters()
    yield from block.named_buffers()


def _frozen_names(block: nn.Module, trainable: list[str]) -> list[str]:
    """Buffers and frozen parameters: stacked too, but not differentiated."""
    return [n for n, _ in _named_tensors(block) if n not in trainable]


class BatchedStack:
    """A ``HighwayStack`` (see ``hf_hwbp.engine``) whose inflow is one batched VJP over all blocks.

    Containers: the deltas are one tensor ``[L + 1, *state]`` (delta_0 .. delta_L); the inflow one tensor
    ``[L, *state]`` (inflow[i] reaches the state h_i).

    Args:
        blocks: the L blocks, bottom to top (one architecture), or a ``BatchedBlocks``.
        inputs: ``[L, *state]``, block j's input h_{j-1} as recorded in the forward (no graph needed).
        d: the gradient at the stack output.
        kwargs: the side inputs of every block (ignored when ``blocks`` is a ``BatchedBlocks``).
        need_input_grad: whether delta_0 is wanted (if not, block 1's VJP is skipped).
        extra_grads: e_i for i = 0..L-1, a gradient reaching the state h_i from outside the stack (None: none).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module] | BatchedBlocks,
        inputs: Tensor,
        d: Tensor,
        kwargs: dict | None = None,
        *,
        need_input_grad: bool = True,
        extra_grads: Sequence[Tensor | None] | None = None,
    ):
        self.batched = blocks if isinstance(blocks, BatchedBlocks) else BatchedBlocks(blocks, kwargs)
        self.inputs = inputs.detach()
        self.d = d
        self.num_blocks = inputs.shape[0]
        self.need_input_grad = need_input_grad
        self.extra: Tensor | None = None
        if extra_grads is not None and any(e is not None for e in extra_grads):
            self.extra = torch.stack([torch.zeros_like(d) if e is None else e for e in extra_grads])
        self._previous: Tensor | None = None  # the last input-VJPs: their top part is reused once deltas are final

    def inflow(self, delta: Tensor, fresh_until: int, release: bool) -> Tensor:
        first = 0 if self.need_input_grad else 1  # J_1^T delta_1 feeds delta_0 only
        fresh = slice(first, fresh_until)
        flow = torch.zeros_like(self.inputs) if self._previous is None else self._previous.clone()
        if fresh_until > first:
            flow[fresh] = self.batched.input_vjps(self.inputs[fresh], delta[1:][fresh], fresh)
        self._previous = flow
        return flow if self.extra is None else flow + self.extra

    def scan(self, inflow: Tensor | None) -> Tensor:
        d = self.d.unsqueeze(0)
        if inflow is None:
            if self.extra is not None:
                return self.scan(self.extra)
            return d.expand(self.num_blocks + 1, *self.d.shape).clone()
        below = inflow.flip(0).cumsum(0).flip(0)  # below[i] = sum of inflow[i..L-1]
        return torch.cat([below + d, d])

    def squared_change(self, new: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
        return (new - old).double().pow(2).sum(), new.double().pow(2).sum()

    def param_grads(self, delta: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
        """(dg_j/dtheta_j)^T delta_j for each of ``params`` (the blocks' trainable parameters, in any order), in
        one batched call; None for a tensor that is no block's trainable parameter. Returned, never written to
        ``.grad``: the caller hands them to autograd."""
        if not params:
            return []
        grads = self.batched.param_vjps(self.inputs, delta[1:])
        by_id = {}
        for name, stacked in grads.items():
            for block, g in zip(self.batched.blocks, stacked):
                by_id[id(block.get_parameter(name))] = g
        return [by_id.get(id(p)) for p in params]

    def accumulate_param_grads(self, delta: Tensor) -> None:
        """Add (dg_j/dtheta_j)^T delta_j to ``.grad`` of every block's trainable parameters (one batched call)."""
        grads = self.batched.param_vjps(self.inputs, delta[1:])
        for name, stacked in grads.items():
            for block, g in zip(self.batched.blocks, stacked):
                p = block.get_parameter(name)
                p.grad = g.clone() if p.grad is None else p.grad + g


# ----- the backend in the user's path (``HighwayConfig.backend``) ---------------------------------------------
_said: set[str] = set()


def _say_once(message: str, *, warn: bool = True) -> None:
    """Log ``message`` once per process: a warning where the backend asked for is not what runs, else info."""
    if message not in _said:
        _said.add(message)
        (logger.warning if warn else logger.info)(message)


class _SideInputCapture:
    """A forward pre-hook (after the patch's own) that keeps each block's call arguments apart from the hidden
    state, keyed by the block's recorded input leaf: the batched backend recomputes the blocks with them. Held
    weakly by that leaf, so nothing outlives the step's record."""

    def __init__(self) -> None:
        self.calls = WeakIdKeyDictionary()
        self.signatures: dict[type, inspect.Signature] = {}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        signature = self.signatures.get(type(module))
        if signature is None:
            signature = self.signatures[type(module)] = inspect.signature(module.forward)
        try:
            bound = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return None
        names = list(bound)
        if not names:
            return None
        hidden = bound[names[0]]
        others: dict = {}
        for name in names[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                others.update(bound[name])
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if bound[name]:
                    return None
            else:
                others[name] = bound[name]
        others = {n: _without_empty_cache(module, v) for n, v in others.items()}
        if isinstance(hidden, Tensor):
            self.calls[hidden] = (module, (), others)
        return None


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


_CAPTURE_ATTR = "_hwbp_batched_capture"


def _capture_of(layers: Sequence[nn.Module]) -> _SideInputCapture | None:
    """The capture hook of these layers; installed on first use (that step then runs sequentially)."""
    capture = getattr(layers[0], _CAPTURE_ATTR, None)
    if capture is not None and all(getattr(layer, _CAPTURE_ATTR, None) is capture for layer in layers):
        return capture
    capture = _SideInputCapture()
    for layer in layers:
        layer.register_forward_pre_hook(capture, with_kwargs=True)
        setattr(layer, _CAPTURE_ATTR, capture)
    return None


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


def _why_not(record, calls) -> str | None:
    """Why this recorded stack forward cannot run batched (None: it can)."""
    stack, config = record.stack, record.config
    if config.group_size > 1:
        return "group_size > 1"
    if stack.residual_gate is not None:
        return "a gated residual path"
    if record.side_outputs or record.side_grads or record.carried:
        return "side outputs (attentions, router logits, tensors handed on)"
    if record.side_leaves:
        return "side inputs that require grad"
    layers = stack.layers[record.first_layer :]
    if len(record.inputs) != len(layers) or len(record.outputs) != len(layers):
        return "skipped layers (LayerDrop)"
    if calls is None or any(c is None for c in calls):
        return "the blocks' side inputs are captured from the next forward on"
    if any(c[0] is not layer for c, layer in zip(calls, layers)):
        return "the blocks ran out of order"
    _, rest, kwargs = calls[0]
    if not all(_plain(v) for v in (*rest, *kwargs.values())):
        return "side inputs it cannot share (a cache object or similar)"
    for _, other_rest, other_kwargs in calls[1:]:
        if not _same(rest, other_rest) or kwargs.keys() != other_kwargs.keys():
            return "blocks with different side inputs"
        if not all(_same(kwargs[n], other_kwargs[n]) for n in kwargs):
            return "blocks with different side inputs"
    try:
        _check_deterministic(layers)
    except ValueError:
        return "active dropout (a recomputation would redraw it)"
    kinds = {type(b) for b in layers}
    shapes = {tuple((n, tuple(p.shape), p.requires_grad) for n, p in b.named_parameters()) for b in layers}
    if len(kinds) > 1 or len(shapes) > 1:
        return "blocks of different classes or parameter shapes"
    trainable = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
    if {id(p) for p in record.params} != trainable:
        return "parameters shared between blocks or outside them"
    return None


def batched_stack(record, d: Tensor, extra: Sequence[Tensor | None]) -> BatchedStack | None:
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
    layers = record.stack.layers[record.first_layer :]
    capture = _capture_of(record.stack.layers)
    calls = None if capture is None else [capture.calls.get(x) for x in record.inputs]
    reason = _why_not(record, calls)
    if reason is not None:
        _say_once(f"Highway-BP: backend 'batched' falls back to sequential for {path}: {reason}.")
        return None
    _, rest, kwargs = calls[0]
    if rest:
        _say_once(f"Highway-BP: backend 'batched' falls back to sequential for {path}: positional side inputs.")
        return None
    _say_once(
        f"Highway-BP: backend 'batched' runs {path} ({len(layers)} blocks) as one call per iteration.", warn=False
    )
    inputs = torch.stack([x.detach() for x in record.inputs])
    return BatchedStack(
        BatchedBlocks(layers, kwargs), inputs, d, need_input_grad=record.input_requires_grad, extra_grads=extra
    )
