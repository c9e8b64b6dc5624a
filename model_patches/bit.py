"""BiT (``model_type="bit"``, also the backbone of hybrid vision models): discovery finds one stack per stage. Its
non-pre-activation layer (``layer_type="bottleneck"``) is ``relu(h + g(h))``: the residual path is the ReLU mask of
a layer's output (``gates.py``), wherever the layer sits. Its pre-activation layer (the default) is ``h + g(h)``."""

from __future__ import annotations

from .registry import ModelFamily

FAMILY = ModelFamily(name="BiT", model_types=("bit",), post_activation_layers=frozenset({"BitBottleneckLayer"}))
