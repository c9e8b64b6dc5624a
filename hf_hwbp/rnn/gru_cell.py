"""The GRU cell's local derivatives at the forward's values, and its vector-Jacobian products in closed form.

torch.nn.GRU computes, for every step t (gates in the order r, z, n of its weights):

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t (.) (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) (.) n_t + z_t (.) h_{t-1}

so the direct term that carries h_{t-1} into h_t is z_t (.) h_{t-1}: the highway R_t = diag(z_t), and
J_t = dh_t/dh_{t-1} - R_t is what flows through the gates. Given a gradient g at h_t, the gradients at the
pre-activations of the hidden projection W_hh h_{t-1} + b_hh (rows r, z, n) are g times fixed factors

    r: (1 - z)(1 - n^2) (W_hn h + b_hn) r (1 - r)      z: (h_{t-1} - n) z (1 - z)      n: (1 - z)(1 - n^2) r

and those of the input projection W_ih x_t + b_ih are the same for r and z, and g (1 - z)(1 - n^2) for n. The
factors depend only on the forward, so they are computed once for all T steps, and every Highway iteration is
then one multiply and three matrix products: J^T g = sum over gates of (g * factor_gate) W_hh,gate.

Layout: everything is gate-major, [3, T, B, H], so that each gate is one contiguous [T, B, H] block. On CPU,
elementwise work on the strided gate slices of a [T, B, 3H] projection is 2 to 6 times slower, and three
products with K = H beat one with K = 3H.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GRUStepDerivatives:
    """The local derivatives of T GRU steps (batch B, hidden H), held fixed through the Highway iterations.

    Attributes:
        hidden_factors: [3, T, B, H], d(pre-activations of W_hh h_{t-1} + b_hh, gates r, z, n) / dh_t.
        new_gate_factor: [T, B, H], d(pre-activation W_in x_t + b_in of n) / dh_t, i.e. (1 - z)(1 - n^2).
        update_gate: [T, B, H], z_t: the coefficient of the highway R_t = diag(z_t).
        w_hh: [3H, H], the recurrent weight that J^T applies.
    """

    hidden_factors: Tensor
    new_gate_factor: Tensor
    update_gate: Tensor
    w_hh: Tensor
    _work: Tensor | None = field(default=None, repr=False)

    @classmethod
    def recompute(
        cls, x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
    ) -> GRUStepDerivatives:
        """One batched recompute of the gates of all steps: x [T, B, I] and h_prev = h_0..h_{T-1} [T, B, H].

        Memory-bound elementwise work dominates here, so it is written in place, one pass per operation.
        """
        steps, batch, hidden = h_prev.shape
        rows = steps * batch
        flat_x, flat_h = x.reshape(rows, -1), h_prev.reshape(rows, hidden)
        w_i, w_h = _gates(w_ih), _gates(w_hh)
        gates = torch.empty((3, steps, batch, hidden), dtype=h_prev.dtype, device=h_prev.device)
        hidden_new = torch.empty_like(h_prev)  # W_hn h + b_hn
        flat_gates, flat_hidden_new = gates.view(3, rows, hidden), hidden_new.view(rows, hidden)
        for g in (0, 1):  # r and z: sigmoid(W_h h + W_i x + b_h + b_i)
            torch.mm(flat_h, w_h[g].t(), out=flat_gates[g]).addmm_(flat_x, w_i[g].t())
        torch.mm(flat_x, w_i[2].t(), out=flat_gates[2])
        torch.mm(flat_h, w_h[2].t(), out=flat_hidden_new)
        if b_ih is not None:
            bias = (_gates(b_ih) + _gates(b_hh)).view(3, 1, 1, hidden)
            gates[:2].add_(bias[:2])
            gates[2].add_(_gates(b_ih)[2])
            hidden_new.add_(_gates(b_hh)[2])
        reset, update, new = gates[0].sigmoid_(), gates[1].sigmoid_(), gates[2]
        new.addcmul_(reset, hidden_new).tanh_()

        one = torch.ones((), dtype=new.dtype, device=new.device)
        tanh_slope = torch.addcmul(one, new, new, value=-1)  # 1 - n^2
        new_factor = torch.addcmul(tanh_slope, tanh_slope, update, value=-1)  # (1 - z)(1 - n^2)
        factors = torch.empty_like(gates)
        reset_slope = torch.addcmul(reset, reset, reset, value=-1, out=tanh_slope)  # r (1 - r)
        torch.mul(new_factor, hidden_new, out=factors[0]).mul_(reset_slope)
        update_slope = torch.addcmul(update, update, update, value=-1, out=tanh_slope)  # z (1 - z)
        torch.sub(h_prev, new, out=factors[1]).mul_(update_slope)
        torch.mul(new_factor, reset, out=factors[2])
        return cls(factors, new_factor, update, w_hh)

    @property
    def num_steps(self) -> int:
        return self.update_gate.shape[0]

    def _workspace(self) -> Tensor:
        """One [3, T, B, H] buffer reused by every VJP (large allocations cost page faults on every call)."""
        if self._work is None:
            self._work = torch.empty_like(self.hidden_factors)
        return self._work

    def _hidden_preactivation_grads(self, grad: Tensor) -> Tensor:
        """[3, n, B*H] gradients at the hidden projection's pre-activations for the first n = len(grad) steps."""
        steps = grad.shape[0]
        return torch.mul(grad.unsqueeze(0), self.hidden_factors[:, :steps], out=self._workspace()[:, :steps])

    def hidden_vjp(self, grad: Tensor, extra: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """J_t^T grad[t] (+ extra[t]) for the first len(grad) steps, three matrix products for all of them."""
        steps, batch, hidden = grad.shape
        rows = steps * batch
        pre = self._hidden_preactivation_grads(grad).view(3, rows, hidden)
        w_h = _gates(self.w_hh)
        flat_out = None if out is None else out.view(rows, hidden)
        if extra is None:
            result = torch.mm(pre[0], w_h[0], out=flat_out)
        else:
            result = torch.addmm(extra.reshape(rows, hidden), pre[0], w_h[0], out=flat_out)
        result.addmm_(pre[1], w_h[1]).addmm_(pre[2], w_h[2])
        return result.view(steps, batch, hidden)

    def parameter_and_input_grads(
        self, grad: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, *, need_input: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Sum over t of the local VJPs of h_t with ``grad[t]``: (x grad, W_ih, W_hh, b_ih, b_hh grads)."""
        steps, batch, hidden = grad.shape
        rows = steps * batch
        flat_x = x.reshape(rows, -1)
        pre = self._hidden_preactivation_grads(grad).view(3, rows, hidden)
        grad_w_hh = torch.bmm(pre.transpose(1, 2), h_prev.reshape(rows, hidden).expand(3, rows, hidden))
        grad_b_hh = pre.sum(1).view(-1) if need_bias else None
        # The input projection's gradients differ only in the n gate: turn ``pre`` into them in place.
        torch.mul(grad, self.new_gate_factor, out=pre[2].view_as(grad))
        grad_w_ih = torch.bmm(pre.transpose(1, 2), flat_x.expand(3, rows, flat_x.shape[1]))
        grad_b_ih = pre.sum(1).view(-1) if need_bias else None
        grad_x = None
        if need_input:
            w_i = _gates(w_ih)
            grad_x = torch.mm(pre[0], w_i[0]).addmm_(pre[1], w_i[1]).addmm_(pre[2], w_i[2]).view(steps, batch, -1)
        return grad_x, grad_w_ih.view(3 * hidden, -1), grad_w_hh.view(3 * hidden, hidden), grad_b_ih, grad_b_hh


def _gates(weight: Tensor) -> Tensor:
    """[3H, ...] -> [3, H, ...]: the r, z, n blocks of a GRU weight or bias."""
    return weight.view(3, weight.shape[0] // 3, *weight.shape[1:])
