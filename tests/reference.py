"""An independent Highway-BP(k) for the tests: Theorem 2 written out on an unpatched model.

It shares no code with hf_hwbp. Hooks cut the unpatched model at every layer (each layer runs on a fresh
leaf), the ordinary backward gives d at the stack output, the e_j at intermediate states and the head's
gradients, and the recursion is then evaluated literally, with a sum over j > i for every i (O(L^2) VJPs).
"""

from __future__ import annotations

import torch
from torch import nn


def reference_highway_grads(model: nn.Module, layers: nn.ModuleList, loss_fn, k: int) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter of ``model`` under Highway-BP(k), by name."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    exposed: list[torch.Tensor] = []  # what the rest of the model sees as h_1..h_L (leaves, to read e_j and d)
    stack_input: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not stack_input:
            stack_input.append(hidden)
        leaf = hidden.detach().requires_grad_(True)
        inputs.append(leaf)
        if args:
            return (leaf,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": leaf}

    def post_hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        outputs.append(hidden)
        leaf = hidden.detach().requires_grad_(True)
        exposed.append(leaf)
        return (leaf,) + tuple(output[1:]) if isinstance(output, tuple) else leaf

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_hook(post_hook, prepend=True))
    try:
        loss = loss_fn(model)
    finally:
        for h in handles:
            h.remove()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss.backward()  # head and everything above the stack; leaves collect d, e_1..e_{L-1}; inputs[0] gets e_0
    num_layers = len(outputs)
    zeros = torch.zeros_like(exposed[-1])
    d = exposed[-1].grad if exposed[-1].grad is not None else zeros
    e = [inputs[0].grad] + [x.grad for x in exposed[:-1]]
    e = [g if g is not None else zeros for g in e]
    base = [d + sum(e[i:], zeros) for i in range(num_layers)] + [d]

    def j_transpose(j: int, v: torch.Tensor) -> torch.Tensor:  # J_j^T v = (df_j/dh)^T v - v
        (full,) = torch.autograd.grad(outputs[j - 1], inputs[j - 1], v, retain_graph=True)
        return full - v

    delta = list(base)
    for _ in range(min(k, num_layers)):
        delta = [
            base[i] + sum((j_transpose(j, delta[j]) for j in range(i + 1, num_layers + 1)), zeros)
            for i in range(num_layers)
        ] + [base[num_layers]]
    for j, layer in enumerate(layers, start=1):
        trainable = [p for p in layer.parameters() if p.requires_grad]
        if trainable:
            grads = torch.autograd.grad(outputs[j - 1], trainable, delta[j], retain_graph=True, allow_unused=True)
            for p, g in zip(trainable, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
    if stack_input[0].requires_grad:
        stack_input[0].backward(delta[0])
    result = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return result
