"""The backward half of routing: where the gradients of side outputs and of tensors a block hands on go in the
Highway backward (docs/algorithm.md, side inputs and outputs), and what the tensors the model returned get.

- A side output s_j of block j that the loss read: one VJP of all of them before the iterations adds
  (ds_j/dh_{j-1})^T g_j to e_{j-1} and gives (ds_j/dtheta)^T g_j to the parameters and side inputs directly.
- A tensor block b returns that later blocks read (T5's position bias) is their side input: it gets
  sum_j (dg_j/dz)^T delta^(k)_j, then ordinary backprop into block b.
- A returned tensor the user asked to keep the gradient of (``retain_grad()``) gets what Highway-BP(k) gives it:
  a block output h_j gets delta^(k)_j, a side output s_j gets (dh_j/ds_j)^T delta^(k)_j plus what the loss sent
  it directly. Exact at k = L, as everything else.

A block's state may be several streams (``record.state_input``); the gradients these functions add to a state are
flat over its streams (``engine.StatePacking``), as the engine's deltas are.

Every autograd call through a block's local graph runs inside ``gathered(blocks, prefetch)`` (``hf_hwbp.sharding``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import Tensor

from ..errors import HighwayBPError

Gathered = Callable[[list[int], list[int]], AbstractContextManager]


class RecordedSides(Protocol):
    """What this module reads of a recorded stack forward (``hf_hwbp.record._StackRecord``)."""

    inputs: list[Tensor]  # each block's input as its local graph sees it
    outputs: list[Tensor]
    input_requires_grad: bool
    side_outputs: list[tuple[int, Tensor]]  # (block, tensor in its local graph)
    side_grads: dict[int, Tensor]
    carried: list[tuple[int, Tensor]]  # (side output, the leaf later blocks read)
    path: str

    @property
    def stream_sides(self) -> dict[int, tuple[int, int]]: ...  # side outputs that are stream outputs

    @property
    def input_wanted(self) -> bool: ...  # some stream of h_0 requires grad

    def state_input(self, block: int) -> tuple[Tensor, ...]: ...  # the block's input state (hidden, *streams)


class Packing(Protocol):
    def pack(self, parts: Sequence[Tensor | None]) -> Tensor | None: ...


def add_grads(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _state_targets(record: RecordedSides, blocks: list[int]) -> list[tuple[int, list[int | None]]]:
    """For each block, the places of its input state's streams among the VJP targets (None: a stream of h_0 that
    does not require grad), numbered from 0 in block order."""
    layout, position = [], 0
    for b in blocks:
        places: list[int | None] = []
        for x in record.state_input(b):
            places.append(position if x.requires_grad else None)
            position += x.requires_grad
        layout.append((b, places))
    return layout


def _state_grads(record: RecordedSides, layout, grads: Sequence[Tensor | None], packing: Packing):
    """(block, its input state's gradient, flat over the streams) from the targets' gradients."""
    return [(b, packing.pack([None if p is None else grads[p] for p in places])) for b, places in layout]


def side_output_vjp(
    record: RecordedSides,
    extra: list[Tensor | None],
    wrt: list[Tensor],
    carried: list[Tensor],
    gathered: Gathered,
    packing: Packing,
) -> tuple[tuple, tuple]:
    """One VJP of the side outputs that got gradients, with respect to their blocks' input states, the parameters,
    the side inputs and the carried tensors (a later block's attention map reads the position bias an earlier block
    handed on): adds (ds_j/dh_{j-1})^T g_j to ``extra[j - 1]``; returns the direct gradients of ``wrt`` and of
    ``carried``. A block's stream outputs are no side outputs here: their gradients are part of d and the e_j."""
    streams = record.stream_sides
    indices = sorted(i for i in record.side_grads if i not in streams)
    if not indices:
        return (None,) * len(wrt), (None,) * len(carried)
    blocks = sorted({record.side_outputs[i][0] for i in indices})
    layout = _state_targets(record, [b for b in blocks if b > 0 or record.input_wanted])
    inputs = [x for b, _ in layout for x in record.state_input(b) if x.requires_grad]
    targets = inputs + wrt + carried
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
    for b, g in _state_grads(record, layout, grads, packing):
        extra[b] = add_grads(extra[b], g)
    position = len(inputs)
    return grads[position : position + len(wrt)], grads[position + len(wrt) :]


def carried_into_blocks(
    record: RecordedSides,
    carried_grads: Sequence[Tensor | None],
    grads: tuple,
    input_grad: Tensor | None,
    wrt: list[Tensor],
    gathered: Gathered,
    packing: Packing,
) -> tuple[tuple, Tensor | None]:
    """Ordinary backprop of the carried tensors' gradients into the blocks that returned them: their parameters and
    side inputs (added to ``grads``, in the order of ``wrt``) and h_0 when block 1 returned one (``input_grad``,
    flat over the state's streams). Returns ``(grads, input_grad)`` with that added. A carried tensor that depends
    on a later block's hidden state would feed the iteration it depends on: refused."""
    pairs = [(record.side_outputs[side], g) for (side, _), g in zip(record.carried, carried_grads) if g is not None]
    if not pairs:
        return grads, input_grad
    blocks = sorted({block for (block, _), _ in pairs})
    layout = _state_targets(record, [b for b in blocks if b > 0 or record.input_wanted])
    inputs = [x for b, _ in layout for x in record.state_input(b) if x.requires_grad]
    with gathered(blocks, []):
        below = torch.autograd.grad(
            [s for (_, s), _ in pairs],
            inputs + wrt,
            [g for _, g in pairs],
            retain_graph=True,
            allow_unused=True,
        )
    for b, g in _state_grads(record, layout, below, packing):
        if g is None:
            continue
        if b > 0:
            raise HighwayBPError(
                f"Highway-BP: block {b} of {record.path} returns a tensor that the blocks above it read and that "
                "depends on its hidden state: its gradient would feed the Highway iteration it depends on. Train "
                "this model with ordinary backprop (unpatch_model(model))."
            )
        input_grad = add_grads(input_grad, g)
    return tuple(add_grads(a, b) for a, b in zip(grads, below[len(inputs) :])), input_grad


def give_retained(
    returned_inputs: Sequence[tuple[Tensor, Tensor]],
    returned_sides: Sequence[tuple[Tensor, Tensor | None]],
) -> None:
    """Add to ``.grad`` of each returned tensor that retains its gradient what the Highway backward gives it beyond
    the gradient autograd already delivered to it (what the loss sent it directly): ``returned_inputs`` pairs a
    returned state with (delta^(k) there minus that direct gradient), ``returned_sides`` a returned side output with
    (dh_j/ds_j)^T delta^(k)_j (None: nothing more)."""
    for tensor, more in (*returned_inputs, *returned_sides):
        if more is not None:
            tensor.grad = more if tensor.grad is None else tensor.grad + more
