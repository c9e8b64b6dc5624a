"""One GRU or LSTM layer (one direction) as an autograd Function: fused forward, Highway-BP(k) through time backward.

The forward is torch's fused GRU kernel (``_VF.gru``, cuDNN on CUDA), run without recording a graph: it only
keeps the states h_1..h_T. The backward recomputes the gates of all steps at once, runs the engine's
``run_recursion`` on the layer's ``TimeStack`` and ends with one parameter and input step, all in closed form.
Several layers are several stacks in sequence: the gradient this Function returns for its input sequence is
the per-step loss (the e_t) of the layer below, through ordinary autograd.

A backward that creates a graph (``create_graph=True``: gradient penalties, double backward) takes another way:
it reruns the layer with torch's own differentiable recurrence and returns ordinary autograd's gradients through
it, so the first-order gradient is exact backprop through time (at every k) and the second-order terms flow
exactly as through ``nn.GRU`` / ``nn.LSTM``. Highway-BP's closed-form backward is not itself differentiable, and
returning its result from a graph-creating backward would silently drop every term of the penalty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..engine import run_recursion
from .gru_cell import GRUStepDerivatives, PreviousStates
from .lstm_cell import LSTMStepDerivatives, LSTMTimeStack
from .scan import ReverseLinearScan
from .stack import TimeStack


@dataclass
class HighwaySettings:
    """What the backward of one forward uses (read when the forward runs), and what it reports back.

    ``iterations[i]`` receives the number of Highway iterations run for layer-direction i (T for an exact backward).
    ``exact`` becomes True once a backward through this forward creates a graph: from then on every backward
    through any of its layers is exact (a loss term and a penalty computed from its gradient meet in one backward
    and cannot be told apart, and a penalty's second-order terms pass through the layers below as first-order
    gradients, which must be exact too for the whole to equal torch's double backward).
    """

    k: int
    tol: float | None = None
    chunk: int | None = None
    iterations: dict[int, int] = field(default_factory=dict)
    exact: bool = False


class HighwayGRULayer(torch.autograd.Function):
    """(x [T, B, I], h_0 [B, H], weights) -> (outputs h_1..h_T [T, B, H], h_T [B, H]), time-major."""

    @staticmethod
    def forward(ctx, x, h0, settings, index, w_ih, w_hh, b_ih, b_hh):  # noqa: D401 - autograd signature
        weights = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
        outputs, last = torch._VF.gru(
            x.contiguous(), h0.unsqueeze(0), weights, b_ih is not None, 1, 0.0, False, False, False
        )
        ctx.save_for_backward(x, h0, outputs, w_ih, w_hh, b_ih, b_hh)  # x itself: a graph-creating backward needs it
        ctx.settings, ctx.index = settings, index
        return outputs, last[0]

    @staticmethod
    def backward(ctx, grad_outputs, grad_last):
        x, h0, outputs, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        if torch.is_grad_enabled() or ctx.settings.exact:  # a graph is (or was) created: exact, through torch's RNN
            ctx.settings.exact = True
            ctx.settings.iterations[ctx.index] = x.shape[0]
            needs = [ctx.needs_input_grad[i] for i in (0, 1, 4, 5, 6, 7)]
            grads = _exact_grads("gru", needs, (x, h0), (w_ih, w_hh, b_ih, b_hh), (grad_outputs, grad_last))
            return (*grads[:2], None, None, *grads[2:])
        return HighwayGRULayer._highway_backward(ctx, x.contiguous(), h0, outputs, w_ih, w_hh, b_ih, b_hh,
                                                 grad_outputs, grad_last)  # fmt: skip

    @staticmethod
    def _highway_backward(ctx, x, h0, outputs, w_ih, w_hh, b_ih, b_hh, grad_outputs, grad_last):
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
        weights = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
        state = (h0.unsqueeze(0), c0.unsqueeze(0))
        outputs, last_h, last_c = torch._VF.lstm(
            x.contiguous(), state, weights, b_ih is not None, 1, 0.0, False, False, False
        )
        ctx.save_for_backward(x, h0, c0, outputs, w_ih, w_hh, b_ih, b_hh)
        ctx.settings, ctx.index = settings, index
        return outputs, last_h[0], last_c[0]

    @staticmethod
    def backward(ctx, grad_outputs, grad_last_h, grad_last_c):
        x, h0, c0, outputs, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        if torch.is_grad_enabled() or ctx.settings.exact:  # a graph is (or was) created: exact, through torch's RNN
            ctx.settings.exact = True
            ctx.settings.iterations[ctx.index] = x.shape[0]
            needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 5, 6, 7, 8)]
            grads = _exact_grads(
                "lstm", needs, (x, h0, c0), (w_ih, w_hh, b_ih, b_hh), (grad_outputs, grad_last_h, grad_last_c)
            )
            return (*grads[:3], None, None, *grads[3:])
        return HighwayLSTMLayer._highway_backward(ctx, x.contiguous(), h0, c0, outputs, w_ih, w_hh, b_ih, b_hh,
                                                  grad_outputs, grad_last_h, grad_last_c)  # fmt: skip

    @staticmethod
    def _highway_backward(ctx, x, h0, c0, outputs, w_ih, w_hh, b_ih, b_hh, grad_outputs, grad_last_h, grad_last_c):
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


def _exact_grads(cell: str, needs: list[bool], inputs: tuple, weights: tuple, grad_outputs: tuple) -> list:
    """Ordinary autograd's gradients of one layer: the backward of a ``create_graph=True`` pass (with a graph) and
    of every later pass through the same forward (without).

    The layer is run again with torch's recurrence from the saved inputs (which carry their own graphs), with the
    fused kernels that have no double backward (oneDNN's LSTM on CPU, cuDNN) switched off, and differentiated
    with ``create_graph=True``: the gradients it returns are exact and themselves differentiable, in the inputs,
    the weights and the incoming gradients alike. Returns one entry per input then per weight (None where no
    gradient is needed or none flows).
    """
    w_ih, w_hh, b_ih, b_hh = weights
    flat = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
    create_graph = torch.is_grad_enabled()  # True in a create_graph=True backward (read before enable_grad below)
    tensors = (*inputs, *weights)
    wanted = [t for t, need in zip(tensors, needs) if need]
    with torch.enable_grad(), _twice_differentiable_kernels():
        x = inputs[0].contiguous()
        states = tuple(s.unsqueeze(0) for s in inputs[1:])
        if cell == "gru":
            outputs, last = torch._VF.gru(x, states[0], flat, b_ih is not None, 1, 0.0, True, False, False)
            results = (outputs, last[0])
        else:
            outputs, last_h, last_c = torch._VF.lstm(x, states, flat, b_ih is not None, 1, 0.0, True, False, False)
            results = (outputs, last_h[0], last_c[0])
        found = iter(torch.autograd.grad(results, wanted, grad_outputs, create_graph=create_graph, allow_unused=True))
    return [next(found) if need else None for need in needs]  # None where unused: autograd reads it as zero


@contextmanager
def _twice_differentiable_kernels() -> Iterator[None]:
    """oneDNN and cuDNN off (and nothing else changed): torch's RNNs then run as differentiable elementwise ops."""
    mkldnn, cudnn = torch._C._get_mkldnn_enabled(), torch._C._get_cudnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(mkldnn)
        torch._C._set_cudnn_enabled(cudnn)
