"""The backward half of routing: where the gradients of side outputs and of tensors a block hands on go in the
Highway backward (docs/algorithm.md, side inputs and outputs), and what the tensors the model returned get.

- A side output s_j of block j that the loss read: one VJP of all of them before the iterations adds
  (ds_j/dh_{j-1})^T g_j to e_{j-1} and gives (ds_j/dtheta)^T g_j to the parameters and side inputs directly.
- A tensor block b returns that later blocks read (T5's position bias) is their side input: it gets
  sum_j (dg_j/dz)^T delta^(k)_j, then ordinary backprop into block b.
- A returned tensor the user asked to keep the gradient of (``retain_grad()``) gets what Highway-BP(k) gives it:
  a block output h_j gets delta^(k)_j, a side output s_j gets (dh_j/ds_j)^T delta^(k)_j plus what the loss sent
  it directly. Exact at k = L, as everything else.

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


def add_grads(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def side_output_vjp(
    record: RecordedSides, extra: list[Tensor | None], wrt: list[Tensor], carried: list[Tensor], gathered: Gathered
) -> tuple[tuple, tuple]:
    """One VJP of the side outputs that got gradients, with respect to their blocks' inputs, the parameters, the
    side inputs and the carried tensors (a later block's attention map reads the position bias an earlier block
    handed on): adds (ds_j/dh_{j-1})^T g_j to ``extra[j - 1]``; returns the direct gradients of ``wrt`` and of
    ``carried``."""
    indices = sorted(record.side_grads)
    blocks = sorted({record.side_outputs[i][0] for i in indices})
    wants_input = [b > 0 or record.input_requires_grad for b in blocks]
    targets = [record.inputs[b] for b, wanted in zip(blocks, wants_input) if wanted] + wrt + carried
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
            extra[b] = add_grads(extra[b], grads[position])
            position += 1
    return grads[position : position + len(wrt)], grads[position + len(wrt) :]


def carried_into_blocks(
    record: RecordedSides,
    carried_grads: Sequence[Tensor | None],
    grads: tuple,
    input_grad: Tensor | None,
    wrt: list[Tensor],
    gathered: Gathered,
) -> tuple[tuple, Tensor | None]:
    """Ordinary backprop of the carried tensors' gradients into the blocks that returned them: their parameters and
    side inputs (added to ``grads``, in the order of ``wrt``) and h_0 when block 1 returned one. Returns
    ``(grads, input_grad)`` with that added. A carried tensor that depends on a later block's hidden state would
    feed the iteration it depends on: refused."""
    pairs = [(record.side_outputs[side], g) for (side, _), g in zip(record.carried, carried_grads) if g is not None]
    if not pairs:
        return grads, input_grad
    blocks = sorted({block for (block, _), _ in pairs})
    with_input = [b for b in blocks if b > 0 or record.input_requires_grad]
    with gathered(blocks, []):
        below = torch.autograd.grad(
            [s for (_, s), _ in pairs],
            [record.inputs[b] for b in with_input] + wrt,
            [g for _, g in pairs],
            retain_graph=True,
            allow_unused=True,
        )
    for b, g in zip(with_input, below):
        if g is None:
            continue
        if b > 0:
            raise HighwayBPError(
                f"Highway-BP: block {b} of {record.path} returns a tensor that the blocks above it read and that "
                "depends on its hidden state: its gradient would feed the Highway iteration it depends on. Train "
                "this model with ordinary backprop (unpatch_model(model))."
            )
        input_grad = add_grads(input_grad, g)
    return tuple(add_grads(a, b) for a, b in zip(grads, below[len(with_input) :])), input_grad


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
