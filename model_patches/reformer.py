"""Reformer (``model_type="reformer"``): refused at ``patch_model``. Its structure looks like a stack, but its
layers run inside a reversible autograd Function with gradients disabled and are recomputed in its own backward."""

from __future__ import annotations

from .registry import ModelFamily

FAMILY = ModelFamily(
    name="Reformer",
    model_types=("reformer",),
    refusal="its layers run inside a reversible autograd Function with gradients disabled and are recomputed in "
    "its backward, so no training forward of them can be recorded. Train it with ordinary backprop (do not patch "
    "it).",
)
