"""One training step of a stage: the pipelined forward, then one of two backwards.

Forward (both methods): the first stage embeds, every stage runs its layers and sends the result to the
next; the last stage runs the head and the loss on the whole batch. Each stage cuts its autograd graph into
*segments*, one leaf input per segment: one segment per Highway block (Highway-BP) or one for the whole
stage (backprop). With ``microbatches = M > 1`` the batch goes through the forward in M slices, so that
stage s works on slice m + 1 while stage s + 1 works on slice m (the gradients do not change).

``backprop_backward``: ordinary pipeline backprop. The last stage backprops the loss through the head and
its layers and sends the gradient of its input to the stage below, which does the same, down to the
embeddings. Stage after stage: the other stages wait (with M > 1, slice by slice: the GPipe schedule).

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
    """What a stage's forward leaves for its backward (lists over micro-batches where it says [m])."""

    shape: tuple[int, int, int]  # the whole batch's activation shape
    sizes: list[int]  # micro-batch sizes along dim 0
    inputs: list[list[Tensor]]  # [segment][m]: the leaf input (requires grad)
    outputs: list[list[Tensor]]  # [segment][m]: the output, attached to the segment's local graph
    h0: list[Tensor] | None = None  # first stage, [m]: the embeddings' output (attached to their graph)
    head_input: Tensor | None = None  # last stage: a leaf holding the whole stack output
    loss: Tensor | None = None  # last stage

    def split(self, grad: Tensor) -> tuple[Tensor, ...]:
        return grad.split(self.sizes)

    def input_vjp(self, segment: int, grad: Tensor) -> Tensor:
        """J^T grad for a segment ``x + g(x)``: its input-VJP minus the identity path (graph kept)."""
        parts = [
            torch.autograd.grad(out, inp, g, retain_graph=True)[0]
            for out, inp, g in zip(self.outputs[segment], self.inputs[segment], self.split(grad))
        ]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)) - grad

    def param_vjp(self, segment: int, grad: Tensor, params: list[Tensor]) -> None:
        """Accumulate the segment's parameter gradients for output gradient ``grad`` (frees its graph)."""
        for out, g in zip(self.outputs[segment], self.split(grad)):
            torch.autograd.backward(out, g, inputs=params)

    def embeddings_backward(self, grad: Tensor) -> None:
        for h0, g in zip(self.h0, self.split(grad)):
            h0.backward(g)


def _slices(total: int, microbatches: int) -> list[slice]:
    if not 1 <= microbatches <= total:
        raise ValueError(f"microbatches must be in [1, batch size {total}], got {microbatches}.")
    base, extra = divmod(total, microbatches)
    out, start = [], 0
    for m in range(microbatches):
        size = base + (1 if m < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out


def stage_forward(
    stage: Stage,
    comm: Comm,
    input_ids: Tensor,
    labels: Tensor | None,
    attention_mask: Tensor | None,
    segments: Sequence[range],
    microbatches: int = 1,
) -> StageForward:
    """Run this stage's part of the forward; send the stage output on (not on the last stage)."""
    shape = stage.activation_shape(input_ids)
    slices = _slices(shape[0], microbatches)
    record = StageForward(
        shape=shape,
        sizes=[s.stop - s.start for s in slices],
        inputs=[[] for _ in segments],
        outputs=[[] for _ in segments],
        h0=[] if stage.is_first else None,
    )
    finals = []
    for part in slices:
        if stage.is_first:
            h = stage.embed(input_ids[part])
            record.h0.append(h)
        else:
            h = comm.recv((part.stop - part.start, *shape[1:]), stage.dtype, stage.device, stage.index - 1)
        kwargs = stage.layer_kwargs(h, attention_mask[part] if attention_mask is not None else None)
        for i, segment in enumerate(segments):
            x = h.detach().requires_grad_(True)
            h = stage.run_layers(x, segment, kwargs)
            record.inputs[i].append(x)
            record.outputs[i].append(h)
        if stage.is_last:
            finals.append(h.detach())
        else:
            comm.send(h, stage.index + 1)
    if not stage.is_last:
        return record
    if labels is None:
        raise ValueError("The last stage needs `labels` to compute the loss.")
    record.head_input = (finals[0] if len(finals) == 1 else torch.cat(finals)).requires_grad_(True)
    record.loss = stage.loss(stage.logits(record.head_input), labels)
    return record


def _head_backward(record: StageForward) -> Tensor:
    """Backprop the loss through the head (last stage): the head's parameter gradients and d."""
    record.loss.backward()
    return record.head_input.grad


def backprop_backward(stage: Stage, comm: Comm, record: StageForward) -> None:
    """Ordinary pipeline backprop (GPipe order with micro-batches) for a stage whose forward ran as one segment."""
    if len(record.outputs) != 1:
        raise ValueError("Pipeline backprop needs the stage's forward as one segment.")
    d_parts = record.split(_head_backward(record)) if stage.is_last else None
    for m, size in enumerate(record.sizes):
        if stage.is_last:
            grad = d_parts[m]
        else:
            grad = comm.recv((size, *record.shape[1:]), stage.dtype, stage.device, stage.index + 1)
        torch.autograd.backward(record.outputs[0][m], grad)  # parameters and the input leaf
        input_grad = record.inputs[0][m].grad
        if not stage.is_first:
            comm.send(input_grad, stage.index - 1)
        elif record.h0[m].requires_grad:
            record.h0[m].backward(input_grad)


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
    need_input_grad = record.h0[0].requires_grad if stage.is_first else True
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
                vjps[i] = record.input_vjp(i, deltas[i])
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
            record.param_vjp(i, deltas[i], params)
    if stage.is_first and need_input_grad:
        record.embeddings_backward(delta_in)
    return iterations
