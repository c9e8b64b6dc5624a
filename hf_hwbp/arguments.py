"""Highway-BP as training arguments: ``use_highway_bp`` + ``hwbp_config``, for any Trainer's arguments class.

transformers' own ``TrainingArguments`` cannot gain fields from outside, so the Highway settings come as a dataclass
mixin, in the shape of Liger-Kernel's ``use_liger_kernel`` + ``liger_kernel_config``:

- ``use_highway_bp`` (default True) switches Highway-BP on;
- ``hwbp_config`` holds a whole ``HighwayTrainingConfig``: a dict, a JSON string or the path of a .json file;
- ``hwbp_k``, ``hwbp_tol``, ... (one flag per ``HighwayTrainingConfig`` field, prefixed ``hwbp_``) are aliases that
  set one entry each; a flag given beats the same entry of ``hwbp_config`` (as a command-line flag beats a config
  file), a setting given nowhere takes the ``HighwayTrainingConfig`` default.

``__post_init__`` validates the result and stores it in ``hwbp_config`` (a complete dict); the ``hwbp_*`` flags keep
the values given (parsed: ``hwbp_k`` reads back ``1`` or ``"auto"``; a flag not given stays None), so a copy of the
arguments resolves the same way. Read the settings as ``args.highway_config`` (a ``HighwayTrainingConfig``): it is
resolved again at every read, so ``args.hwbp_k = 4`` set after construction takes effect (and is validated there).

``HighwayTrainingArguments`` is ``TrainingArguments`` with the mixin. Any other arguments class takes it the same way,
e.g. TRL's::

    @dataclass
    class HighwaySFTConfig(HighwayArguments, SFTConfig):
        pass

The callback (``HighwayCallback()``, no config) reads the settings from such arguments, so
``SFTTrainer(..., args=HighwaySFTConfig(...), callbacks=[HighwayCallback()])`` trains with Highway-BP.

``layer_parallel`` (``--layer_parallel``) asks for layer-parallel training, which ``LayerParallelTrainer`` runs
(``hf_hwbp.layer_parallel_trainer``): one pipeline stage per process (stages = world size, under ``torchrun`` /
``accelerate launch``), the batch cut into ``layer_parallel_microbatches`` micro-batches (see ``hf_hwbp.parallel``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .config import BACKEND_NAMES
from .schedules import SCHEDULE_NAMES
from .training_config import (
    HighwayTrainingConfig,
    UnsupportedTrainingSetupError,
    normalized_training_settings,
)

FLAG_PREFIX = "hwbp_"


def _alias(name: str, **extra) -> Any:
    """A flat ``hwbp_<name>`` field: default None (= not given), help text from ``HighwayTrainingConfig``'s field."""
    source = HighwayTrainingConfig.__dataclass_fields__[name]
    default = source.default
    # `%(default).0s` prints nothing and keeps argparse from appending its own "(default: None)" (None = not given).
    help_text = f"{source.metadata['help']} Sets hwbp_config['{name}'] (default {default!r}).%(default).0s"
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
    if isinstance(value, HighwayTrainingConfig):
        return value.to_dict()
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(".json") and not text.startswith("{"):
            if not os.path.isfile(text):
                raise ValueError(f"hwbp_config: no such file {text!r} (pass a JSON object or a .json file's path).")
            with open(text, encoding="utf-8") as f:
                try:
                    loaded = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"hwbp_config (--hwbp_config): the file {text!r} is not valid JSON ({err}); it must hold a "
                        'JSON object such as {"k": 2} (HighwayTrainingConfig.save_pretrained writes one).'
                    ) from None
        else:
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"hwbp_config must be a JSON object such as '{{\"k\": 2}}' or the path of a .json file "
                    f"(--hwbp_config); {err}."
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
            "help": 'All Highway-BP settings at once (a HighwayTrainingConfig): a JSON object, e.g. \'{"k": 1, '
            '"k_schedule": "exact_last", "exact_last_steps": 100}\', or the path of a .json file '
            "(HighwayTrainingConfig.save_pretrained writes hwbp_config.json). The hwbp_* flags set single entries."
        },
    )
    # `str`, not `int | str`: HfArgumentParser turns `int | str` into type=int, which would reject "auto".
    hwbp_k: str | None = _alias("k")
    hwbp_tol: float | None = _alias("tol")
    hwbp_group_size: int | None = _alias("group_size")
    hwbp_backend: str | None = _alias("backend", choices=list(BACKEND_NAMES))
    hwbp_k_schedule: str | None = _alias("k_schedule", choices=list(SCHEDULE_NAMES))
    hwbp_k_step_every: int | None = _alias("k_step_every")
    hwbp_k_max: int | None = _alias("k_max")
    hwbp_exact_last_steps: int | None = _alias("exact_last_steps")
    hwbp_fidelity_steps: int | None = _alias("fidelity_steps")
    layer_parallel: bool = field(
        default=False,
        metadata={
            "help": "Layer-parallel training (LayerParallelTrainer, which the example scripts pick for this flag): one "
            "pipeline stage per process, stages = world size (launch with `torchrun --nproc_per_node S` or "
            "`accelerate launch --num_processes S`); every rank gets the same batches and runs its stage's Highway "
            "backward at the same time as the others. GPT-2 and Llama-family causal LMs, ViT image classification. "
            "With use_highway_bp=False: pipeline backprop over the same stages."
        },
    )
    layer_parallel_microbatches: int = field(
        default=1,
        metadata={"help": "Layer-parallel: micro-batches each batch is cut into (along the batch dimension)."},
    )

    def __post_init__(self) -> None:
        self._resolve_highway_settings()
        self._check_layer_parallel_settings()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the arguments class this is mixed into (TrainingArguments, SFTConfig, ...)
            parent()

    @property
    def highway_config(self) -> HighwayTrainingConfig:
        """The validated Highway settings of these arguments (``hwbp_config`` with the ``hwbp_*`` flags over it)."""
        return HighwayTrainingConfig(**self._merged_highway_settings())

    def _check_layer_parallel_settings(self) -> None:
        """Refuse layer-parallel settings that cannot run, before anything is built."""
        if not isinstance(self.layer_parallel, bool):
            raise ValueError(f"layer_parallel must be True or False, got {self.layer_parallel!r}.")
        microbatches = self.layer_parallel_microbatches
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"layer_parallel_microbatches must be an int >= 1, got {microbatches!r}.")
        if self.layer_parallel:
            check_layer_parallel_settings(self)

    def _merged_highway_settings(self) -> dict[str, Any]:
        """``hwbp_config`` (or the defaults) with the ``hwbp_*`` flags given over it, validated."""
        base = HighwayTrainingConfig().to_dict()
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
            return normalized_training_settings(settings, prefix=FLAG_PREFIX)
        except TypeError as err:  # argument errors are ValueErrors, as in TrainingArguments
            raise ValueError(str(err)) from None

    def _resolve_highway_settings(self) -> None:
        """Validate the settings and store them whole in ``hwbp_config`` (a flag beats the same entry there)."""
        if not isinstance(self.use_highway_bp, bool):
            raise ValueError(f"use_highway_bp must be True or False, got {self.use_highway_bp!r}.")
        settings = self._merged_highway_settings()
        self.hwbp_config = HighwayTrainingConfig(**settings).to_dict()
        for name in settings:  # the flags given read back parsed (hwbp_k "1" -> 1); the others stay None
            if getattr(self, FLAG_PREFIX + name) is not None:
                setattr(self, FLAG_PREFIX + name, settings[name])


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


def check_layer_parallel_settings(args: Any) -> None:
    """Refuse training arguments that layer-parallel training cannot run (``UnsupportedTrainingSetupError``).

    ``LayerParallelTrainer`` calls it on its arguments; ``HighwayArguments`` calls it when ``layer_parallel`` is set,
    so that a script refuses them before anything is built."""
    settings = highway_settings_of(args)
    if getattr(args, "fp16", False):
        raise UnsupportedTrainingSetupError(
            "layer_parallel does not support fp16: its loss scaler would have to scale a backward that the stages run "
            "themselves. Use bf16 (no loss scaling), or train without layer_parallel."
        )
    if settings is None or not settings[0]:
        return
    config = settings[1]
    if config.tol is not None and getattr(args, "layer_parallel_microbatches", 1) > 1:
        raise UnsupportedTrainingSetupError(
            "The adaptive stop (hwbp_tol, or hwbp_k='auto') needs layer_parallel_microbatches=1 in layer-parallel "
            "training (every micro-batch would stop on its own collective). Use one micro-batch, or an int hwbp_k "
            "without hwbp_tol."
        )
    if config.fidelity_steps:
        raise UnsupportedTrainingSetupError(
            "hwbp_fidelity_steps is not measured in layer-parallel training (it needs the whole model's exact "
            "gradient on one process): set hwbp_fidelity_steps=0, or measure fidelity in a single-process run."
        )


def highway_settings_of(args: Any) -> tuple[bool, HighwayTrainingConfig] | None:
    """``(use_highway_bp, HighwayTrainingConfig)`` of training arguments that carry Highway settings; None otherwise."""
    if isinstance(args, HighwayArguments):
        return args.use_highway_bp, args.highway_config
    return None


__all__ = [
    "FLAG_PREFIX",
    "HighwayArguments",
    "HighwayTrainingArguments",
    "check_layer_parallel_settings",
    "highway_settings_of",
]
