"""Model choices of the example scripts: which model types Highway-BP supports, configs for models from scratch."""

from __future__ import annotations

from collections.abc import Iterable

from transformers.utils import logging

from .arguments import FlagError

logger = logging.get_logger(__name__)


def highway_model_types(task_types: Iterable[str]) -> list[str]:
    """The model types of ``task_types`` (e.g. the causal-LM ones) in Highway-BP's tested zoo."""
    from ..model_patches import supported_model_types

    task_types = set(task_types)
    return [t for t in supported_model_types() if t in task_types]


def check_highway_supported(model_type: str | None, use_highway_bp: bool, task: str) -> bool:
    """Whether ``model_type`` is in the tested zoo; a warning when it is not (and Highway-BP is on).

    Not a refusal: ``patch_model`` discovers the residual stack of any transformers model and raises a clear
    error, before training starts, when it finds none."""
    from ..model_patches import supported_model_types

    tested = model_type in supported_model_types()
    if use_highway_bp and not tested:
        logger.warning(
            f"model_type={model_type!r} is not in Highway-BP's tested zoo ({task} types in it: "
            f"{', '.join(supported_model_types())}): patch_model will look for its residual stack and raise if it "
            "finds none. Pass --use_highway_bp false to train it with plain backprop."
        )
    return tested


def _overridden(config_overrides: str | None, key: str) -> bool:
    return bool(config_overrides) and any(item.split("=", 1)[0].strip() == key for item in config_overrides.split(","))


def fit_config_to_tokenizer(config, tokenizer, block_size: int | None, config_overrides: str | None = None):
    """A from-scratch config sized to ``tokenizer`` (vocabulary, special tokens) and to ``block_size`` (positions),
    except where ``config_overrides`` sets them."""
    if not _overridden(config_overrides, "vocab_size"):
        config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value < config.vocab_size:
            setattr(config, name, value)
    positions = next((a for a in ("n_positions", "max_position_embeddings") if hasattr(config, a)), None)
    if block_size is not None and positions is not None:
        if not _overridden(config_overrides, positions):
            setattr(config, positions, block_size)
        elif getattr(config, positions) < block_size:
            raise FlagError(
                f"--block_size {block_size} exceeds {positions}={getattr(config, positions)} of --config_overrides; "
                f"lower --block_size or raise {positions}."
            )
    return config


__all__ = ["check_highway_supported", "fit_config_to_tokenizer", "highway_model_types"]
