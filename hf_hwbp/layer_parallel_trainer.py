"""LayerParallelTrainer: ``HighwayTrainer`` that trains one pipeline stage of the model per process.

    from hf_hwbp import HighwayTrainingArguments, LayerParallelTrainer

    args = HighwayTrainingArguments(output_dir="out", hwbp_k=1, layer_parallel=True, layer_parallel_microbatches=4)
    LayerParallelTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid).train()  # under torchrun

Launched with one process per stage (``torchrun --nproc_per_node S`` or ``accelerate launch --num_processes S``), it
builds this rank's ``LayerParallelHighway`` runner (``hf_hwbp.parallel.trainer_mode.LayerParallelTraining``), hands
it to its ``HighwayCallback`` (which sets the runner's k from the schedule instead of patching), and routes the
Trainer's training step, optimizer, data loading, gradient clipping, evaluation, saving and checkpoints through it:
no DDP, every rank gets the same batches, and the stages' weights are gathered into the whole model before
evaluation and saving. The card, ``hwbp_config.json`` and the logs are ``HighwayTrainer``'s; fidelity logging is
refused (it needs the whole model's exact gradient on one process). ``use_highway_bp=False`` trains with pipeline
backprop over the same stages.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .api import unwrap_model
from .arguments import check_layer_parallel_settings
from .errors import HighwayBPError
from .trainer import HighwayTrainer
from .training_config import UnsupportedTrainingSetupError


class LayerParallelTrainer(HighwayTrainer):
    """``HighwayTrainer`` in layer-parallel mode (see the module docstring).

    Raises:
        UnsupportedTrainingSetupError: what this mode does not do, before the Trainer builds anything: an
            unsupported model, PEFT, a custom loss, label smoothing, an optimizer instance, activation checkpointing,
            fp16, fidelity logging, an adaptive stop with several micro-batches.
        HighwayBPError: ``torch.distributed`` is not initialized (the script was not launched with one process per
            stage).
    """

    runs_layer_parallel = True

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        _check_layer_parallel_trainer(type(self), model, training_args, kwargs)
        self._layer_parallel_training = None  # hf_hwbp.parallel.trainer_mode.LayerParallelTraining, built lazily
        super().__init__(*args, **kwargs)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise HighwayBPError(
                "LayerParallelTrainer trains one pipeline stage per process: launch the script with "
                "`torchrun --nproc_per_node <stages> ...` or `accelerate launch --num_processes <stages> ...`."
            )

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
                microbatches=getattr(self.args, "layer_parallel_microbatches", 1),
            )
            self._layer_parallel_training = current
            callback.use_runner(current.runner)
        return current

    # ----- the step -------------------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        training = self.layer_parallel_training()
        self.model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.accelerator.autocast():
            return training.step(inputs, num_items_in_batch)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        if not training:
            return super()._wrap_model(model, training, dataloader)
        from .parallel.trainer_mode import LayerParallelModel

        runner = self.layer_parallel_training().runner
        if isinstance(model, LayerParallelModel) and model.runner is runner:
            return model
        return LayerParallelModel(self.model, runner)  # not self.model: Accelerate prepares the optimizer only

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return super().create_optimizer(model)
        return super().create_optimizer(self.layer_parallel_training().stage)  # this rank's stage only

    # ----- data: every rank gets every batch --------------------------------------------------------------------
    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        _same_batches_on_every_rank(dataloader)
        return dataloader

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps  # the ranks share every batch

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
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

    # ----- gradient norm over all stages ------------------------------------------------------------------------
    def _clip_grad_norm(self, model: nn.Module):
        return self.layer_parallel_training().grad_norm(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is None:
            return self.layer_parallel_training().grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ----- the whole model: evaluation, saving, checkpoints -----------------------------------------------------
    def _sync_model(self) -> None:
        if self._layer_parallel_training is not None:
            self._layer_parallel_training.sync_model()

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        self._sync_model()  # every rank evaluates the whole trained model (data-parallel)
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._sync_model()
        return super().predict(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As ``HighwayTrainer.save_model``; call it on every rank (it gathers the stages)."""
        self._sync_model()
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from transformers.trainer import SCHEDULER_NAME

        self.layer_parallel_training().save_optimizer(self.optimizer, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        torch.distributed.barrier()  # the checkpoint is complete on every rank before anyone goes on

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        self.layer_parallel_training().load_optimizer(self.optimizer, checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _finalize_training(self, *args, **kwargs):
        self._sync_model()  # after train(), every rank holds the whole trained model
        return super()._finalize_training(*args, **kwargs)


def _check_layer_parallel_trainer(trainer_class: type, model: nn.Module | None, args, kwargs: dict) -> None:
    """Refuse what layer-parallel training does not do, before the Trainer builds anything."""
    from .parallel.arch import recipe_for

    check_layer_parallel_settings(args)
    if model is not None:
        if unwrap_model(model) is not model or hasattr(model, "peft_config"):
            raise UnsupportedTrainingSetupError(
                "layer_parallel cuts a plain transformers model into stages; PEFT / LoRA models and wrapped models are "
                "not supported. Train LoRA with the single-process or DDP path (HighwayTrainer)."
            )
        recipe_for(model)  # an UnsupportedModelError naming the supported models
    if kwargs.get("compute_loss_func") is not None or trainer_class.compute_loss is not Trainer.compute_loss:
        raise UnsupportedTrainingSetupError(
            "layer_parallel computes the loss with the model's own loss function on the last stage; a custom loss "
            "(compute_loss_func, or a compute_loss override) is not supported."
        )
    if getattr(args, "label_smoothing_factor", 0):
        raise UnsupportedTrainingSetupError(
            "layer_parallel does not support label_smoothing_factor > 0 (the model's own loss is used)."
        )
    optimizers = kwargs.get("optimizers")
    if optimizers is not None and optimizers[0] is not None:
        raise UnsupportedTrainingSetupError(
            "layer_parallel builds each rank's optimizer over its own stage: pass the optimizer class instead of an "
            "instance (optimizer_cls_and_kwargs=(cls, kwargs), or args.optim)."
        )
    if getattr(args, "activation_checkpointing", False):
        raise UnsupportedTrainingSetupError(
            "layer_parallel does not support activation (gradient) checkpointing yet; turn it off."
        )


def _same_batches_on_every_rank(dataloader) -> None:
    """Make Accelerate's data loader give every rank every batch (layer-parallel ranks share the data)."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher

    if isinstance(dataloader, DataLoaderDispatcher):
        raise UnsupportedTrainingSetupError(
            "layer_parallel needs a map-style training dataset (with __len__): Accelerate dispatches an iterable "
            "dataset's batches in slices across the ranks, and every stage needs the whole batch."
        )
    sampler = getattr(dataloader, "batch_sampler", None)
    if isinstance(sampler, BatchSamplerShard):
        sampler.num_processes, sampler.process_index = 1, 0


__all__ = ["LayerParallelTrainer"]
