"""One recurrent layer through time as a ``HighwayStack`` for the engine's ``run_recursion``.

Time step t is block t (it maps h_{t-1} to h_t), so the stack has T blocks, and its containers are stacked
tensors: deltas [T + 1, *state] (delta_0..delta_T), inflows [T, *state] (entry i flows into delta_i). An inflow
is every step's input-only VJP J_{i+1}^T delta_{i+1} at once, plus the gradients e_i that the per-step outputs
receive from the loss; the scan is the reverse linear scan along the gated residual path.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .scan import ReverseLinearScan


class StepDerivatives(Protocol):
    """What the stack needs from a cell: J_t^T applied to a prefix of the steps at once."""

    def hidden_vjp(self, grad: Tensor, out: Tensor | None = None) -> Tensor: ...


class TimeStack:
    """The T steps of one recurrent layer.

    Args:
        steps: the cell's local derivatives (``hidden_vjp`` computes J_t^T for a prefix of the steps).
        scan: the reverse linear scan with the forward's gates as coefficients.
        top: delta_T, the gradient at the last state from outside (final-state loss plus the last output's).
        output_grads: [T, *state], ``output_grads[t - 1]`` is the gradient the loss sends to output t (the state
            h_t); the last row is not read (it belongs in ``top``). So e_0 = 0 (the initial state is read by
            nothing else) and e_t = output_grads[t - 1] for t = 1..T-1.
    """

    def __init__(self, steps: StepDerivatives, scan: ReverseLinearScan, top: Tensor, output_grads: Tensor):
        self.steps = steps
        self.scan_along = scan
        self.top = top
        self.output_grads = output_grads
        self.num_blocks = scan.num_steps
        self._inflow: Tensor | None = None  # kept between calls: entries of blocks whose delta is final are reused
        self._spare: Tensor | None = None  # a released delta: the next scan writes into it

    def _inflow_buffer(self) -> Tensor:
        if self._inflow is None:
            self._inflow = torch.empty_like(self.output_grads, memory_format=torch.contiguous_format)
        return self._inflow

    def inflow(self, delta: Tensor, fresh_until: int, release: bool) -> Tensor:
        """e_i + J_{i+1}^T delta_{i+1}; blocks above ``fresh_until`` keep the previous call's entries."""
        if self._inflow is None and fresh_until < self.num_blocks:
            raise RuntimeError("TimeStack.inflow: the first call must compute every block (fresh_until = T).")
        flow = self._inflow_buffer()
        self.steps.hidden_vjp(delta[1 : fresh_until + 1], out=flow[:fresh_until])
        flow[1:fresh_until].add_(self.output_grads[: fresh_until - 1])
        if release:
            self._spare = delta
        return flow

    def scan(self, inflow: Tensor | None) -> Tensor:
        if inflow is None:  # delta^(0): the e_i alone
            inflow = self._inflow_buffer()
            inflow[0].zero_()
            inflow[1:] = self.output_grads[:-1]
        out, self._spare = self._spare, None
        return self.scan_along(self.top, inflow, out=out)

    def squared_change(self, new: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
        return (new - old).double().pow(2).sum(), new.double().pow(2).sum()
