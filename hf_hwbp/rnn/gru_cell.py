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
factors depend only on the forward, so they are computed once, for all T steps in two large matrix products, and
every Highway iteration is then one multiply and one matrix product: J^T g = (g * factors) W_hh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GRUStepDerivatives:
    """The local derivatives of T GRU steps (batch B, hidden H), held fixed through the Highway iterations.

    Attributes:
        hidden_factors: [T, B, 3, H], d(pre-activations of W_hh h_{t-1} + b_hh, rows r, z, n) / dh_t.
        new_gate_factor: [T, B, H], d(pre-activation W_in x_t + b_in of n) / dh_t, i.e. (1 - z)(1 - n^2).
        update_gate: [T, B, H], z_t: the coefficient of the highway R_t = diag(z_t).
        w_hh: [3H, H], the recurrent weight that J^T applies.
    """

    hidden_factors: Tensor
    new_gate_factor: Tensor
    update_gate: Tensor
    w_hh: Tensor

    @classmethod
    def recompute(
        cls, x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None
    ) -> GRUStepDerivatives:
        """One batched recompute of the gates of all steps: x [T, B, I] and h_prev = h_0..h_{T-1} [T, B, H]."""
        steps, batch, hidden = h_prev.shape
        input_proj = _linear(x.reshape(steps * batch, -1), w_ih, b_ih).view(steps, batch, 3, hidden)
        hidden_proj = _linear(h_prev.reshape(steps * batch, hidden), w_hh, b_hh).view(steps, batch, 3, hidden)
        reset = torch.sigmoid(input_proj[:, :, 0] + hidden_proj[:, :, 0])
        update = torch.sigmoid(input_proj[:, :, 1] + hidden_proj[:, :, 1])
        hidden_new = hidden_proj[:, :, 2]  # W_hn h + b_hn
        new = torch.tanh(torch.addcmul(input_proj[:, :, 2], reset, hidden_new))
        del input_proj
        new_factor = (1 - update) * (1 - new * new)
        # The factors overwrite the hidden projection (same shape; each row is read before it is replaced).
        factors = hidden_proj
        factors[:, :, 0] = new_factor * hidden_new * reset * (1 - reset)
        factors[:, :, 1] = (h_prev - new) * update * (1 - update)
        factors[:, :, 2] = new_factor * reset
        return cls(factors, new_factor, update, w_hh)

    @property
    def num_steps(self) -> int:
        return self.update_gate.shape[0]

    def hidden_vjp(self, grad: Tensor, extra: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """J_t^T grad[t] (+ extra[t]) for the first len(grad) steps, one matrix product for all of them."""
        steps, batch, hidden = grad.shape
        pre = (grad.unsqueeze(2) * self.hidden_factors[:steps]).view(steps * batch, 3 * hidden)
        flat_out = None if out is None else out.view(steps * batch, hidden)
        if extra is None:
            result = torch.mm(pre, self.w_hh, out=flat_out)
        else:
            result = torch.addmm(extra.reshape(steps * batch, hidden), pre, self.w_hh, out=flat_out)
        return result.view(steps, batch, hidden)

    def parameter_and_input_grads(
        self, grad: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, *, need_input: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Sum over t of the local VJPs of h_t with ``grad[t]``: (x grad, W_ih, W_hh, b_ih, b_hh grads)."""
        steps, batch, hidden = grad.shape
        pre = (grad.unsqueeze(2) * self.hidden_factors).view(steps * batch, 3 * hidden)
        grad_w_hh = pre.t().mm(h_prev.reshape(steps * batch, hidden))
        grad_b_hh = pre.sum(0) if need_bias else None
        # The input projection's gradient differs only in the n rows: turn ``pre`` into it in place.
        pre.view(steps, batch, 3, hidden)[:, :, 2] = grad * self.new_gate_factor
        grad_w_ih = pre.t().mm(x.reshape(steps * batch, -1))
        grad_b_ih = pre.sum(0) if need_bias else None
        grad_x = pre.mm(w_ih).view(steps, batch, -1) if need_input else None
        return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def _linear(flat: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
