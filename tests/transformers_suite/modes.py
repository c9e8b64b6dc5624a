"""The three ways every transformers test class of this suite runs, and the hook that patches each model it builds.

transformers' tests build their models in many places (``model_class(config)``, ``_from_config``,
``from_pretrained``, ``AutoModel.from_config``, copies), so the patch hooks model construction itself rather than
the tests: ``PreTrainedModel.__init__`` notes each model that starts being built, and ``post_init`` (the last call
of every transformers model's ``__init__``) patches the outermost one once it is complete. A head model builds its
base model inside its own ``__init__``: only the outermost model is patched (patching the inner one too would hook
the same layers twice). A model built on the meta device (``from_pretrained`` loads its weights after
``__init__``) is patched when ``from_pretrained`` returns it, with its weights in place.

Modes:

- ``unpatched``: transformers as it is.
- ``k1``: ``patch_model(model, 1)``: Highway-BP(1), not exact backprop for the testers' 2-layer stacks.
- ``kL``: ``patch_model(model, L)`` with L the number of blocks of the model's longest stack (exact backprop), run
  by the Highway engine rather than by the model's own backward (the package's default at k >= L), so that
  these runs check the engine, as the ``engine_at_exact_steps`` fixture does in the project's own tests.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedModel

import hf_hwbp
from hf_hwbp import patching

MODES = ("unpatched", "k1", "kL")

_state = threading.local()


def _building() -> list:
    if not hasattr(_state, "models"):
        _state.models = []
    return _state.models


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def patch_built_model(model: torch.nn.Module, mode: str) -> None:
    """Patch ``model`` for ``mode`` (a no-op for ``unpatched``, for a model already patched, and for one on meta)."""
    if mode == "unpatched" or hf_hwbp.is_patched(model) or _on_meta(model):
        return
    hf_hwbp.patch_model(model, 1)
    if mode == "kL":
        longest = max(len(stack.layers) for stack in hf_hwbp.highway_state(model).stacks)
        hf_hwbp.set_highway_k(model, longest)


@contextlib.contextmanager
def patch_on_build(mode: str) -> Iterator[None]:
    """While active, every transformers model built is patched for ``mode`` as soon as it is complete."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    if mode == "unpatched":
        yield
        return
    original_init = PreTrainedModel.__init__
    original_post_init = PreTrainedModel.post_init
    original_from_pretrained = PreTrainedModel.from_pretrained.__func__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        _building().append(self)
        try:
            original_init(self, *args, **kwargs)
        except BaseException:
            _forget(self)
            raise

    @functools.wraps(original_post_init)
    def post_init(self, *args, **kwargs):
        result = original_post_init(self, *args, **kwargs)
        building = _building()
        if building and building[0] is self:
            building.clear()
            patch_built_model(self, mode)
        else:
            _forget(self)
        return result

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, *args, **kwargs):
        model = original_from_pretrained(cls, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
        patch_built_model(loaded, mode)
        return model

    exact_steps_by_autograd = patching.EXACT_STEPS_BY_AUTOGRAD
    _building().clear()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(PreTrainedModel, "__init__", init)
        mp.setattr(PreTrainedModel, "post_init", post_init)
        mp.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
        if mode == "kL":
            patching.EXACT_STEPS_BY_AUTOGRAD = False
        yield
    finally:
        mp.undo()
        patching.EXACT_STEPS_BY_AUTOGRAD = exact_steps_by_autograd
        _building().clear()


def _forget(model) -> None:
    building = _building()
    for i, m in enumerate(building):
        if m is model:
            del building[i]
            return
