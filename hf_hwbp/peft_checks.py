"""LoRA target checks: PEFT silently skips a target name that matches no module (when another one matches).

Highway-BP trains exactly the parameters that require grad, so a silently skipped LoRA target is a silently
different model. ``check_lora_targets`` refuses it before training; ``check_peft_model`` checks every adapter of a
``PeftModel``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .training_config import UnsupportedTrainingSetupError

_LORA_WRAPPABLE = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention")


def _lora_target_matches(target: str, name: str) -> bool:
    # PEFT's rule for a list of names: the full module name, or its last dotted components.
    return name == target or name.endswith("." + target)


def check_lora_targets(model: nn.Module, target_modules: str | Iterable[str] | None) -> list[str]:
    """Check LoRA ``target_modules`` against ``model`` before (or after) ``peft.get_peft_model``.

    ``target_modules`` follows PEFT: a list of names (a module matches a name when its qualified name equals it or
    ends with ``"." + name``), a single string (a regular expression that must match a whole qualified name), or
    ``"all-linear"``. PEFT itself only complains when *no* name matches; a typo in one of several names is silently
    ignored. This raises an ``UnsupportedTrainingSetupError`` (a ``ValueError``) naming every target that matches no
    module, with the layer names the model does have. Works on a plain transformers model or a PEFT model (its base
    model is searched).

    Returns the qualified names of the matched modules.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    names = [name for name, _ in base.named_modules() if name]
    if target_modules is None:
        raise ValueError("LoRA target_modules is None: name the layers LoRA should adapt (e.g. ['q_proj', 'v_proj']).")

    def available() -> str:
        leaves = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in base.named_modules()
                if name and type(module).__name__ in _LORA_WRAPPABLE and "lora_" not in name
            }
        )
        return ", ".join(leaves) if leaves else "(none)"

    model_name = type(base).__name__
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return [n for n, m in base.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
        matched = [n for n in names if re.fullmatch(target_modules, n)]
        if not matched:
            raise UnsupportedTrainingSetupError(
                f"LoRA target_modules regex {target_modules!r} matches no module of {model_name} (a regex must "
                f"match the whole qualified name, e.g. 'model.layers.0.self_attn.q_proj'). Its layers: {available()}."
            )
        return matched
    targets = list(target_modules)
    if not targets:
        raise ValueError("LoRA target_modules is empty: name the layers LoRA should adapt (e.g. ['q_proj', 'v_proj']).")
    missing = [t for t in targets if not any(_lora_target_matches(t, n) for n in names)]
    if missing:
        raise UnsupportedTrainingSetupError(
            f"LoRA target_modules {missing} match no module of {model_name}; LoRA would silently skip them. "
            f"Names of its layers that LoRA can adapt: {available()}."
        )
    return [n for n in names if any(_lora_target_matches(t, n) for t in targets)]


def check_peft_model(model: nn.Module) -> None:
    """``check_lora_targets`` for every adapter of a PEFT model (a no-op on other models)."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        return
    for adapter, config in peft_config.items():
        targets = getattr(config, "target_modules", None)
        if targets is None:
            continue
        try:
            check_lora_targets(model, targets)
        except UnsupportedTrainingSetupError as err:
            raise UnsupportedTrainingSetupError(f"PEFT adapter {adapter!r}: {err}") from None


__all__ = ["check_lora_targets", "check_peft_model"]
