r"""Puts the Highway-BP engine under a stack of modules with forward hooks; patch and unpatch.

During a training forward (module in training mode, gradients enabled) the hooks cut the stack's autograd
graph at every block boundary and route it through three small autograd Functions:

    h_0 -> block 1 -> y_1 --_BlockExit--> h_1 ~> leaf x_1 -> block 2 -> ... --_BlockExit--> h_L -> head
     \--_StackEntry(h_0, *params)--> token_0 --> token_1 --> ... --> token_L

Block j >= 2 runs on a fresh leaf x_{j-1} holding h_{j-1}'s value, so each block's local graph ends at its
own input and at its parameters. ``_BlockExit`` hands on the value of y_j with no edge into block j's graph
and stores the gradient that reaches h_j (d for the last block, e_j for the others). ``_StackEntry`` takes
the stack input and every trainable parameter of the stack, and returns only a scalar token; the token chain
through the exits makes autograd call the exits top-down and the entry last. The entry's backward runs the
engine over the recorded local graphs and returns delta^(k)_0 and the parameter gradients as ordinary
autograd outputs (AccumulateGrad, DDP reducer hooks, GradScaler and gradient accumulation see them as
usual). A gradient e_0 on h_0 itself reaches the embeddings directly, as the intermediate-loss form says.
In eval mode or without gradients the hooks return at once: the forward is the model's own.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import HighwayConfig
from .engine import highway_backward

_ATTR = "_hwbp_patch"


@dataclass
class _StackRecord:
    """What one training forward of the stack leaves for its backward (held by the patch only)."""

    entry_params: list[Tensor]
    h0_requires_grad: bool
    inputs: list[Tensor] = field(default_factory=list)  # x_{j-1} for each block, as seen by its graph
    outputs: list[Tensor] = field(default_factory=list)  # y_j, attached to block j's local graph
    output_grads: dict[int, Tensor] = field(default_factory=dict)  # block index (0-based) -> grad at h_j
    token: Tensor | None = None
    last_exit: Tensor | None = None
    in_engine: bool = False
    consumed: bool = False


class _StackEntry(torch.autograd.Function):
    """Emits the token that starts the exit chain; its backward is the whole Highway-BP backward."""

    @staticmethod
    def forward(ctx, patch_ref, record_ref, h0: Tensor, *params: Tensor):
        ctx.patch_ref = patch_ref
        ctx.record_ref = record_ref
        return h0.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        patch, record = ctx.patch_ref(), ctx.record_ref()
        if record is None or patch is None:
            raise RuntimeError(
                "Highway-BP: this forward's recorded blocks were released, because a later training forward of "
                "the same model (or unpatch_model) replaced them. Highway-BP keeps one pending training forward "
                "per model: call backward() before the next forward."
            )
        if record.consumed:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors after "
                "they have already been freed). Highway-BP frees the stack's graph in the first backward."
            )
        return patch._backward(record)


class _BlockExit(torch.autograd.Function):
    """Hands on a block's output value, cut from its graph; stores the gradient that reaches it."""

    @staticmethod
    def forward(ctx, record_ref, index: int, output: Tensor, token: Tensor):
        ctx.record_ref = record_ref
        ctx.index = index
        ctx.set_materialize_grads(False)
        return output, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output, _grad_token):
        record = ctx.record_ref()
        if record is not None and grad_output is not None:
            record.output_grads[ctx.index] = grad_output
        return (
            None,
            None,
            None,
            torch.zeros((), device=grad_output.device if grad_output is not None else None),
        )


class _GroupInnerGuard(torch.autograd.Function):
    """Identity on a hidden state inside a group of layers; refuses gradients from outside the stack."""

    @staticmethod
    def forward(ctx, record_ref, layer_index: int, hidden: Tensor):
        ctx.record_ref = record_ref
        ctx.layer_index = layer_index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        record = ctx.record_ref()
        if record is None or not record.in_engine:
            raise RuntimeError(
                f"Highway-BP: the loss reads the hidden state after layer {ctx.layer_index}, which lies inside a "
                "group of layers (group_size > 1). Only hidden states at group boundaries can carry a loss: use "
                "group_size=1, or leave that hidden state out of the loss."
            )
        return None, None, grad


def _is_non_reentrant_checkpoint(layer: nn.Module) -> bool:
    """Whether a transformers layer checkpoints with ``use_reentrant=False`` (the form autograd.grad supports)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False


def _split_hidden(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("Highway-BP: could not find the hidden state (first argument or `hidden_states=`) of a layer.")


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _output_hidden(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_output_hidden(output, hidden: Tensor):
    if isinstance(output, tuple):
        return (hidden,) + output[1:]
    if isinstance(output, list):
        return [hidden] + output[1:]
    return hidden


def _check_side_inputs(layer_index: int, args: tuple, kwargs: dict) -> None:
    """Refuse other layer inputs that need gradients: the Highway backward would not deliver them."""
    named = [(f"argument {i}", a) for i, a in enumerate(args[1:], start=1)] + list(kwargs.items())
    if not args:
        named = [(n, v) for n, v in named if n != "hidden_states"]
    for name, value in named:
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, Tensor) and v.requires_grad for v in values):
            raise RuntimeError(
                f"Highway-BP: layer {layer_index} receives `{name}`, a tensor that requires grad besides the hidden "
                "state (e.g. cross-attention encoder states). Highway-BP only propagates gradients along the "
                "residual stream; call unpatch_model(model) to train this model with ordinary backprop."
            )


class HighwayPatch:
    """The Highway-BP state of one patched model: its settings, its hooks and the last forward's record.

    Read or change the settings between steps through ``config`` (or ``hf_hwbp.set_highway_k``); read
    ``last_iterations`` after a backward for the number of Highway iterations that really ran.
    """

    def __init__(self, layers: nn.ModuleList, config: HighwayConfig, model_type: str | None = None):
        if len(layers) == 0:
            raise ValueError("Highway-BP needs at least one layer in the stack; got an empty ModuleList.")
        self.layers = layers
        self.config = config
        self.model_type = model_type
        self.enabled = True
        self.last_iterations: int | None = None
        self.last_block_grads: list[Tensor] | None = None
        self.keep_block_grads = False
        self._record: _StackRecord | None = None
        self._handles: list = []
        self._install_hooks()

    # ----- layout -----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_blocks(self) -> int:
        """Highway blocks: groups of ``group_size`` consecutive layers."""
        g = self.config.group_size
        return (self.num_layers + g - 1) // g

    @property
    def effective_k(self) -> int:
        """k clamped to the number of blocks (iterations past it change nothing)."""
        return min(self.config.k, self.num_blocks)

    def _group_bounds(self, layer_index: int) -> tuple[bool, bool]:
        g = self.config.group_size
        first = layer_index % g == 0
        last = layer_index % g == g - 1 or layer_index == self.num_layers - 1
        return first, last

    # ----- hooks ------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        # The hooks always run eagerly: under torch.compile each layer's forward is compiled on its own and the
        # graph breaks at the block boundaries, where the hooks cut the autograd graph anyway.
        for i, layer in enumerate(self.layers):
            pre_hook = torch._dynamo.disable(self._make_pre_hook(i))
            post_hook = torch._dynamo.disable(self._make_post_hook(i))
            self._handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
            self._handles.append(layer.register_forward_hook(post_hook, prepend=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._record = None

    def _active(self, layer: nn.Module) -> bool:
        return self.enabled and layer.training and torch.is_grad_enabled()

    def _make_pre_hook(self, layer_index: int):
        def pre_hook(layer, args, kwargs):
            if not self._active(layer):
                if layer_index == 0:
                    self._record = None  # an eval forward also releases a pending training forward
                return None
            hidden = _split_hidden(args, kwargs)
            _check_side_inputs(layer_index, args, kwargs)
            first, _ = self._group_bounds(layer_index)
            if layer_index == 0:
                self._check_supported_forward()
                self._start_record(hidden)
                return None
            record = self._record
            if record is None:  # nothing trainable in or below the stack in this forward
                return None
            if first:
                if hidden is not record.last_exit:
                    raise RuntimeError(
                        f"Highway-BP: layer {layer_index} did not receive the output of layer {layer_index - 1} "
                        "unchanged. Highway-BP supports stacks whose layers feed each other directly; pass "
                        "layers=<ModuleList> of such a stack, or call unpatch_model(model)."
                    )
                leaf = hidden.detach().requires_grad_(True)
                record.inputs.append(leaf)
                return _with_hidden(args, kwargs, leaf)
            return None

        return pre_hook

    def _make_post_hook(self, layer_index: int):
        def post_hook(layer, args, output):
            record = self._record
            if not self._active(layer) or record is None:
                return None
            hidden = _output_hidden(output)
            _, last = self._group_bounds(layer_index)
            record_ref = weakref.ref(record)
            if not last:
                return _with_output_hidden(output, _GroupInnerGuard.apply(record_ref, layer_index, hidden))
            block_index = len(record.outputs)
            record.outputs.append(hidden)
            exit_hidden, record.token = _BlockExit.apply(record_ref, block_index, hidden.detach(), record.token)
            record.last_exit = exit_hidden
            return _with_output_hidden(output, exit_hidden)

        return post_hook

    def _check_supported_forward(self) -> None:
        for layer in self.layers:
            if getattr(layer, "gradient_checkpointing", False) and not _is_non_reentrant_checkpoint(layer):
                raise RuntimeError(
                    "Highway-BP supports gradient checkpointing only in its non-reentrant form (each Highway "
                    "iteration then recomputes the layer, as backprop's single sweep does): reentrant checkpointing "
                    "accumulates parameter gradients behind autograd's back. Call "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), "
                    "or model.gradient_checkpointing_disable()."
                )

    def _start_record(self, h0: Tensor) -> None:
        params = self._trainable_params()
        self._record = None  # the previous record (if any) is released here
        if not params and not h0.requires_grad:
            return  # nothing in or below the stack is trained: the forward stays the model's own
        record = _StackRecord(entry_params=params, h0_requires_grad=h0.requires_grad)
        record.token = _StackEntry.apply(weakref.ref(self), weakref.ref(record), h0, *params)
        record.inputs.append(h0)
        self._record = record

    def _trainable_params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for layer in self.layers:
            for p in layer.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def block_parameters(self) -> list[list[Tensor]]:
        """The trainable parameters of each Highway block (group of layers), bottom to top."""
        g = self.config.group_size
        blocks: list[list[Tensor]] = []
        for start in range(0, self.num_layers, g):
            seen: dict[int, Tensor] = {}
            for layer in self.layers[start : start + g]:
                for p in layer.parameters():
                    if p.requires_grad:
                        seen.setdefault(id(p), p)
            blocks.append(list(seen.values()))
        return blocks

    # ----- backward ---------------------------------------------------------------------------------------
    def _backward(self, record: _StackRecord) -> tuple:
        num_blocks = len(record.outputs)
        if num_blocks != self.num_blocks or len(record.inputs) != num_blocks:
            raise RuntimeError(
                f"Highway-BP: the training forward ran {num_blocks} of the stack's {self.num_blocks} blocks. "
                "Highway-BP needs the whole stack in every training forward."
            )
        last = record.outputs[-1]
        d = record.output_grads.get(num_blocks - 1)
        if d is None:
            d = torch.zeros_like(last)
        # e_0 (a loss on h_0 itself) reaches h_0 directly through autograd: the engine leaves it out.
        extra = [None] + [record.output_grads.get(j) for j in range(num_blocks - 1)]
        record.in_engine = True
        try:
            result = highway_backward(
                record.inputs,
                record.outputs,
                record.entry_params,
                d,
                extra,
                k=self.config.k,
                tol=self.config.tol,
                need_input_grad=record.h0_requires_grad,
                keep_block_grads=self.keep_block_grads,
            )
        finally:
            record.in_engine = False
            record.consumed = True
            record.inputs.clear()
            record.outputs.clear()
            record.output_grads.clear()
        self.last_iterations = result.iterations
        self.last_block_grads = result.block_grads
        return (None, None, result.input_grad) + tuple(result.param_grads)


def get_patch(model: nn.Module) -> HighwayPatch | None:
    return getattr(model, _ATTR, None)
