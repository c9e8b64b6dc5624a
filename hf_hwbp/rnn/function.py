"""One GRU or LSTM layer (one direction) as an autograd Function: fused forward, Highway-BP(k) through time backward.

The forward is torch's fused GRU kernel (``_VF.gru``, cuDNN on CUDA), run without recording a graph: it only
keeps the states h_1..h_T. The backward recomputes the gates of all steps at once, runs the engine's
``run_recursion`` on the layer's ``TimeStack`` and ends with one parameter and input step, all in closed form.
Several layers are several stacks in sequence: the gradient this Function returns for its input sequence is
the per-step loss (the e_t) of the layer below, through ordinary autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from ..engine import run_recursion
from .gru_cell import GRUStepDerivatives, PreviousStates
from .lstm_cell import LSTMStepDerivatives, LSTMTimeStack
from .scan import ReverseLinearScan
from .stack import TimeStack


@dataclass
class HighwaySettings:
    """What the backward of one forward uses (read when the forward runs), and what it reports back.

    ``iterations[i]`` receives the number of Highway iterations run for layer-direction i.
    """

    k: int
    tol: float | None = None
    chunk: int | None = None
    iterations: dict[int, int] = field(default_factory=dict)


class HighwayGRULayer(torch.autograd.Function):
    """(x [T, B, I], h_0 [B, H], weights) -> (outputs h_1..h_T [T, B, H], h_T [B, H]), time-major."""

    @staticmethod
    def forward(ctx, x, h0, settings, index, w_ih, w_hh, b_ih, b_hh):  # noqa: D401 - autograd signature
        x = x.contiguous()
        weights = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
        outputs, last = torch._VF.gru(x, h0.unsqueeze(0), weights, b_ih is not None, 1, 0.0, False, False, False)
        ctx.save_for_backward(x, h0, outputs, w_ih, w_hh, b_ih, b_hh)
        ctx.settings, ctx.index = settings, index
        return outputs, last[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs, grad_last):
        x, h0, outputs, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        grad_outputs = grad_outputs.contiguous()  # time-major rows (a batch-first loss sends a transposed one)
        settings: HighwaySettings = ctx.settings
        previous = PreviousStates(h0, outputs)
        steps = GRUStepDerivatives.recompute(x, previous, w_ih, w_hh, b_ih, b_hh)
        # The gradient of output t reaches the state h_t (an intermediate loss); the last output's joins h_T's.
        top = grad_outputs[-1] + grad_last
        stack = TimeStack(steps, ReverseLinearScan(steps.update_gate, settings.chunk), top, grad_outputs)
        delta, settings.iterations[ctx.index] = run_recursion(stack, settings.k, settings.tol)
        del stack
        grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = steps.parameter_and_input_grads(
            delta[1:], x, previous, w_ih, need_input=ctx.needs_input_grad[0], need_bias=b_ih is not None
        )
        grad_h0 = delta[0] if ctx.needs_input_grad[1] else None
        return grad_x, grad_h0, None, None, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


class HighwayLSTMLayer(torch.autograd.Function):
    """(x [T, B, I], h_0, c_0 [B, H], weights) -> (outputs h_1..h_T [T, B, H], h_T, c_T [B, H]), time-major.

    As ``HighwayGRULayer``: torch's fused LSTM forward (no graph), and a backward that recomputes gates and cell
    states for all steps at once, runs ``run_recursion`` on the layer's ``LSTMTimeStack`` (state (h, c), residual
    path through c_{t-1} with the gates held fixed) and ends with one parameter and input step.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, settings, index, w_ih, w_hh, b_ih, b_hh):  # noqa: D401 - autograd signature
        x = x.contiguous()
        weights = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
        state = (h0.unsqueeze(0), c0.unsqueeze(0))
        outputs, last_h, last_c = torch._VF.lstm(x, state, weights, b_ih is not None, 1, 0.0, False, False, False)
        ctx.save_for_backward(x, h0, c0, outputs, w_ih, w_hh, b_ih, b_hh)
        ctx.settings, ctx.index = settings, index
        return outputs, last_h[0], last_c[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_outputs, grad_last_h, grad_last_c):
        x, h0, c0, outputs, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        grad_outputs = grad_outputs.contiguous()  # time-major rows (a batch-first loss sends a transposed one)
        settings: HighwaySettings = ctx.settings
        previous = PreviousStates(h0, outputs)
        steps = LSTMStepDerivatives.recompute(x, previous, c0, w_ih, w_hh, b_ih, b_hh, settings.chunk)
        scan = ReverseLinearScan(steps.forget_gate, settings.chunk)
        stack = LSTMTimeStack(steps, scan, grad_outputs[-1] + grad_last_h, grad_last_c, grad_outputs)
        (dh, gamma), settings.iterations[ctx.index] = run_recursion(stack, settings.k, settings.tol)
        del stack, scan
        grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = steps.parameter_and_input_grads(
            dh[1:], gamma[1:], x, previous, w_ih, need_input=ctx.needs_input_grad[0], need_bias=b_ih is not None
        )
        grad_h0 = dh[0] if ctx.needs_input_grad[1] else None
        grad_c0 = gamma[0] if ctx.needs_input_grad[2] else None
        return grad_x, grad_h0, grad_c0, None, None, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh
