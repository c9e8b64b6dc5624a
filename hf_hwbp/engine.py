"""The Highway-BP(k) backward for a stack of recorded blocks. Knows nothing of transformers.

A block j (1..L) was run in the forward on an input tensor ``x_{j-1}`` and produced ``y_j`` with its own
autograd graph ("local graph"); nothing links the local graphs to each other. From the gradient ``d`` at
the stack output (and optional gradients ``e_j`` that reach intermediate states from outside), the engine
runs Theorem 2 of ALGORITHM.md:

    delta^(0)_i   = d + sum_{j=i..L-1} e_j                         (i = 0..L)
    delta^(n+1)_i = delta^(0)_i + sum_{j=i+1..L} J_j^T delta^(n)_j  (i = 0..L-1),  delta^(n+1)_L = d

where ``J_j^T v`` is the input-VJP of block j minus ``v`` (block j is ``x + g_j(x)``; the subtraction
makes the recursion exact for any block, residual or not). The L VJPs of one iteration are independent of
each other (that is the parallelism); here they run one after the other, sweeping j = L..1 so that the
reverse cumulative sum and the update need only L + 1 gradient tensors in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HighwayResult:
    """What one Highway backward produced.

    Attributes:
        input_grad: delta^(k)_0, the gradient for the stack input (None when not requested).
        param_grads: the gradients of the given parameters, in their order (None for one no block uses).
        iterations: the number of Highway iterations actually run (<= k, fewer with ``tol``).
        block_grads: delta^(k)_j for j = 1..L (only when ``keep_block_grads=True``; used by tests and the
            fidelity metrics).
    """

    input_grad: Tensor | None
    param_grads: tuple[Tensor | None, ...]
    iterations: int
    block_grads: list[Tensor] | None = None


def _input_vjp(output: Tensor, inp: Tensor, grad: Tensor) -> Tensor:
    """J^T grad for the block output = inp + g(inp): the full input-VJP minus the identity path."""
    (full,) = torch.autograd.grad(output, inp, grad, retain_graph=True)
    return full - grad


def highway_iterations(
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    d: Tensor,
    extra_grads: Sequence[Tensor | None] | None = None,
    *,
    k: int,
    tol: float | None = None,
    need_input_grad: bool = True,
) -> tuple[list[Tensor], int]:
    """Run k Highway iterations; return [delta^(k)_0, ..., delta^(k)_L] and the iterations run.

    ``extra_grads[j]`` (j = 0..L-1) is e_j, a gradient reaching the state h_j from outside the stack (None
    for none). The local graphs are retained: the parameter step still needs them.
    """
    num_blocks = len(outputs)
    if len(inputs) != num_blocks:
        raise ValueError(f"Got {len(inputs)} block inputs for {num_blocks} block outputs.")
    k = min(k, num_blocks)
    # base[i] = delta^(0)_i = d + sum_{j >= i} e_j. Without extra gradients every entry is `d` itself.
    base: list[Tensor] = [d] * (num_blocks + 1)
    if extra_grads is not None:
        running = d
        for i in range(num_blocks - 1, -1, -1):
            e = extra_grads[i] if i < len(extra_grads) else None
            if e is not None:
                running = running + e
            base[i] = running
    delta = list(base)
    iterations = 0
    for _ in range(k):
        suffix: Tensor | None = None  # sum_{m >= j} J_m^T delta^(n)_m, built from the top down
        pending = delta[num_blocks]  # delta^(n+1)_L = d
        change_sq = torch.zeros((), dtype=torch.float64, device=d.device)
        norm_sq = torch.zeros((), dtype=torch.float64, device=d.device)
        for j in range(num_blocks, 0, -1):  # block j reads inputs[j-1] and wrote outputs[j-1]
            if j > 1 or need_input_grad:  # delta_0 feeds no block: skip its VJP when nobody wants it
                v = _input_vjp(outputs[j - 1], inputs[j - 1], delta[j])  # uses delta^(n)_j
                suffix = v if suffix is None else suffix + v
            if tol is not None:
                change_sq += (pending - delta[j]).double().pow(2).sum()
                norm_sq += pending.double().pow(2).sum()
            delta[j] = pending  # delta^(n)_j has been used: replace it by delta^(n+1)_j
            pending = base[j - 1] if suffix is None else base[j - 1] + suffix
        if tol is not None:
            change_sq += (pending - delta[0]).double().pow(2).sum()
            norm_sq += pending.double().pow(2).sum()
        delta[0] = pending
        iterations += 1
        if tol is not None and change_sq.sqrt() <= tol * norm_sq.sqrt():
            break
    return delta, iterations


def highway_backward(
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    params: Sequence[Tensor],
    d: Tensor,
    extra_grads: Sequence[Tensor | None] | None = None,
    *,
    k: int,
    tol: float | None = None,
    need_input_grad: bool = True,
    keep_block_grads: bool = False,
) -> HighwayResult:
    """Highway-BP(k): k iterations, then one parameter VJP of every block with its delta^(k)_j.

    ``params`` are the blocks' trainable parameters (each once). The parameter step is a single autograd
    call over all blocks, which frees each local graph as it goes, as ordinary backprop does.
    """
    delta, iterations = highway_iterations(
        inputs, outputs, d, extra_grads, k=k, tol=tol, need_input_grad=need_input_grad
    )
    param_grads: tuple[Tensor | None, ...] = ()
    if params:
        param_grads = torch.autograd.grad(list(outputs), list(params), delta[1:], allow_unused=True)
    return HighwayResult(
        input_grad=delta[0] if need_input_grad else None,
        param_grads=param_grads,
        iterations=iterations,
        block_grads=delta[1:] if keep_block_grads else None,
    )
