"""One training step of a stage: the pipelined forward, then one of two backwards.

Forward (both methods): the first stage embeds, every stage runs its layers and sends the result to the
next; the last stage runs the head and the loss. Each stage cuts its autograd graph into *segments*, one
leaf input per segment: one segment per Highway block (Highway-BP) or one for the whole stage (backprop).

``backprop_backward``: ordinary pipeline backprop. The last stage backprops the loss through the head and
its layers and sends the gradient of its input to the stage below, which does the same, down to the
embeddings. Stage after stage: the other stages wait.

``highway_backward``: Highway-BP(k) (ALGORITHM.md, Theorem 2) with every stage working at the same time.
The last stage backprops the loss through the head only: d = dloss/dh_L, broadcast to every stage. Then
k times: every stage runs the input-VJPs of its own blocks (concurrently with the others) and sums them,
T_s = sum_{j in s} J_j^T delta^(n)_j; one exclusive suffix scan over the stages gives each stage
E_s = sum_{s' > s} T_{s'} (the only tensor that crosses between ranks), and the stage updates, for its block
outputs i (top down),

    delta^(n+1)_i = d + E_s + sum_{j in s, j > i} J_j^T delta^(n)_j.

Finally every stage runs the parameter VJP of each block with delta^(k)_j, and the first stage sends
delta^(k)_0 into the embeddings. delta^(n)_j stops changing once n >= N - j (N blocks in all): its VJP is
then reused rather than recomputed, which changes nothing but the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .comm import Comm
from .stages import Stage


@dataclass
class StageForward:
    """What a stage's forward leaves for its backward."""

    shape: tuple[int, int, int]
    inputs: list[Tensor]  # one leaf per segment (requires grad)
    outputs: list[Tensor]  # each segment's output, attached to its local graph
    h0: Tensor | None = None  # first stage: the embeddings' output (attached to their graph)
    head_input: Tensor | None = None  # last stage: a leaf holding the stack output
    loss: Tensor | None = None  # last stage


def stage_forward(
    stage: Stage,
    comm: Comm,
    input_ids: Tensor,
    labels: Tensor | None,
    attention_mask: Tensor | None,
    segments: Sequence[range],
) -> StageForward:
    """Run this stage's part of the forward; send the stage output on (not on the last stage)."""
    shape = stage.activation_shape(input_ids)
    h0 = None
    if stage.is_first:
        h = h0 = stage.embed(input_ids)
    else:
        h = comm.recv(shape, stage.dtype, stage.device, stage.index - 1)
    kwargs = stage.layer_kwargs(h, attention_mask)
    record = StageForward(shape=shape, inputs=[], outputs=[], h0=h0)
    for segment in segments:
        x = h.detach().requires_grad_(True)
        h = stage.run_layers(x, segment, kwargs)
        record.inputs.append(x)
        record.outputs.append(h)
    if not stage.is_last:
        comm.send(h, stage.index + 1)
        return record
    if labels is None:
        raise ValueError("The last stage needs `labels` to compute the loss.")
    record.head_input = h.detach().requires_grad_(True)
    record.loss = stage.loss(stage.logits(record.head_input), labels)
    return record


def _head_backward(record: StageForward) -> Tensor:
    """Backprop the loss through the head (last stage): the head's parameter gradients and d."""
    record.loss.backward()
    return record.head_input.grad


def backprop_backward(stage: Stage, comm: Comm, record: StageForward) -> None:
    """Ordinary pipeline backprop for a stage whose forward ran as one segment."""
    if len(record.outputs) != 1:
        raise ValueError("Pipeline backprop needs the stage's forward as one segment.")
    if stage.is_last:
        grad = _head_backward(record)
    else:
        grad = comm.recv(record.shape, stage.dtype, stage.device, stage.index + 1)
    torch.autograd.backward(record.outputs[0], grad)  # parameters and the input leaf
    input_grad = record.inputs[0].grad
    if not stage.is_first:
        comm.send(input_grad, stage.index - 1)
    elif record.h0.requires_grad:
        record.h0.backward(input_grad)


def highway_backward(
    stage: Stage,
    comm: Comm,
    record: StageForward,
    *,
    k: int,
    scan: str = "chain",
    tol: float | None = None,
) -> int:
    """Layer-parallel Highway-BP(k) for a stage whose forward ran one segment per Highway block.

    Returns the number of Highway iterations run (k clamped to the number of blocks; fewer with ``tol``).
    """
    num_blocks = stage.layout.num_blocks
    local = len(record.outputs)
    first = stage.first_block + 1  # global 1-based index of local block 0 (ALGORITHM.md numbering)
    d = _head_backward(record) if stage.is_last else None
    d = comm.broadcast(d, record.shape, stage.dtype, stage.device, src=stage.num_stages - 1)
    need_input_grad = record.h0.requires_grad if stage.is_first else True
    deltas = [d] * local  # delta^(n)_j for this stage's block outputs
    delta_in = d  # delta^(n) at the stage input (delta_0 on the first stage)
    vjps: list[Tensor | None] = [None] * local
    iterations = 0
    for n in range(min(k, num_blocks)):
        total = None
        for i in range(local - 1, -1, -1):
            if i == 0 and not need_input_grad:
                continue  # J_1^T delta_1 only feeds delta_0, which nobody wants
            if vjps[i] is None or n <= num_blocks - (first + i):  # delta^(n)_j changed since the last VJP
                (full,) = torch.autograd.grad(record.outputs[i], record.inputs[i], deltas[i], retain_graph=True)
                vjps[i] = full - deltas[i]
            total = vjps[i] if total is None else total + vjps[i]
        if total is None:
            total = torch.zeros_like(d)
        later = comm.exclusive_suffix_sum(total, scan)
        running = d if stage.is_last else d + later
        new = [d] * local
        for i in range(local - 1, -1, -1):
            new[i] = running
            if vjps[i] is not None:
                running = running + vjps[i]
        stop = False
        if tol is not None:
            stats = torch.zeros(2, dtype=torch.float64, device=d.device)
            pairs = list(zip(new, deltas)) + ([(running, delta_in)] if stage.is_first else [])
            for fresh, old in pairs:
                stats[0] += (fresh - old).double().pow(2).sum()
                stats[1] += fresh.double().pow(2).sum()
            comm.all_reduce_sum(stats)
            stop = bool(stats[0].sqrt() <= tol * stats[1].sqrt())
        deltas, delta_in = new, running
        iterations += 1
        if stop:
            break
    for i, params in enumerate(stage.block_parameters()):
        if params:
            torch.autograd.backward(record.outputs[i], deltas[i], inputs=params)
    if stage.is_first and record.h0.requires_grad:
        record.h0.backward(delta_in)
    return iterations
