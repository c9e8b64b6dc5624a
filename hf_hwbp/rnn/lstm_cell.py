"""The LSTM cell's local derivatives at the forward's values, and its vector-Jacobian products in closed form.

torch.nn.LSTM computes, for every step t (gates in the order i, f, g, o of its weights):

    i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
    g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)         o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
    c_t = f_t (.) c_{t-1} + i_t (.) g_t                       h_t = o_t (.) tanh(c_t)

The state through time is (h_t, c_t). c_{t-1} enters step t only through f_t (.) c_{t-1}: with the gates held at
their forward values that is the residual path R_t (c_{t-1} -> c_t by f_t, and on to h_t by o_t tanh'(c_t) f_t);
J_t is everything that starts at h_{t-1} (it crosses the gates' weights W_hh). With a gradient (dh, dc) at
(h_t, c_t), write gamma = dc + dh o_t tanh'(c_t), the whole gradient at c_t; then R_t^T (dh, dc) = (0, f_t gamma),
and the gradients at the four pre-activations (which J_t^T maps to h_{t-1} through W_hh) are

    i: gamma g i (1 - i)      f: gamma c_{t-1} f (1 - f)      g: gamma i (1 - g^2)      o: dh tanh(c_t) o (1 - o)

with factors that depend only on the forward: they are computed once for all T steps. The deltas are kept as
(dh, gamma) rather than (dh, dc), since every VJP reads gamma; the scan along R is then the linear recurrence
gamma_t = q_t dh_t + f_{t+1} gamma_{t+1} with q_t = o_t tanh'(c_t) (``LSTMTimeStack``).

The fused forward returns h_1..h_T but not the cell states: they are recomputed from the gates by a forward linear
scan (c_t = f_t c_{t-1} + i_t g_t, no Python loop over T). Layout as for the GRU: one contiguous [T, B, H] tensor
per gate, VJPs one gate at a time through a reused workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .gru_cell import PreviousStates, _rows, tanh_
from .scan import ReverseLinearScan, forward_linear_scan

GATES = 4  # i, f, g, o


@dataclass
class LSTMStepDerivatives:
    """The local derivatives of T LSTM steps (batch B, hidden H), held fixed through the Highway iterations.

    Attributes:
        factors: four [T, B, H] tensors, d(pre-activation of gate i, f, g, o) / d(gamma_t, gamma_t, gamma_t, dh_t).
        forget_gate: [T, B, H], f_t: the coefficient of the scan along R (gamma_t reaches c_{t-1} times f_t).
        cell_slope: [T, B, H], q_t = o_t tanh'(c_t): how a gradient at h_t reaches c_t.
        w_hh: [4H, H], the recurrent weight that J^T applies.
    """

    factors: tuple[Tensor, Tensor, Tensor, Tensor]
    forget_gate: Tensor
    cell_slope: Tensor
    w_hh: Tensor
    _work: Tensor | None = field(default=None, repr=False)

    @classmethod
    def recompute(
        cls,
        x: Tensor,
        previous: PreviousStates,
        c0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
        chunk: int | None = None,
    ) -> LSTMStepDerivatives:
        """One batched recompute of the gates and cell states of all steps from x [T, B, I] and h_0..h_{T-1}.

        Per-gate products and per-gate contiguous tensors: on this work's CPU (oneDNN/MKL, AVX-512), stacking the
        gates into one [T * B, 4H] product saved no time once the layout changes and the larger temporaries were
        paid for (docs/recurrent.md, "The LSTM backward at its bound").
        """
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        flat_x = _rows(x)
        w_i, w_h = _gates(w_ih), _gates(w_hh)
        pre = [torch.empty((steps, batch, hidden), dtype=x.dtype, device=x.device) for _ in range(GATES)]
        bias = None if b_ih is None else _gates(b_ih + b_hh)
        for gate, out in enumerate(pre):  # the bias rides in the input-side product (no pass of its own)
            rows = _rows(out)
            if bias is None:
                torch.mm(flat_x, w_i[gate].t(), out=rows)
            else:
                torch.addmm(bias[gate], flat_x, w_i[gate].t(), out=rows)
            previous.addmm_into(w_h[gate].t(), rows)
        i, f, g, o = pre
        i.sigmoid_(), f.sigmoid_(), tanh_(g), o.sigmoid_()
        cells = forward_linear_scan(f, torch.mul(i, g), c0, chunk)  # c_0..c_T
        one = torch.ones((), dtype=x.dtype, device=x.device)
        tanh_c = tanh_(torch.mul(cells[1:], 1))  # a copy that the in-place tanh then overwrites
        slope = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)  # q = o (1 - tanh(c)^2)
        factor_o = tanh_c.mul_(torch.addcmul(o, o, o, value=-1, out=o))  # tanh(c) o (1 - o)
        factor_g = torch.addcmul(one, g, g, value=-1, out=o).mul_(i)  # i (1 - g^2)
        factor_i = torch.addcmul(i, i, i, value=-1, out=i).mul_(g)  # g i (1 - i)
        factor_f = torch.addcmul(f, f, f, value=-1, out=g).mul_(cells[:-1])  # c_{t-1} f (1 - f)
        return cls((factor_i, factor_f, factor_g, factor_o), f, slope, w_hh)

    def _gate_grad(self, grad: Tensor, factor: Tensor) -> Tensor:
        """grad * factor for the first len(grad) steps, in the reused workspace, as [n * B, H] rows."""
        if self._work is None:
            self._work = torch.empty_like(self.forget_gate)
        steps = grad.shape[0]
        return _rows(torch.mul(grad, factor[:steps], out=self._work[:steps]))

    def _pre_grads(self, dh: Tensor, gamma: Tensor):
        """(gate, gradient at its pre-activation as rows) for the four gates, one at a time (shared workspace)."""
        for gate in range(GATES):
            yield gate, self._gate_grad(dh if gate == 3 else gamma, self.factors[gate])

    def hidden_vjp(self, dh: Tensor, gamma: Tensor, out: Tensor | None = None) -> Tensor:
        """J_t^T (dh_t, gamma_t) for the first len(dh) steps: the gradient at h_{t-1}, [n, B, H]."""
        steps, batch, hidden = dh.shape
        w_h = _gates(self.w_hh)
        result = None if out is None else _rows(out)
        for gate, pre in self._pre_grads(dh, gamma):
            result = torch.mm(pre, w_h[gate], out=result) if gate == 0 else result.addmm_(pre, w_h[gate])
        return result.view(steps, batch, hidden)

    def parameter_and_input_grads(
        self,
        dh: Tensor,
        gamma: Tensor,
        x: Tensor,
        previous: PreviousStates,
        w_ih: Tensor,
        *,
        need_input: bool,
        need_bias: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Sum over t of the local VJPs of step t with (dh_t, gamma_t): (x grad, W_ih, W_hh, b_ih, b_hh grads)."""
        hidden = dh.shape[-1]
        flat_x = _rows(x)
        w_i = _gates(w_ih)
        grad_w_ih = torch.empty_like(w_ih)
        grad_w_hh = torch.empty_like(self.w_hh)
        grad_b = torch.empty(GATES * hidden, dtype=dh.dtype, device=dh.device) if need_bias else None
        grad_x = torch.zeros_like(x) if need_input else None
        for gate, pre in self._pre_grads(dh, gamma):
            rows = slice(gate * hidden, (gate + 1) * hidden)
            grad_w_hh[rows] = previous.transposed_mm(pre.view_as(dh))
            torch.mm(pre.t(), flat_x, out=grad_w_ih[rows])
            if need_bias:
                torch.sum(pre, 0, out=grad_b[rows])
            if need_input:
                _rows(grad_x).addmm_(pre, w_i[gate])
        return grad_x, grad_w_ih, grad_w_hh, grad_b, None if grad_b is None else grad_b.clone()


class LSTMTimeStack:
    """The T steps of one LSTM layer as a stack for the engine's ``run_recursion``; deltas are (dh, gamma).

    ``dh`` and ``gamma`` are [T + 1, B, H]: dh[t] the gradient at h_t, gamma[t] the whole gradient at c_t for
    t >= 1, and gamma[0] the gradient at c_0. R_t^T carries no gradient to h_{t-1}, so dh_t is the inflow itself
    (e_t + J_{t+1}^T delta_{t+1}); gamma follows from dh by the reverse linear scan gamma_t = q_t dh_t +
    f_{t+1} gamma_{t+1} from gamma_T = dc_T + q_T dh_T (and gamma_0 = f_1 gamma_1, nothing flows in at c_0).

    Args:
        steps: the cell's local derivatives.
        scan: the reverse linear scan with the forget gates as coefficients.
        top_h, top_c: the gradients at h_T and c_T from outside (the last output's included in ``top_h``).
        output_grads: [T, B, H], ``output_grads[t - 1]`` the gradient the loss sends to output t (only h_t has
            outputs: nothing reaches c_t from outside before T).
    """

    def __init__(
        self, steps: LSTMStepDerivatives, scan: ReverseLinearScan, top_h: Tensor, top_c: Tensor, output_grads: Tensor
    ):
        self.steps = steps
        self.scan_along = scan
        self.top_h = top_h
        self.top_gamma = torch.addcmul(top_c, steps.cell_slope[-1], top_h)
        self.output_grads = output_grads
        self.num_blocks = scan.num_steps
        self._inflow: Tensor | None = None  # kept between calls: entries of blocks whose delta is final are reused
        self._cell_inflow: Tensor | None = None
        self._spare: tuple[Tensor, Tensor] | None = None

    def _inflow_buffer(self) -> Tensor:
        if self._inflow is None:
            self._inflow = torch.empty_like(self.output_grads, memory_format=torch.contiguous_format)
        return self._inflow

    def inflow(self, delta: tuple[Tensor, Tensor], fresh_until: int, release: bool) -> Tensor:
        """e_i + J_{i+1}^T delta_{i+1} (at h_i); blocks above ``fresh_until`` keep the previous call's entries."""
        if self._inflow is None and fresh_until < self.num_blocks:
            raise RuntimeError("LSTMTimeStack.inflow: the first call must compute every block (fresh_until = T).")
        dh, gamma = delta
        flow = self._inflow_buffer()
        self.steps.hidden_vjp(dh[1 : fresh_until + 1], gamma[1 : fresh_until + 1], out=flow[:fresh_until])
        flow[1:fresh_until].add_(self.output_grads[: fresh_until - 1])
        if release:
            self._spare = delta
        return flow

    def scan(self, inflow: Tensor | None) -> tuple[Tensor, Tensor]:
        steps = self.num_blocks
        if self._spare is None:
            shape = (steps + 1, *self.top_h.shape)
            dh, gamma = (torch.empty(shape, dtype=self.top_h.dtype, device=self.top_h.device) for _ in range(2))
        else:
            (dh, gamma), self._spare = self._spare, None
        dh[steps] = self.top_h
        if inflow is None:  # delta^(0): the e_i alone
            dh[0].zero_()
            dh[1:steps] = self.output_grads[:-1]
        else:
            dh[:steps] = inflow
        if self._cell_inflow is None:
            self._cell_inflow = torch.empty_like(self.steps.cell_slope)
            self._cell_inflow[0].zero_()
        torch.mul(self.steps.cell_slope[:-1], dh[1:steps], out=self._cell_inflow[1:])
        self.scan_along(self.top_gamma, self._cell_inflow, out=gamma)
        return dh, gamma

    def squared_change(self, new: tuple[Tensor, Tensor], old: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        change = sum((a - b).double().pow(2).sum() for a, b in zip(new, old))
        return change, sum(a.double().pow(2).sum() for a in new)


def _gates(weight: Tensor) -> Tensor:
    """[4H, ...] -> [4, H, ...]: the i, f, g, o blocks of an LSTM weight or bias."""
    return weight.view(GATES, weight.shape[0] // GATES, *weight.shape[1:])
