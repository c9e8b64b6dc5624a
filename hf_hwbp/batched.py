"""The blocks of one Highway iteration as ONE batched call on one device: stacked weights, ``torch.func``.

This module knows nothing of transformers; ``batched_adapter`` runs it inside a patched model.

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
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import HighwayBPError


def check_deterministic(blocks: Sequence[nn.Module]) -> None:
    """Refuse blocks with an active dropout module: each batched call recomputes them. (A dropout applied by a
    function, not a module, is found by ``torch.func.vmap``, which refuses random operations.)"""
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                raise HighwayBPError(
                    "Batched Highway VJPs recompute each block's forward, which an active dropout would change: "
                    "set the dropout probabilities to 0 (or call .eval()), or use the recorded-graph engine "
                    "(hf_hwbp.patch_model with backend='sequential')."
                )


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
            raise HighwayBPError(
                "Batched VJPs need blocks of one architecture (same class and parameter shapes): use the "
                "recorded-graph engine (backend='sequential') for this stack."
            )
        check_deterministic(blocks)
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
