"""Highway-BP as training arguments: ``use_highway_bp`` + ``hwbp_config``, for any Trainer's arguments class.

transformers' own ``TrainingArguments`` cannot gain fields from outside, so the Highway settings come as a dataclass
mixin, in the shape of Liger-Kernel's ``use_liger_kernel`` + ``liger_kernel_config``:

- ``use_highway_bp`` (default True) switches Highway-BP on;
- ``hwbp_config`` holds a whole ``HighwayConfig``: a dict, a JSON string or the path of a .json file;
- ``hwbp_k``, ``hwbp_tol``, ... (one flag per ``HighwayConfig`` field, prefixed ``hwbp_``) are aliases that set one
  entry each; a flag given beats the same entry of ``hwbp_config`` (as a command-line flag beats a config file),
  a setting given nowhere takes the ``HighwayConfig`` default.

``__post_init__`` validates the result and folds it into ``hwbp_config`` (a complete dict; the ``hwbp_*`` flags are
set back to None), so ``to_dict()`` records every setting once and a copy of the arguments resolves the same way.
Read the settings as ``args.highway_config`` (a ``HighwayConfig``).

``HighwayTrainingArguments`` is ``TrainingArguments`` with the mixin. Any other arguments class takes it the same way,
e.g. TRL's::

    @dataclass
    class HighwaySFTConfig(HighwayArguments, SFTConfig):
        pass

The callback (``HighwayCallback()``, no config) reads the settings from such arguments, so
``SFTTrainer(..., args=HighwaySFTConfig(...), callbacks=[HighwayCallback()])`` trains with Highway-BP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .config import SCHEDULE_NAMES, HighwayConfig, normalized_settings

FLAG_PREFIX = "hwbp_"


def _alias(name: str, **extra) -> Any:
    """A flat ``hwbp_<name>`` field: default None (= not given), help text from ``HighwayConfig``'s field."""
    source = HighwayConfig.__dataclass_fields__[name]
    default = source.default
    help_text = f"{source.metadata['help']} Sets hwbp_config['{name}'] (default {default!r})."
    return field(default=None, metadata={"help": help_text, **extra})


def _parse_k_flag(value: Any) -> Any:
    """``hwbp_k`` from a command line ("2", "auto") or from Python (2, "auto")."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            return value  # validation names the bad value
    return value


def _parse_config_value(value: Any) -> dict[str, Any]:
    """``hwbp_config`` as a dict: a dict, a JSON object string, or the path of a .json file holding one."""
    if isinstance(value, HighwayConfig):
        return value.to_dict()
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(".json") and not text.startswith("{"):
            if not os.path.isfile(text):
                raise ValueError(f"hwbp_config: no such file {text!r} (pass a JSON object or a .json file's path).")
            with open(text, encoding="utf-8") as f:
                loaded = json.load(f)
        else:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"hwbp_config must be a JSON object such as '{{\"k\": 2}}' or the path of a .json file; {err}."
                ) from None
        if not isinstance(loaded, dict):
            raise ValueError(f"hwbp_config must hold a JSON object, got {type(loaded).__name__}.")
        return loaded
    raise ValueError(f"hwbp_config must be a dict, a JSON string or a .json path, got {type(value).__name__}.")


@dataclass
class HighwayArguments:
    """Highway-BP settings as training arguments (mix into any ``TrainingArguments`` subclass, or parse alone)."""

    use_highway_bp: bool = field(
        default=True,
        metadata={"help": "Train with Highway backpropagation (False: ordinary backprop, same trainer)."},
    )
    # `str` for HfArgumentParser (a `dict | str` field parses as str); __post_init__ turns it into a dict.
    hwbp_config: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'All Highway-BP settings at once (a HighwayConfig): a JSON object, e.g. \'{"k": 1, '
            '"k_schedule": "exact_last", "exact_last_steps": 100}\', or the path of a .json file '
            "(HighwayConfig.save_pretrained writes hwbp_config.json). The hwbp_* flags set single entries."
        },
    )
    # `str`, not `int | str`: HfArgumentParser turns `int | str` into type=int, which would reject "auto".
    hwbp_k: str | None = _alias("k")
    hwbp_tol: float | None = _alias("tol")
    hwbp_group_size: int | None = _alias("group_size")
    hwbp_k_schedule: str | None = _alias("k_schedule", choices=list(SCHEDULE_NAMES))
    hwbp_k_step_every: int | None = _alias("k_step_every")
    hwbp_k_max: int | None = _alias("k_max")
    hwbp_exact_last_steps: int | None = _alias("exact_last_steps")
    hwbp_fidelity_steps: int | None = _alias("fidelity_steps")

    def __post_init__(self) -> None:
        self._resolve_highway_settings()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the arguments class this is mixed into (TrainingArguments, SFTConfig, ...)
            parent()

    @property
    def highway_config(self) -> HighwayConfig:
        """The validated Highway settings of these arguments."""
        return HighwayConfig.from_dict(self.hwbp_config)

    def _resolve_highway_settings(self) -> None:
        """Fold the ``hwbp_*`` flags into ``hwbp_config`` (a flag beats the same entry of ``hwbp_config``)."""
        if not isinstance(self.use_highway_bp, bool):
            raise ValueError(f"use_highway_bp must be True or False, got {self.use_highway_bp!r}.")
        base = HighwayConfig().to_dict()
        given = _parse_config_value(self.hwbp_config) if self.hwbp_config is not None else {}
        unknown = sorted(set(given) - set(base))
        if unknown:
            raise ValueError(f"hwbp_config: unknown setting(s) {unknown}; valid settings are {', '.join(base)}.")
        settings = {**base, **given}
        for name in base:
            flag = getattr(self, FLAG_PREFIX + name)
            if flag is not None:
                settings[name] = _parse_k_flag(flag) if name == "k" else flag
        try:
            settings = normalized_settings(settings, prefix=FLAG_PREFIX)
        except TypeError as err:  # argument errors are ValueErrors, as in TrainingArguments
            raise ValueError(str(err)) from None
        self.hwbp_config = HighwayConfig(**settings).to_dict()
        for name in base:  # folded: hwbp_config is the one record (a copy of these arguments re-resolves the same)
            setattr(self, FLAG_PREFIX + name, None)


@dataclass
class HighwayTrainingArguments(HighwayArguments, TrainingArguments):
    """``TrainingArguments`` plus the Highway-BP settings (``use_highway_bp``, ``hwbp_config``, ``--hwbp_*``).

    k schedules (``hwbp_k_schedule``); ``step`` is the 0-based index of the optimizer step about to run:

    - ``"constant"``: ``hwbp_k`` at every step.
    - ``"step"``: ``min(hwbp_k + step // hwbp_k_step_every, hwbp_k_max)`` (``hwbp_k_max=None``: the number of
      Highway blocks, i.e. up to exact backprop).
    - ``"exact_last"``: ``hwbp_k``, except exact backprop (k = number of blocks, no adaptive stop) for the last
      ``hwbp_exact_last_steps`` optimizer steps of the run.
    """

    def __post_init__(self) -> None:
        super().__post_init__()  # the Highway settings, then TrainingArguments
        self._check_activation_checkpointing()

    def _check_activation_checkpointing(self) -> None:
        # After TrainingArguments.__post_init__, which resolves the activation/gradient checkpointing aliases and
        # parses activation_checkpointing_kwargs from JSON.
        if not self.use_highway_bp or not getattr(self, "activation_checkpointing", None):
            return
        # Highway-BP runs each layer's backward k + 1 times through autograd.grad: only non-reentrant checkpointing
        # supports that. transformers checkpoints non-reentrantly when no kwargs are given; kwargs that do not say
        # which form get use_reentrant=False (torch.utils.checkpoint would otherwise pick its own default).
        kwargs = getattr(self, "activation_checkpointing_kwargs", None)
        if kwargs is None:
            return
        if not isinstance(kwargs, dict):
            raise ValueError(f"activation_checkpointing_kwargs must be a dict, got {kwargs!r}.")
        if kwargs.get("use_reentrant", False) is not False:
            raise ValueError(
                "Highway-BP supports activation (gradient) checkpointing only in its non-reentrant form: set "
                "activation_checkpointing_kwargs={'use_reentrant': False} (or leave it unset), turn checkpointing off, "
                "or set use_highway_bp=False."
            )
        if "use_reentrant" not in kwargs:
            kwargs = {**kwargs, "use_reentrant": False}
            self.activation_checkpointing_kwargs = kwargs
            if hasattr(self, "gradient_checkpointing_kwargs"):
                self.gradient_checkpointing_kwargs = kwargs


def highway_settings_of(args: Any) -> tuple[bool, HighwayConfig] | None:
    """``(use_highway_bp, HighwayConfig)`` of training arguments that carry Highway settings; None otherwise."""
    if isinstance(args, HighwayArguments):
        return args.use_highway_bp, args.highway_config
    return None


__all__ = ["FLAG_PREFIX", "HighwayArguments", "HighwayTrainingArguments", "highway_settings_of"]
