"""HighwayTrainer: ``transformers.Trainer`` with a ``HighwayCallback`` built in, plus gradient-fidelity logging.

    from hf_hwbp import HighwayTrainer, HighwayTrainingArguments

    args = HighwayTrainingArguments(output_dir="out", hwbp_k=2, hwbp_fidelity_steps=50, report_to="none")
    trainer = HighwayTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
    trainer.train()

Everything Highway-BP does in training is the callback's (``hf_hwbp.callback``: patch at train begin, k schedule
from ``state.global_step``, ``hwbp_k`` / ``hwbp_iterations`` in the logs, unpatch at train end); the trainer puts it
ahead of the ``report_to`` integrations so that they receive those values. What the trainer adds:

- every ``fidelity_steps`` optimizer steps, ``hwbp_fidelity/cosine``, ``hwbp_fidelity/rel_error`` and the same per
  Highway block (``hwbp_fidelity/block_{j}_cosine``, ``..._rel_error``), plus ``hwbp_fidelity/k`` and
  ``hwbp_fidelity/iterations``: the Highway gradient against the exact gradient on the first micro-batch of that
  step (this needs ``compute_loss``, which callbacks do not have). The measurement leaves the training gradients and
  the RNG streams as they were. If the step has no training log entry (``logging_steps`` does not divide it) the
  fidelity metrics get an entry of their own;
- ``create_model_card`` tags the card ``hf_hwbp`` and appends the Highway section (``hf_hwbp.model_card``).

Evaluation and prediction run the plain model (the patch is inactive in eval mode and under ``torch.no_grad``).

Layer-parallel training (one process per stage) is its own trainer, ``hf_hwbp.LayerParallelTrainer``
(``hf_hwbp.layer_parallel_trainer``); this one refuses arguments with ``layer_parallel=True``, naming it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .arguments import HighwayArguments
from .callback import MODEL_TAG, HighwayCallback, place_first
from .fidelity import measure_fidelity
from .peft_checks import check_peft_model
from .training_config import HighwayTrainingConfig, UnsupportedTrainingSetupError

logger = logging.getLogger(__name__)

FIDELITY_PREFIX = "hwbp_fidelity/"


class HighwayTrainer(Trainer):
    """``transformers.Trainer`` that trains with Highway-BP (see the module docstring).

    Args:
        *args, **kwargs: as for ``Trainer``. The Highway settings come from ``args`` when it carries them
            (``HighwayTrainingArguments``), else from ``highway_config``, else the ``HighwayTrainingConfig``
            defaults.
        highway_config: a ``HighwayTrainingConfig`` (or dict) for arguments without Highway settings (plain
            ``TrainingArguments``, TRL configs, ...).
        k_schedule: optional callable ``step -> k`` used instead of the k / k_schedule settings (see
            ``HighwayCallback``).

    Raises:
        UnsupportedTrainingSetupError: arguments with ``layer_parallel=True`` (``LayerParallelTrainer`` trains them),
            a ``HighwayCallback`` among ``callbacks`` (this trainer has its own), settings given in two places.
    """

    runs_layer_parallel = False
    """True for ``LayerParallelTrainer``: its callback drives a layer-parallel runner instead of patching."""

    def __init__(
        self,
        *args,
        highway_config: HighwayTrainingConfig | dict[str, Any] | None = None,
        k_schedule: Callable[[int], int] | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is not None:
            check_peft_model(model)  # before Trainer.__init__ builds anything around the model
        self.highway_callback = HighwayCallback(highway_config, k_schedule=k_schedule)
        self.highway_callback.fidelity_by_trainer = True
        self.highway_callback.layer_parallel_by_trainer = self.runs_layer_parallel
        self.highway_callback.check_layer_parallel(training_args)
        self._hwbp_fidelity_step: int | None = None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(isinstance(cb, HighwayCallback) or cb is HighwayCallback for cb in callbacks):
            raise UnsupportedTrainingSetupError(
                f"{type(self).__name__} has its own HighwayCallback: pass the settings as highway_config= (or in the "
                "arguments), or use a plain Trainer with callbacks=[HighwayCallback(...)]."
            )
        super().__init__(*args, callbacks=[*callbacks, self.highway_callback], **kwargs)
        place_first(self, self.highway_callback)  # ahead of the report_to integrations

    @property
    def highway_config(self) -> HighwayTrainingConfig:
        """The Highway settings of this trainer."""
        return self.highway_callback.config

    # ----- fidelity ---------------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        callback = self.highway_callback
        every = callback.config.fidelity_steps if callback.enabled else 0
        step = self.state.global_step
        if every and (step + 1) % every == 0 and self._hwbp_fidelity_step != step:
            self._hwbp_fidelity_step = step  # first micro-batch of the optimizer step only
            self._hwbp_measure_fidelity(model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    def _hwbp_measure_fidelity(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch) -> None:
        """Fidelity of this step's settings on ``inputs``; RNG streams and .grad are left as they were."""
        target = self.model if self.model is not None else model
        target.train()
        prepared = self._prepare_inputs(dict(inputs))

        def loss_fn(m: nn.Module) -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(m, dict(prepared), num_items_in_batch=num_items_in_batch)
            return loss.mean() if loss.dim() > 0 else loss

        devices = sorted(
            {p.device.index for p in target.parameters() if p.device.type == "cuda" and p.device.index is not None}
        )
        with torch.random.fork_rng(devices=devices):
            report = measure_fidelity(target, loss_fn)
        logs = report.as_log_dict(FIDELITY_PREFIX)
        logs[f"{FIDELITY_PREFIX}k"] = report.k
        if report.iterations is not None:
            logs[f"{FIDELITY_PREFIX}iterations"] = report.iterations
        self.highway_callback.add_to_next_log(logs)

    def _maybe_log_save_evaluate(self, *args, **kwargs) -> None:
        # Fidelity metrics measured on a step without a training log entry get an entry of their own (before any
        # evaluation or checkpoint of this step, so the checkpoint's log_history has them).
        callback = self.highway_callback
        if callback.has_pending_logs:
            will_log = self.control.should_log and self.state.global_step > getattr(self, "_globalstep_last_logged", -1)
            if not will_log:
                self.log(callback.pop_pending_logs())
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``. Beside the model: ``hwbp_config.json`` (the Highway settings,
        ``HighwayTrainingConfig.from_pretrained`` reads it) and ``training_args.bin`` as the plain arguments class
        (``TrainingArguments``, or the class the Highway mixin was added to), which unpickles without hf_hwbp
        installed; the Highway settings are in it as plain values."""
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and os.path.isdir(output_dir):
            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(plain_training_arguments(self.args), os.path.join(output_dir, TRAINING_ARGS_NAME))
            callback = self.highway_callback
            if callback.enabled:
                (callback.config or callback.resolve_settings(self.args)).save_pretrained(output_dir)

    # ----- model card -------------------------------------------------------------------------------------------
    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """The Trainer's model card, tagged ``hf_hwbp``, with the Highway section (settings, k used, fidelity)."""
        from .model_card import add_highway_section

        tags = [tags] if isinstance(tags, str) else list(tags or [])
        if self.highway_callback.enabled and MODEL_TAG not in tags:
            tags.append(MODEL_TAG)
        dataset = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        if getattr(dataset, "builder_name", "") is None:  # built in memory (an embedded corpus): no hub dataset tag
            for name in ("dataset_tags", "dataset_args"):
                kwargs.setdefault(name, [])
        super().create_model_card(*args, tags=tags, **kwargs)
        if self.is_world_process_zero():
            _fix_from_scratch_card(os.path.join(self.args.output_dir, "README.md"))
        add_highway_section(self)


def plain_training_arguments(args: TrainingArguments) -> TrainingArguments:
    """A copy of ``args`` whose class is the first arguments class of its MRO without the Highway mixin
    (``HighwayTrainingArguments`` -> ``TrainingArguments``): pickles without a reference to hf_hwbp."""
    base = next(
        (c for c in type(args).__mro__ if issubclass(c, TrainingArguments) and not issubclass(c, HighwayArguments)),
        None,
    )
    if base is None or base is type(args):
        return args
    plain = copy.copy(args)
    plain.__class__ = base
    return plain


def _fix_from_scratch_card(readme: str) -> None:
    """transformers calls a model with an empty ``_name_or_path`` (built from a config) "a fine-tuned version of []":
    say what it is."""
    if not os.path.exists(readme):
        return
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    fixed = text.replace(
        "This model is a fine-tuned version of [](https://huggingface.co/) on ",
        "This model was trained from scratch on ",
    )
    if fixed != text:
        with open(readme, "w", encoding="utf-8") as f:
            f.write(fixed)


__all__ = ["FIDELITY_PREFIX", "HighwayTrainer", "plain_training_arguments"]
