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

Layer-parallel training (``HighwayTrainingArguments(layer_parallel=True)``, one process per stage under ``torchrun``
or ``accelerate launch``): the trainer builds a ``LayerParallelHighway`` runner for this rank's stage, hands it to the
callback (which sets its k from the schedule instead of patching), and its training step, gradient clipping,
evaluation, saving and checkpoints go through ``hf_hwbp.parallel.trainer_mode`` (no DDP; every rank gets the same
batches; the stages' weights are gathered into the whole model before evaluation and saving).
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

from .api import unwrap_model
from .arguments import HighwayArguments, HighwayTrainingArguments
from .callback import MODEL_TAG, HighwayCallback, place_first
from .config import AUTO_DEFAULT_TOL, HighwayConfig
from .fidelity import measure_fidelity
from .peft_checks import check_lora_targets, check_peft_model

logger = logging.getLogger(__name__)

FIDELITY_PREFIX = "hwbp_fidelity/"


class HighwayTrainer(Trainer):
    """``transformers.Trainer`` that trains with Highway-BP (see the module docstring).

    Args:
        *args, **kwargs: as for ``Trainer``. The Highway settings come from ``args`` when it carries them
            (``HighwayTrainingArguments``), else from ``highway_config``, else the ``HighwayConfig`` defaults.
        highway_config: a ``HighwayConfig`` (or dict) for arguments without Highway settings (plain
            ``TrainingArguments``, TRL configs, ...).
        k_schedule: optional callable ``step -> k`` used instead of the k / k_schedule settings (see
            ``HighwayCallback``).

    Raises:
        ValueError: in layer-parallel mode, a setting that mode does not support (an unsupported model, PEFT, a
            custom loss, label smoothing, an optimizer instance, activation checkpointing).
        RuntimeError: layer-parallel mode without one process per stage (``torch.distributed`` not initialized).
    """

    def __init__(
        self,
        *args,
        highway_config: HighwayConfig | dict[str, Any] | None = None,
        k_schedule: Callable[[int], int] | None = None,
        **kwargs,
    ):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is not None:
            check_peft_model(model)  # before Trainer.__init__ builds anything around the model
        self.layer_parallel = bool(getattr(training_args, "layer_parallel", False))
        if self.layer_parallel:
            _check_layer_parallel_trainer(self, model, training_args, kwargs)
        self.highway_callback = HighwayCallback(highway_config, k_schedule=k_schedule)
        self.highway_callback.fidelity_by_trainer = True
        self.highway_callback.layer_parallel_by_trainer = True
        self._hwbp_fidelity_step: int | None = None
        self._layer_parallel_training = None  # hf_hwbp.parallel.trainer_mode.LayerParallelTraining, built lazily
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if any(isinstance(cb, HighwayCallback) or cb is HighwayCallback for cb in callbacks):
            raise ValueError(
                "HighwayTrainer has its own HighwayCallback: pass the settings as highway_config= (or in the "
                "arguments), or use a plain Trainer with callbacks=[HighwayCallback(...)]."
            )
        super().__init__(*args, callbacks=[*callbacks, self.highway_callback], **kwargs)
        place_first(self, self.highway_callback)  # ahead of the report_to integrations
        if self.layer_parallel and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "layer_parallel trains one pipeline stage per process: launch the script with "
                "`torchrun --nproc_per_node <stages> ...` or `accelerate launch --num_processes <stages> ...`."
            )

    @property
    def highway_config(self) -> HighwayConfig:
        """The Highway settings of this trainer."""
        return self.highway_callback.config

    # ----- fidelity ---------------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if self.layer_parallel:
            return self._layer_parallel_step(inputs, num_items_in_batch)
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

    # ----- layer-parallel mode (hf_hwbp.parallel.trainer_mode) --------------------------------------------------
    def layer_parallel_training(self):
        """This rank's ``LayerParallelTraining`` (its runner and stage) for the current model; built on first use."""
        from .parallel.trainer_mode import LayerParallelTraining

        current = self._layer_parallel_training
        if current is None or current.model is not self.model:
            callback = self.highway_callback
            config = callback.config if callback.config is not None else callback.resolve_settings(self.args)
            current = LayerParallelTraining(
                self.model,
                k=config.k if isinstance(config.k, int) else 0,  # the callback sets k from the schedule per step
                group_size=config.group_size,
                use_highway=callback.enabled,
                microbatches=self.args.layer_parallel_microbatches,
            )
            self._layer_parallel_training = current
            callback.use_runner(current.runner)
        return current

    def _layer_parallel_step(self, inputs: dict[str, Any], num_items_in_batch) -> torch.Tensor:
        training = self.layer_parallel_training()
        self.model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():
            return training.step(inputs, num_items_in_batch)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if not (self.layer_parallel and training):
            return super()._wrap_model(model, training, dataloader)
        from .parallel.trainer_mode import LayerParallelModel

        runner = self.layer_parallel_training().runner
        if isinstance(model, LayerParallelModel) and model.runner is runner:
            return model
        return LayerParallelModel(self.model, runner)  # not self.model: Accelerate prepares the optimizer only

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if not self.layer_parallel or self.optimizer is not None:
            return super().create_optimizer(model)
        return super().create_optimizer(self.layer_parallel_training().stage)  # this rank's stage only

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        if self.layer_parallel:
            _same_batches_on_every_rank(dataloader)
        return dataloader

    def get_total_train_batch_size(self, args) -> int:
        if self.layer_parallel:  # the ranks share every batch: no data parallelism
            return self._train_batch_size * args.gradient_accumulation_steps
        return super().get_total_train_batch_size(args)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        if not self.layer_parallel:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        # every rank holds these batches: count their loss terms here, without the data-parallel gather
        return batch_samples, self.layer_parallel_training().count_items(batch_samples)

    def _clip_grad_norm(self, model: nn.Module):
        if self.layer_parallel:
            return self.layer_parallel_training().grad_norm(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if self.layer_parallel and grad_norm is None:
            return self.layer_parallel_training().grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _sync_layer_parallel_model(self) -> None:
        if self.layer_parallel and self._layer_parallel_training is not None:
            self._layer_parallel_training.sync_model()

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self._sync_layer_parallel_model()  # every rank evaluates the whole trained model (data-parallel)
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._sync_layer_parallel_model()
        return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``Trainer.save_model``; in layer-parallel mode call it on every rank (it gathers the stages).

        Beside the model: ``hwbp_config.json`` (the Highway settings, ``HighwayConfig.from_pretrained`` reads it) and
        ``training_args.bin`` as the plain arguments class (``TrainingArguments``, or the class the Highway mixin was
        added to), which unpickles without hf_hwbp installed; the Highway settings are in it as plain values."""
        self._sync_layer_parallel_model()
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and os.path.isdir(output_dir):
            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(plain_training_arguments(self.args), os.path.join(output_dir, TRAINING_ARGS_NAME))
            callback = self.highway_callback
            if callback.enabled:
                (callback.config or callback.resolve_settings(self.args)).save_pretrained(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.layer_parallel:
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import SCHEDULER_NAME

        self.layer_parallel_training().save_optimizer(self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        torch.distributed.barrier()  # the checkpoint is complete on every rank before anyone goes on

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.layer_parallel or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        self.layer_parallel_training().load_optimizer(self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _finalize_training(self, *args, **kwargs):
        self._sync_layer_parallel_model()  # after train(), every rank holds the whole trained model
        return super()._finalize_training(*args, **kwargs)

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


def _check_layer_parallel_trainer(trainer: Trainer, model: nn.Module | None, args, kwargs: dict) -> None:
    """Refuse what layer-parallel training does not do, before the Trainer builds anything."""
    from .parallel.arch import recipe_for

    if model is not None:
        if unwrap_model(model) is not model or hasattr(model, "peft_config"):
            raise ValueError(
                "layer_parallel cuts a plain transformers model into stages; PEFT / LoRA models and wrapped models are "
                "not supported. Train LoRA with the single-process or DDP path (layer_parallel=False)."
            )
        recipe_for(model)  # a ValueError naming the supported models
    if kwargs.get("compute_loss_func") is not None or type(trainer).compute_loss is not Trainer.compute_loss:
        raise ValueError(
            "layer_parallel computes the loss with the model's own loss function on the last stage; a custom loss "
            "(compute_loss_func, or a compute_loss override) is not supported."
        )
    if getattr(args, "label_smoothing_factor", 0):
        raise ValueError("layer_parallel does not support label_smoothing_factor > 0 (the model's own loss is used).")
    optimizers = kwargs.get("optimizers")
    if optimizers is not None and optimizers[0] is not None:
        raise ValueError(
            "layer_parallel builds each rank's optimizer over its own stage: pass the optimizer class instead of an "
            "instance (optimizer_cls_and_kwargs=(cls, kwargs), or args.optim)."
        )
    if getattr(args, "activation_checkpointing", False):
        raise ValueError("layer_parallel does not support activation (gradient) checkpointing yet; turn it off.")


def _same_batches_on_every_rank(dataloader) -> None:
    """Make Accelerate's data loader give every rank every batch (layer-parallel ranks share the data)."""
    try:
        from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return
    if isinstance(dataloader, DataLoaderDispatcher):
        raise ValueError(
            "layer_parallel needs a map-style training dataset (with __len__): Accelerate dispatches an iterable "
            "dataset's batches in slices across the ranks, and every stage needs the whole batch."
        )
    sampler = getattr(dataloader, "batch_sampler", None)
    if isinstance(sampler, BatchSamplerShard):
        sampler.num_processes, sampler.process_index = 1, 0


__all__ = [
    "AUTO_DEFAULT_TOL",
    "HighwayArguments",
    "HighwayTrainer",
    "HighwayTrainingArguments",
    "check_lora_targets",
]
