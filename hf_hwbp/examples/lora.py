"""LoRA for the example scripts: peft's defaults per model type, with every target name checked first."""

from __future__ import annotations

import logging

from torch import nn

from ..peft_checks import check_lora_targets

logger = logging.getLogger(__name__)


def apply_lora(
    model: nn.Module, lora_args, *, task_type: str | None, default_targets: list[str] | None = None, **extra
):
    """Wrap ``model`` with LoRA adapters (peft) after checking that every target module exists.

    ``lora_args``: a ``LoraArguments``. ``default_targets`` is used when peft has no default for the model type;
    ``extra`` goes to ``LoraConfig`` (e.g. ``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = lora_args.lora_target_modules
    model_type = model.config.model_type
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or default_targets
        if targets is None:
            raise ValueError(
                f"peft has no default LoRA target modules for model_type={model_type!r}: pass "
                "--lora_target_modules (e.g. q_proj v_proj, or all-linear)."
            )
    if list(targets) == ["all-linear"]:
        targets = "all-linear"
    modules = dict(model.named_modules())
    matched = check_lora_targets(model, targets)  # a clear error for any name that matches nothing
    conv1d = any(type(modules[name]).__name__ == "Conv1D" for name in matched)  # GPT-2's transposed weights
    config = LoraConfig(
        task_type=task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        **extra,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoRA on {targets}: {trainable:,} trainable parameters of {total:,}")
    return model


__all__ = ["apply_lora"]
