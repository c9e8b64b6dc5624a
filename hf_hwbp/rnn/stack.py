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
    """What the stack needs from a cell: J_t^T applied to all steps at once."""

    def hidden_vjp(self, grad: Tensor, extra: Tensor | None = None, out: Tensor | None = None) -> Tensor: ...


class TimeStack:
    """The T steps of one recurrent layer.

    Args:
        steps: the cell's local derivatives (``hidden_vjp`` computes J_t^T for a prefix of the steps).
        scan: the reverse linear scan with the forward's gates as coefficients.
        top: delta_T, the gradient at the last state from outside (final-state loss plus the last output's).
        extra: [T, *state], ``extra[i]`` = e_i, the gradient reaching h_i from outside (e_0 is zero for a layer
            whose initial state is read by nothing else); None for none.
    """

    def __init__(self, steps: StepDerivatives, scan: ReverseLinearScan, top: Tensor, extra: Tensor | None):
        self.steps = steps
        self.scan_along = scan
        self.top = top
        self.extra = extra
        self.num_blocks = scan.num_steps
        self._inflow: Tensor | None = None  # kept between calls: entries of blocks whose delta is final are reused
        self._spare: Tensor | None = None  # a released delta: the next scan writes into it

    def inflow(self, delta: Tensor, fresh_until: int, release: bool) -> Tensor:
        """e_i + J_{i+1}^T delta_{i+1}; blocks above ``fresh_until`` keep the previous call's entries."""
        if self._inflow is None:
            if fresh_until < self.num_blocks:
                raise RuntimeError("TimeStack.inflow: the first call must compute every block (fresh_until = T).")
            self._inflow = torch.empty_like(delta[1:])
        fresh = self._inflow[:fresh_until]
        extra = None if self.extra is None else self.extra[:fresh_until]
        self.steps.hidden_vjp(delta[1 : fresh_until + 1], extra, out=fresh)
        if release:
            self._spare = delta
        return self._inflow

    def scan(self, inflow: Tensor | None) -> Tensor:
        out, self._spare = self._spare, None
        return self.scan_along(self.top, self.extra if inflow is None else inflow, out=out)

    def squared_change(self, new: Tensor, old: Tensor) -> tuple[Tensor, Tensor]:
        return (new - old).double().pow(2).sum(), new.double().pow(2).sum()
