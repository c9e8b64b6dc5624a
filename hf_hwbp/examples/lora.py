"""LoRA for the example scripts: peft's defaults per model type, with every target name checked first.

A model trained from scratch with LoRA keeps its random base weights, which exist nowhere else: ``apply_lora`` then
saves that base model in ``<output_dir>/base_model`` and names it in the adapter's config
(``base_model_name_or_path``, an absolute path), so that ``AutoPeftModelFor...from_pretrained(output_dir)`` loads the
trained model offline.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from ..peft_checks import check_lora_targets
from .arguments import FlagError

logger = logging.getLogger(__name__)


BASE_MODEL_DIR = "base_model"
"""Folder, inside the output folder, of the base model of a LoRA run from scratch."""


def save_scratch_base(model: nn.Module, output_dir: str, *, write: bool = True) -> str:
    """Save ``model`` (built from its config, no weights anywhere) as ``<output_dir>/base_model`` and make it name
    that folder (``name_or_path``, absolute), which PEFT writes into the adapter's config; returns the folder.
    ``write=False`` (processes other than the main one) only names it."""
    path = os.path.abspath(os.path.join(output_dir, BASE_MODEL_DIR))
    if write:
        model.save_pretrained(path)
        logger.warning(f"LoRA on a model from scratch: its base model is saved in {path} (the adapter names it).")
    model.name_or_path = path
    model.config._name_or_path = path
    return path


def apply_lora(
    model: nn.Module,
    lora_args,
    *,
    task_type: str | None,
    default_targets: list[str] | None = None,
    scratch_output_dir: str | None = None,
    write_base: bool = True,
    **extra,
):
    """Wrap ``model`` with LoRA adapters (peft) after checking that every target module exists.

    ``lora_args``: a ``LoraArguments``. ``default_targets`` is used when peft has no default for the model type;
    ``scratch_output_dir``: the run's output folder when ``model`` was built from its config (its base model is then
    saved there first, ``save_scratch_base``; ``write_base=False`` on processes that do not save); ``extra`` goes to
    ``LoraConfig`` (e.g. ``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = lora_args.lora_target_modules
    model_type = model.config.model_type
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or default_targets
        if targets is None:
            raise FlagError(
                f"peft has no default LoRA target modules for model_type={model_type!r}: pass "
                "--lora_target_modules (e.g. q_proj v_proj, or all-linear)."
            )
    if list(targets) == ["all-linear"]:
        targets = "all-linear"
    modules = dict(model.named_modules())
    try:
        matched = check_lora_targets(model, targets)  # a clear error for any name that matches nothing
    except ValueError as err:
        raise FlagError(f"--lora_target_modules: {err}") from None
    if scratch_output_dir is not None:
        save_scratch_base(model, scratch_output_dir, write=write_base)
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


__all__ = ["BASE_MODEL_DIR", "apply_lora", "save_scratch_base"]
