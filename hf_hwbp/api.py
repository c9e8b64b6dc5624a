"""Public entry points: patch_model, unpatch_model and the accessors used between training steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn
from transformers.utils import logging

from .config import HighwayConfig
from .discovery import describe, find_stacks, stacks_from_layers
from .patching import _ATTR, HighwayPatch

logger = logging.get_logger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / Accelerate / PEFT wrappers (the one whose stack gets patched)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
    return model


def patch_model(
    model: nn.Module,
    k: int = 2,
    *,
    config: HighwayConfig | None = None,
    layers: nn.Module | Sequence[nn.Module] | None = None,
    **options,
) -> nn.Module:
    """Replace the backward pass of ``model``'s residual stack(s) with Highway-BP(k), in place.

    Args:
        model: a transformers model (its stacks are found from its structure: decoder, encoder, vision and MoE
            layer lists, both stacks of an encoder-decoder, the stages of a ResNet), a PEFT model wrapping one,
            or any module when ``layers`` is given.
        k: Highway iterations (int >= 0); clamped to the number of blocks, where it is exact backprop (a warning
            says so).
        config: the settings as a ``HighwayConfig`` instead of ``k`` and ``options`` (as PEFT's
            ``get_peft_model(model, config)``): its ``k``, ``tol``, ``group_size`` and ``backend`` apply. Its
            training settings (schedules, fidelity logging) are HighwayCallback's / HighwayTrainer's: a config that
            sets them is refused here.
        layers: the stack yourself, when discovery cannot see it: an ``nn.ModuleList`` (or ``nn.Sequential``) of
            residual blocks, or a list of them for several stacks in forward order. Each block must take the
            hidden state as its first argument (or ``hidden_states=``) and return it (alone or first in a tuple).
        **options: ``tol`` (adaptive stop), ``group_size`` (layers per Highway block) and ``backend``
            ('auto', 'sequential', 'batched'); see HighwayConfig.

    Patching again updates the settings (it never stacks two patches). What was found is in
    ``highway_state(model).stacks`` and logged once. Returns ``model``.
    """
    config = _engine_config(k, config, options)
    target = unwrap_model(model)
    existing: HighwayPatch | None = getattr(target, _ATTR, None)
    if layers is None:
        stacks = existing.stacks if existing is not None else find_stacks(target)
    else:
        stacks = stacks_from_layers(target, layers)
    if existing is not None:
        if [s.layers for s in existing.stacks] == [s.layers for s in stacks]:
            existing.config = config
            existing.warn_about_settings()
            return model
        existing.remove()
    model_type = getattr(getattr(target, "config", None), "model_type", None)
    patch = HighwayPatch(stacks, config, model_type, root=target)
    object.__setattr__(target, _ATTR, patch)
    logger.info(f"Highway-BP(k={config.k}) on {type(target).__name__}: {describe(stacks)}.")
    patch.warn_about_settings()
    return model


def _engine_config(k, config: HighwayConfig | None, options: dict) -> HighwayConfig:
    """The settings ``patch_model`` applies, from ``k`` and ``options`` or from ``config``."""
    if isinstance(k, HighwayConfig):
        raise TypeError("patch_model got a HighwayConfig as k: pass it as patch_model(model, config=config).")
    if config is None:
        return HighwayConfig.from_options(k=k, **options)
    if hasattr(config, "engine_config"):  # a HighwayTrainingConfig: its schedule is applied per step, not here
        raise TypeError(
            f"patch_model takes a HighwayConfig, not a {type(config).__name__}: "
            "its k schedule and fidelity settings HighwayCallback / HighwayTrainer apply per step. Pass it to "
            "HighwayCallback(config) or HighwayTrainingArguments(hwbp_config=...), or patch with one step's settings: "
            "patch_model(model, config=training_config.engine_config(step, num_blocks=..., total_steps=...))."
        )
    if not isinstance(config, HighwayConfig):
        raise TypeError(f"config must be a HighwayConfig, got {type(config).__name__}.")
    if options or k not in (2, config.k):
        given = sorted(options) + (["k"] if k not in (2, config.k) else [])
        raise TypeError(
            f"patch_model got config= and {', '.join(given)}: pass one or the other, e.g. "
            f"patch_model(model, config=config.updated({', '.join(f'{n}=...' for n in given)}))."
        )
    return config.updated()


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove Highway-BP from ``model``: ordinary backprop again. A no-op on an unpatched model."""
    target = unwrap_model(model)
    patch: HighwayPatch | None = getattr(target, _ATTR, None)
    if patch is not None:
        patch.remove()
        object.__delattr__(target, _ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(unwrap_model(model), _ATTR, None) is not None


def highway_state(model: nn.Module) -> HighwayPatch:
    """The live Highway-BP state of a patched model: ``.config``, ``.stacks`` (where each stack is and its
    layers), ``.num_blocks``, ``.last_iterations``."""
    patch = getattr(unwrap_model(model), _ATTR, None)
    if patch is None:
        raise ValueError("This model is not patched with Highway-BP: call hf_hwbp.patch_model(model, k) first.")
    return patch


def get_highway_config(model: nn.Module) -> HighwayConfig:
    """A copy of the current settings of a patched model."""
    return highway_state(model).config.updated()


def set_highway_config(model: nn.Module, **changes) -> HighwayConfig:
    """Change settings of a patched model between steps (validated), e.g. ``set_highway_config(m, k=4)``; a
    ``backend`` chosen here is installed at once. Warns (once per setting) about a k past the number of blocks
    and a group_size that makes the whole stack one block. Returns a copy of the new settings."""
    patch = highway_state(model)
    patch.config = patch.config.updated(**changes)
    patch.warn_about_settings()
    return patch.config.updated()


def set_highway_k(model: nn.Module, k: int) -> None:
    """Change k on a patched model between steps (for k schedules)."""
    set_highway_config(model, k=k)


def last_highway_iterations(model: nn.Module) -> int | None:
    """The Highway iterations whose gradient the last training backward of ``model`` delivered.

    - k (the iterations run, fewer with ``tol``) after a Highway-BP step; the largest over its stacks and forwards;
    - the number of blocks L after an exact step the settings ask for (k >= L, an ``exact_last`` schedule's last
      steps), which runs as the model's own backward: the gradient of Highway-BP(L);
    - None when the last training forward ran without Highway-BP: inside ``exact_backprop(model)`` (which turns it
      off), in eval mode, or before any training step.

    Reading it does not consume it.
    """
    return highway_state(model).last_iterations


@contextlib.contextmanager
def exact_backprop(model: nn.Module) -> Iterator[None]:
    """Within this block a patched model trains with ordinary backprop (e.g. to measure fidelity)."""
    patch = getattr(unwrap_model(model), _ATTR, None)
    if patch is None:
        yield
        return
    previous, patch.enabled = patch.enabled, False
    try:
        yield
    finally:
        patch.enabled = previous
