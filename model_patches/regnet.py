"""RegNet (``model_type="regnet"``): discovery finds one stack per stage (each stage's first layer, which
down-samples, stays outside). Its X and Y layers are ``relu(h + g(h))``, as ResNet's: the residual path is the ReLU
mask of a layer's output (``gates.py``)."""

from __future__ import annotations

from .registry import ModelFamily

FAMILY = ModelFamily(
    name="RegNet", model_types=("regnet",), post_activation_layers=frozenset({"RegNetXLayer", "RegNetYLayer"})
)
