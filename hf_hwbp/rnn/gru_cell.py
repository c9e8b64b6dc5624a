"""The GRU cell's local derivatives at the forward's values, and its vector-Jacobian products in closed form.

torch.nn.GRU computes, for every step t (gates in the order r, z, n of its weights):

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t (.) (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) (.) n_t + z_t (.) h_{t-1}

so the direct term that carries h_{t-1} into h_t is z_t (.) h_{t-1}: the highway R_t = diag(z_t), and
J_t = dh_t/dh_{t-1} - R_t is what flows through the gates. Given a gradient g at h_t, the gradients at the
pre-activations of the hidden projection W_hh h_{t-1} + b_hh (gates r, z, n) are g times fixed factors

    r: (1 - z)(1 - n^2) (W_hn h + b_hn) r (1 - r)      z: (h_{t-1} - n) z (1 - z)      n: (1 - z)(1 - n^2) r

and those of the input projection W_ih x_t + b_ih are the same for r and z, and g (1 - z)(1 - n^2) for n. The
factors depend only on the forward, so they are computed once for all T steps, and every Highway iteration is
then three multiplies and three matrix products: J^T g = sum over gates of (g * factor_gate) W_hh,gate.

Layout and memory: each gate is its own contiguous [T, B, H] tensor (on CPU, elementwise work on the strided gate
slices of a [T, B, 3H] projection is 2 to 6 times slower, and three products with K = H beat one with K = 3H), and
the VJPs go one gate at a time through a single reused [T, B, H] workspace. The states h_0..h_{T-1} are read as
(h_0, outputs[:-1]) without being copied into one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PreviousStates:
    """h_0..h_{T-1} of a layer without a copy: the initial state [B, H] and the outputs h_1..h_T [T, B, H]."""

    initial: Tensor
    outputs: Tensor

    def mm_into(self, weight_t: Tensor, out: Tensor) -> Tensor:
        """h_{t-1} @ weight_t for every t into ``out`` [T * B, N] (contiguous)."""
        batch = self.initial.shape[0]
        torch.mm(self.initial, weight_t, out=out[:batch])
        torch.mm(_rows(self.outputs[:-1]), weight_t, out=out[batch:])
        return out

    def addmm_into(self, weight_t: Tensor, out: Tensor) -> Tensor:
        """out [T * B, N] += h_{t-1} @ weight_t for every t."""
        batch = self.initial.shape[0]
        out[:batch].addmm_(self.initial, weight_t)
        out[batch:].addmm_(_rows(self.outputs[:-1]), weight_t)
        return out

    def sub_into(self, other: Tensor, out: Tensor) -> Tensor:
        """h_{t-1} - other[t] into ``out`` [T, B, H]."""
        torch.sub(self.initial, other[0], out=out[0])
        torch.sub(self.outputs[:-1], other[1:], out=out[1:])
        return out

    def transposed_mm(self, grads: Tensor) -> Tensor:
        """sum_t grads[t]^T h_{t-1}: [H_out, H] from grads [T, B, H_out]."""
        batch = self.initial.shape[0]
        flat = _rows(grads)
        return torch.mm(flat[batch:].t(), _rows(self.outputs[:-1])).addmm_(flat[:batch].t(), self.initial)


@dataclass
class GRUStepDerivatives:
    """The local derivatives of T GRU steps (batch B, hidden H), held fixed through the Highway iterations.

    Attributes:
        hidden_factors: three [T, B, H] tensors, d(pre-activations of W_hh h_{t-1} + b_hh, gates r, z, n) / dh_t.
        new_gate_factor: [T, B, H], d(pre-activation W_in x_t + b_in of n) / dh_t, i.e. (1 - z)(1 - n^2).
        update_gate: [T, B, H], z_t: the coefficient of the highway R_t = diag(z_t).
        w_hh: [3H, H], the recurrent weight that J^T applies.
    """

    hidden_factors: tuple[Tensor, Tensor, Tensor]
    new_gate_factor: Tensor
    update_gate: Tensor
    w_hh: Tensor
    _work: Tensor | None = field(default=None, repr=False)

    @classmethod
    def recompute(
        cls, x: Tensor, previous: PreviousStates, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
    ) -> GRUStepDerivatives:
        """One batched recompute of the gates of all steps from x [T, B, I] and the states h_0..h_{T-1}.

        Memory-bound elementwise work dominates here, so it is written in place, one pass per operation.
        """
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        flat_x = _rows(x)
        w_i, w_h = _gates(w_ih), _gates(w_hh)

        def empty() -> Tensor:
            return torch.empty((steps, batch, hidden), dtype=x.dtype, device=x.device)

        reset, update, new, hidden_new = empty(), empty(), empty(), empty()  # hidden_new = W_hn h + b_hn
        for gate, pre in ((0, reset), (1, update)):  # r, z: sigmoid(W_h h + W_i x + b_h + b_i)
            previous.mm_into(w_h[gate].t(), _rows(pre)).addmm_(flat_x, w_i[gate].t())
        torch.mm(flat_x, w_i[2].t(), out=_rows(new))
        previous.mm_into(w_h[2].t(), _rows(hidden_new))
        if b_ih is not None:
            b_i, b_h = _gates(b_ih), _gates(b_hh)
            reset.add_(b_i[0] + b_h[0])
            update.add_(b_i[1] + b_h[1])
            new.add_(b_i[2])
            hidden_new.add_(b_h[2])
        reset.sigmoid_()
        update.sigmoid_()
        tanh_(new.addcmul_(reset, hidden_new))

        one = torch.ones((), dtype=new.dtype, device=new.device)
        slope = torch.addcmul(one, new, new, value=-1)  # 1 - n^2
        new_factor = torch.addcmul(slope, slope, update, value=-1)  # (1 - z)(1 - n^2)
        torch.addcmul(reset, reset, reset, value=-1, out=slope)  # r (1 - r)
        factor_r = torch.mul(new_factor, hidden_new, out=hidden_new).mul_(slope)
        torch.addcmul(update, update, update, value=-1, out=slope)  # z (1 - z)
        factor_z = previous.sub_into(new, out=new).mul_(slope)
        factor_n = torch.mul(new_factor, reset, out=reset)
        return cls((factor_r, factor_z, factor_n), new_factor, update, w_hh)

    @property
    def num_steps(self) -> int:
        return self.update_gate.shape[0]

    def _gate_grad(self, grad: Tensor, factor: Tensor) -> Tensor:
        """grad * factor for the first len(grad) steps, in the reused workspace, as [n * B, H] rows."""
        if self._work is None:
            self._work = torch.empty_like(self.update_gate)
        steps = grad.shape[0]
        return _rows(torch.mul(grad, factor[:steps], out=self._work[:steps]))

    def hidden_vjp(self, grad: Tensor, out: Tensor | None = None) -> Tensor:
        """J_t^T grad[t] for the first len(grad) steps: per gate one multiply and one matrix product for all steps."""
        steps, batch, hidden = grad.shape
        w_h = _gates(self.w_hh)
        flat_out = None if out is None else _rows(out)
        result = torch.mm(self._gate_grad(grad, self.hidden_factors[0]), w_h[0], out=flat_out)
        for gate in (1, 2):
            result.addmm_(self._gate_grad(grad, self.hidden_factors[gate]), w_h[gate])
        return result.view(steps, batch, hidden)

    def parameter_and_input_grads(
        self, grad: Tensor, x: Tensor, previous: PreviousStates, w_ih: Tensor, *, need_input: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Sum over t of the local VJPs of h_t with ``grad[t]``: (x grad, W_ih, W_hh, b_ih, b_hh grads)."""
        steps, batch, hidden = grad.shape
        flat_x = _rows(x)
        w_i = _gates(w_ih)
        grad_w_ih = torch.empty_like(w_ih)
        grad_w_hh = torch.empty_like(self.w_hh)
        grad_b_ih = torch.empty(3 * hidden, dtype=grad.dtype, device=grad.device) if need_bias else None
        grad_b_hh = torch.empty_like(grad_b_ih) if need_bias else None
        grad_x = torch.zeros_like(x) if need_input else None
        for gate in range(3):
            rows = slice(gate * hidden, (gate + 1) * hidden)
            pre = self._gate_grad(grad, self.hidden_factors[gate])  # hidden projection; also input for r and z
            grad_w_hh[rows] = previous.transposed_mm(pre.view_as(grad))
            if need_bias:
                grad_b_hh[rows] = pre.sum(0)
            if gate == 2:  # the input projection of n reaches h_t without r: its own factor
                pre = self._gate_grad(grad, self.new_gate_factor)
            torch.mm(pre.t(), flat_x, out=grad_w_ih[rows])
            if need_bias:
                grad_b_ih[rows] = grad_b_hh[rows] if gate < 2 else pre.sum(0)
            if need_input:
                _rows(grad_x).addmm_(pre, w_i[gate])
        return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def tanh_(tensor: Tensor) -> Tensor:
    """tanh in place, as 2 sigmoid(2 a) - 1: on CPU torch's float32 tanh is 3 to 6 times slower than its sigmoid
    (0.45 ms against 2.7 ms on 1M elements, one thread), and these four passes take about 0.9 ms. The same function
    to rounding (absolute error below 2 ulp of 1), and exact at +-inf (sigmoid saturates to 0 or 1)."""
    return tensor.mul_(2).sigmoid_().mul_(2).sub_(1)


def _rows(tensor: Tensor) -> Tensor:
    """[T, B, N] -> [T * B, N], a view (raises rather than copy: results are written through these views)."""
    return tensor.view(-1, tensor.shape[-1])


def _gates(weight: Tensor) -> Tensor:
    """[3H, ...] -> [3, H, ...]: the r, z, n blocks of a GRU weight or bias."""
    return weight.view(3, weight.shape[0] // 3, *weight.shape[1:])
