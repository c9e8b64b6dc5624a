"""Layers whose residual path is not the identity: ``act(h + g(h))``, an activation after the sum.

Their Jacobian is D (I + dg/dh) with D = diag(act'(h + g(h))): the residual path is R = D, held at the forward's
values (docs/algorithm.md, residual paths that are not the identity). For ReLU, D is 1 where the layer's output is
positive, which the gate reads from the output. Known by layer class (wherever the layer sits: a ResNet, a RegNet,
a BiT backbone inside another model); each such class keeps its activation in ``layer.activation``. The classes
are the registered families' ``post_activation_layers`` (``registry.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .registry import post_activation_layers


def relu_residual_gate(output: Tensor) -> Tensor:
    """relu'(h + g(h)) from the layer's output relu(h + g(h)): 1 where it is positive, 0 elsewhere."""
    return (output > 0).to(output.dtype)


def residual_gate(layers: Sequence[nn.Module], model: nn.Module | None = None) -> Callable[[Tensor], Tensor] | None:
    """The residual gate of a stack's layers (None: h + g(h)); raises ValueError for an activation after the sum
    that it cannot express as a gate read from the output."""
    gated = post_activation_layers()
    post = [type(layer).__name__ in gated for layer in layers]
    if not any(post):
        return None
    activations = {type(getattr(layer, "activation", None)) for layer in layers}
    if all(post) and activations == {nn.ReLU}:
        return relu_residual_gate
    hidden_act = getattr(getattr(model, "config", None), "hidden_act", None)
    named = f"hidden_act={hidden_act!r}" if hidden_act is not None else f"activation {sorted(map(str, activations))}"
    raise ValueError(
        f"Highway-BP knows the residual path of layers act(h + g(h)) ({type(layers[0]).__name__}) for act = relu "
        f"only; this model uses {named}. Train it unpatched, or pass the stages yourself with "
        "patch_model(model, k, layers=[...]) to treat the layers as h + g(h) (exact at k >= L only)."
    )
