"""HighwayCallback: Highway-BP for any transformers Trainer (Trainer, Seq2SeqTrainer, TRL's SFTTrainer, ...).

    from hf_hwbp import HighwayCallback, HighwayTrainingConfig

    config = HighwayTrainingConfig(k=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[HighwayCallback(config)])
    trainer.train()

What it does, at the Trainer's own events:

- when the Trainer is built and when training begins: refuses FSDP and DeepSpeed (``hf_hwbp.distributed_support``)
  and LoRA targets that match nothing (``hf_hwbp.peft_checks``);
- at train begin: patches the model (the transformers model inside PEFT / DDP / Accelerate wrappers) with the
  settings of the first step, and tags it ``hf_hwbp`` for the model card;
- before every optimizer step: sets the model's ``HighwayConfig`` to ``config.engine_config(state.global_step, ...)``
  (k from the schedule, no adaptive stop on exact steps), so a run resumed from a checkpoint continues the schedule
  where it stopped (and the model card lists the k of the steps trained before the resume too);
- after every micro-batch: reads how many Highway iterations its backward ran (``last_highway_iterations``, which
  it only reads: a callback of yours sees the same number) and keeps its own count; if a whole optimizer step
  recorded no Highway forward although the stack has trainable parameters and the step is not exact, it raises a
  ``HighwayBPError`` (the loss came from another model than the one the Trainer gives its callbacks);
- on every training log entry (the ones with ``"loss"``): adds ``hwbp_k`` (the k the last optimizer step ran, clamped
  to the number of Highway blocks) and
  ``hwbp_iterations`` (iterations per backward since the previous entry, averaged) to the entry the Trainer records
  in ``state.log_history`` and to the ``logs`` dict that the callbacks after this one receive;
- at train end: unpatches the model (or restores the settings it had if the caller had patched it).

In layer-parallel training (``LayerParallelTrainer``) the trainer hands the callback its runner (``use_runner``): the
callback then patches nothing and applies the schedule to the runner, which runs the Highway backward of this rank's
stage; the logs are the same.

Settings: ``HighwayCallback(config)`` with a ``HighwayTrainingConfig`` (or its dict; a ``HighwayConfig`` trains
with those engine settings at every step); ``HighwayCallback()`` reads them from training arguments that carry
Highway settings (``HighwayTrainingArguments`` or any arguments class with the ``HighwayArguments`` mixin, whose
``use_highway_bp=False`` turns the callback off), else uses the ``HighwayTrainingConfig`` defaults. Refusals raise
``HighwayBPError`` (``UnsupportedTrainingSetupError`` for a set-up the callback cannot train).

Logging order: the Trainer calls its callbacks in list order, and the ``report_to`` integrations (TensorBoard, W&B,
...) are created before the callbacks passed as ``callbacks=[...]``. Use ``add_highway_callback(trainer, ...)`` (or
``HighwayTrainer``) to put this callback ahead of them, so that they receive ``hwbp_k`` / ``hwbp_iterations`` too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import DefaultFlowCallback, TrainerCallback

from .api import highway_state, is_patched, patch_model, unpatch_model, unwrap_model
from .arguments import highway_settings_of
from .config import HighwayConfig
from .discovery import find_stacks
from .distributed_support import check_distributed_support
from .errors import HighwayBPError
from .peft_checks import check_peft_model
from .schedules import CallableSchedule, KSchedule
from .training_config import HighwayTrainingConfig, UnsupportedTrainingSetupError

logger = logging.getLogger(__name__)

MODEL_TAG = "hf_hwbp"
"""Tag added to a model trained with Highway-BP (it reaches the model card through the Trainer)."""

_DEFAULT_K = HighwayTrainingConfig().k


class HighwayCallback(TrainerCallback):
    """Trains with Highway-BP under any ``transformers.Trainer`` (see the module docstring).

    Args:
        config: the settings (``HighwayTrainingConfig`` or a dict of its fields). None: read them from the training
            arguments (``HighwayArguments``), else the ``HighwayTrainingConfig`` defaults.
        k_schedule: optional callable ``step -> k`` (an int >= 0) used instead of ``k`` / ``k_schedule``; ``step``
            is ``state.global_step`` before the optimizer step, i.e. the 0-based index of the step about to run. A
            ``KSchedule`` works too; where its ``exact_at(step)`` is true the adaptive stop is dropped.
    """

    def __init__(
        self,
        config: HighwayTrainingConfig | dict[str, Any] | None = None,
        *,
        k_schedule: Callable[[int], int] | None = None,
    ):
        if isinstance(config, dict):
            config = HighwayTrainingConfig.from_dict(config)
        if isinstance(config, HighwayConfig):
            config = HighwayTrainingConfig.from_engine_config(config)
        if config is not None and not isinstance(config, HighwayTrainingConfig):
            raise TypeError(
                f"config must be a HighwayTrainingConfig (or a HighwayConfig), a dict or None, not "
                f"{type(config).__name__}."
            )
        self._given_config = config
        self._user_schedule = None if k_schedule is None else CallableSchedule(k_schedule)
        self.config: HighwayTrainingConfig | None = None  # resolved from config / the training arguments
        self.enabled = True
        self.fidelity_by_trainer = False  # set by HighwayTrainer, which measures fidelity itself
        self.layer_parallel_by_trainer = False  # set by LayerParallelTrainer, which runs the layer-parallel mode
        self._model: nn.Module | None = None  # the patched (unwrapped) model during a run
        self._runner = None  # a layer-parallel runner that runs the Highway backward instead of a patch
        self._target: _PatchTarget | _RunnerTarget | None = None  # where k is set and iterations are read
        self._restore: tuple[HighwayConfig, bool] | None = None  # a caller's own patch, put back at train end
        self._schedule_cache: tuple[tuple, KSchedule] | None = None
        self._pending_logs: dict[str, float] = {}
        self._reset_counters()
        self.last_k: int | None = None
        self.num_blocks: int | None = None  # of the model patched by the last run
        self.k_history: list[tuple[int, int]] = []  # (first optimizer step, k) at every change of k: the model card

    # ----- settings ---------------------------------------------------------------------------------------------
    def resolve_settings(self, args: Any) -> HighwayTrainingConfig:
        """Settle the settings against the training arguments (once per callback); return them."""
        from_args = highway_settings_of(args)
        if self._given_config is not None:
            if from_args is not None and from_args[1] != self._given_config:
                raise UnsupportedTrainingSetupError(
                    f"HighwayCallback got {self._given_config} but the training arguments carry {from_args[1]} "
                    "(hwbp_config / --hwbp_*): give the settings in one place (HighwayCallback() reads them from the "
                    "arguments)."
                )
            config, enabled = self._given_config, from_args[0] if from_args is not None else True
        elif from_args is not None:
            enabled, config = from_args
        else:
            config, enabled = HighwayTrainingConfig(), True
        if self._user_schedule is not None and (config.k_schedule != "constant" or config.k != _DEFAULT_K):
            raise UnsupportedTrainingSetupError(
                "Pass either k_schedule=<callable> or the k / k_schedule settings, not both (k_schedule replaces them)."
            )
        self.config, self.enabled = config, enabled
        return config

    def schedule(self, num_blocks: int, total_steps: int) -> KSchedule:
        """The k schedule of this run for a model with ``num_blocks`` Highway blocks and ``total_steps`` steps."""
        if self._user_schedule is not None:
            return self._user_schedule
        config = self.config if self.config is not None else HighwayTrainingConfig()
        key = (num_blocks, total_steps)
        if self._schedule_cache is None or self._schedule_cache[0] != key:
            self._schedule_cache = (key, config.schedule(num_blocks, total_steps))
        return self._schedule_cache[1]

    def engine_config(self, step: int, num_blocks: int, total_steps: int) -> HighwayConfig:
        """What the model's backward runs at optimizer step ``step`` (0-based): k from the schedule, no adaptive stop
        on a step the schedule makes exact."""
        config = self.config if self.config is not None else HighwayTrainingConfig()
        schedule = self.schedule(num_blocks, total_steps)
        return config.engine_config(step, num_blocks=num_blocks, total_steps=total_steps, schedule=schedule)

    def check_layer_parallel(self, args) -> None:
        """Refuse layer-parallel arguments unless a LayerParallelTrainer drives this callback."""
        if getattr(args, "layer_parallel", False) and not self.layer_parallel_by_trainer:
            raise UnsupportedTrainingSetupError(
                "layer_parallel=True is run by hf_hwbp.LayerParallelTrainer (its training step drives the stages); "
                "this Trainer would silently train without it. Use LayerParallelTrainer, or set layer_parallel=False."
            )

    def use_runner(self, runner) -> None:
        """Drive a layer-parallel runner (``hf_hwbp.parallel.LayerParallelHighway``) instead of patching the model:
        set its k (and adaptive stop) from the schedule, read its iterations. None: patch the model again."""
        self._runner = runner

    # ----- lifecycle --------------------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.check_layer_parallel(args)
        self.resolve_settings(args)
        if self.enabled:
            check_distributed_support(model, args)
            if model is not None:
                check_peft_model(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.check_layer_parallel(args)
        if self.config is None:  # added after the Trainer was built: on_init_end did not run
            self.resolve_settings(args)
        if model is None:
            raise UnsupportedTrainingSetupError(
                "HighwayCallback needs the Trainer's model; the Trainer passed none to its callbacks."
            )
        target = unwrap_model(model)
        self._model = target
        self._restore = None
        if self._runner is not None:
            self._begin_with_runner(target, state)
            return
        if is_patched(target):
            patch = highway_state(target)
            self._restore = (patch.config, patch.enabled)
        if not self.enabled:
            if is_patched(target):  # a model patched by the caller trains with plain backprop too
                highway_state(target).enabled = False
            if self.config.fidelity_steps:
                logger.warning("Highway-BP fidelity_steps is ignored with use_highway_bp=False.")
            return
        check_distributed_support(model, args)
        check_peft_model(model)
        if self.config.fidelity_steps and not self.fidelity_by_trainer:
            logger.warning(
                "HighwayTrainingConfig.fidelity_steps is measured by HighwayTrainer only (it needs the loss function); "
                "this Trainer will not log hwbp_fidelity/*."
            )
        # Patched with the settings of the first step, so that patch_model's log line says what will run.
        first = self.engine_config(state.global_step, self._blocks_before_patching(target), state.max_steps)
        patch_model(target, **first.to_dict())
        highway_state(target).enabled = True
        self._start(target, _PatchTarget(target), state)

    def _blocks_before_patching(self, model: nn.Module) -> int:
        """Highway blocks the model will have under this run's group_size (for the first step's k)."""
        stacks = highway_state(model).stacks if is_patched(model) else find_stacks(model)
        group_size = self.config.group_size
        return max((-(-len(stack) // group_size) for stack in stacks), default=0)

    def _begin_with_runner(self, model: nn.Module, state) -> None:
        if not self.enabled:
            return
        if is_patched(model):
            raise UnsupportedTrainingSetupError(
                "Layer-parallel training runs the Highway backward itself: unpatch the model (hf_hwbp.unpatch_model) "
                "before training it with LayerParallelTrainer."
            )
        self._start(model, _RunnerTarget(self._runner), state)

    def _start(self, model: nn.Module, target, state) -> None:
        self._target = target
        self.num_blocks = target.num_blocks
        if callable(getattr(model, "add_model_tags", None)):
            model.add_model_tags([MODEL_TAG])
        self._reset_counters()
        self._pending_logs.clear()
        self.k_history = self._history_before(state)
        self._report_settings(model, target, state)
        self._apply_schedule(state)

    def _history_before(self, state) -> list[tuple[int, int]]:
        """``k_history`` of the steps a resumed run has already trained (the schedule is pure: the same step gives
        the same k), checked against the ``hwbp_k`` the checkpoint's log recorded; empty when they disagree (the
        card then says those steps are not known)."""
        done, blocks = state.global_step, self._target.num_blocks
        if done <= 0:
            return []
        schedule = self.schedule(blocks, state.max_steps)
        ks = [min(schedule(step), blocks) for step in range(done)]
        logged = {e["step"]: e["hwbp_k"] for e in state.log_history if "hwbp_k" in e and 1 <= e.get("step", 0) <= done}
        if any(ks[step - 1] != k for step, k in logged.items()):
            logger.warning(
                f"Highway-BP: the k schedule now gives other k than the resumed run logged for its first {done} steps "
                "(the settings changed?): the model card lists the k of the steps trained from here on only."
            )
            return []
        history: list[tuple[int, int]] = []
        for step, k in enumerate(ks, start=1):
            if not history or history[-1][1] != k:
                history.append((step, k))
        return history

    def _report_settings(self, model: nn.Module, target, state) -> None:
        """Log what will run (k clamped to the blocks, 'auto' resolved); warn about settings that do nothing."""
        config, blocks = self.config, target.num_blocks
        layers = getattr(getattr(target, "patch", None), "num_layers", None)
        name = type(model).__name__
        # A patched model says these two itself (patch_model warns once per setting); a layer-parallel runner does not.
        if self._runner is not None and blocks <= 1 and layers is not None and layers > 1:
            logger.warning(
                f"Highway-BP: group_size {config.group_size} puts all {layers} layers of {name} into one Highway "
                "block: that is plain backprop (no Highway iteration can run). Use a group_size below the number of "
                f"layers (e.g. {max(1, layers // 2)}), or use_highway_bp=False."
            )
        if self._runner is not None and self._user_schedule is None and isinstance(config.k, int) and config.k > blocks:
            logger.warning(
                f"Highway-BP: k={config.k} is more than the {blocks} Highway blocks of {name}: k is clamped to "
                f"{blocks}, which is exact backprop (at least backprop's cost). Use a k below the number of blocks."
            )
        schedule = self.schedule(blocks, state.max_steps)
        if schedule.exact_at(state.global_step):  # a schedule's exact steps come last: all the remaining ones
            reason = (
                f"exact_last_steps={config.exact_last_steps} is not below the run's {state.max_steps} optimizer steps"
                if self._user_schedule is None and config.k_schedule == "exact_last"
                else "the k schedule makes the first step exact"
            )
            logger.warning(
                f"Highway-BP: every step of this run is exact backprop ({reason}): no step trains with Highway-BP. "
                "Ask for fewer exact steps than max_steps, or use_highway_bp=False."
            )
        if config.k == "auto":
            k_text = f"auto = up to {blocks} iterations, stopping at tol={config.tol:g}"
        elif self._user_schedule is not None:
            k_text = "from your k_schedule"
        else:
            k_text = str(min(config.k, blocks))
        logger.info(
            f"Highway-BP on {name}: {blocks} Highway blocks (group_size {config.group_size}), k {k_text}, "
            f"schedule {config.k_schedule}."
        )

    def on_step_begin(self, args, state, control, **kwargs):
        if self._active():
            self._apply_schedule(state)
            self._backwards_this_step = 0
            self._target.mark()

    def on_substep_end(self, args, state, control, **kwargs):
        if self._active():
            self._collect_iterations()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._active():
            return
        self._collect_iterations()
        if self._backwards_this_step == 0 and not self._exact_step and self._target.has_stack_parameters():
            raise HighwayBPError(
                f"Highway-BP: optimizer step {state.global_step + 1} ran no Highway backward, although "
                f"{type(self._model).__name__} (the model HighwayCallback patched) has trainable parameters in its "
                "stack: the Trainer computes its loss with another model than the one it passes to its callbacks, or "
                "outside of training mode. Patch the model that is trained (hf_hwbp.patch_model), or give the "
                "Trainer that model."
            )
        if not self.k_history or self.k_history[-1][1] != self.last_k:
            self.k_history.append((state.global_step + 1, self.last_k))  # steps are 1-based in the logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._active() or logs is None or "loss" not in logs:  # only training entries (not eval / summary)
            return
        extra: dict[str, float] = {}
        if self.last_k is not None:
            extra["hwbp_k"] = self.last_k
        if self._iteration_count:
            extra["hwbp_iterations"] = self._iteration_sum / self._iteration_count
        extra.update(self.pop_pending_logs())
        self._iteration_sum, self._iteration_count = 0, 0
        logs.update(extra)
        # The Trainer appended {**logs, "step": ...} to log_history just before calling on_log: complete that entry.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            entry = state.log_history[-1]
            if entry.get("loss") is logs.get("loss"):  # the same float object (also when it is NaN)
                entry.update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        model, self._model = self._model, None
        self._target = None
        if model is None or self._runner is not None:  # a runner: nothing was patched
            return
        if self._restore is None:
            unpatch_model(model)
        else:
            patch = highway_state(model)
            patch.config, patch.enabled = self._restore
        self._restore = None

    # ----- helpers ----------------------------------------------------------------------------------------------
    def add_to_next_log(self, values: dict[str, float]) -> None:
        """Values to add to the next training log entry (``HighwayTrainer`` uses it for fidelity metrics)."""
        self._pending_logs.update(values)

    @property
    def has_pending_logs(self) -> bool:
        return bool(self._pending_logs)

    def pop_pending_logs(self) -> dict[str, float]:
        pending, self._pending_logs = self._pending_logs, {}
        return pending

    @property
    def patched_model(self) -> nn.Module | None:
        """The model this callback patched for the current run (None outside of training)."""
        return self._model

    def _active(self) -> bool:
        return self.enabled and self._target is not None

    def _reset_counters(self) -> None:
        self._iteration_sum = 0
        self._iteration_count = 0
        self._backwards_this_step = 0
        self._exact_step = False

    def _apply_schedule(self, state) -> None:
        """Set the engine settings (k, adaptive stop) of the optimizer step ``state.global_step``."""
        blocks = self._target.num_blocks
        engine = self.engine_config(state.global_step, blocks, state.max_steps)
        self._target.set(engine)
        self.last_k = min(engine.k, blocks)  # what runs: k past the number of blocks is exact backprop
        self._exact_step = engine.tol is None and engine.k >= blocks

    def _collect_iterations(self) -> None:
        iterations = self._target.read_iterations()
        if iterations is None and self._exact_step:
            iterations = self._target.num_blocks  # an exact step may run plain autograd: it counts as L iterations
        if iterations is not None:
            self._iteration_sum += iterations
            self._iteration_count += 1
            self._backwards_this_step += 1


class _PatchTarget:
    """The schedule's view of a patched model: k and tol go into its patch, iterations come from its backward."""

    @property
    def num_blocks(self) -> int:
        return self.patch.num_blocks

    def set(self, engine: HighwayConfig) -> None:
        if self.patch.config != engine:
            self.patch.config = engine

    def __init__(self, model: nn.Module):
        self.patch = highway_state(model)
        self._seen_forwards = self.patch.recorded_forwards

    def mark(self) -> None:
        """Start a new optimizer step: only Highway forwards recorded from now on count."""
        self._seen_forwards = self.patch.recorded_forwards

    def read_iterations(self) -> int | None:
        """Iterations of the backward that followed the Highway forward(s) recorded since the last read; None when
        none was recorded. Reads the public value without clearing it (a user's callback sees it too)."""
        forwards = self.patch.recorded_forwards
        if forwards == self._seen_forwards:
            return None
        self._seen_forwards = forwards
        return self.patch.last_iterations or 0

    def has_stack_parameters(self) -> bool:
        return any(self.patch.block_parameters())


class _RunnerTarget:
    """The schedule's view of a layer-parallel runner (``LayerParallelHighway``): the same operations."""

    def __init__(self, runner):
        self.runner = runner

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    def set(self, engine: HighwayConfig) -> None:
        if self.runner.k != engine.k or self.runner.tol != engine.tol:
            self.runner.k, self.runner.tol = engine.k, engine.tol

    def mark(self) -> None:
        self.runner.last_iterations = None  # the runner's own record (not a public per-model value)

    def read_iterations(self) -> int | None:
        iterations, self.runner.last_iterations = self.runner.last_iterations, None
        return iterations

    def has_stack_parameters(self) -> bool:
        return any(self.runner.stage.block_parameters())


def add_highway_callback(
    trainer,
    config: HighwayTrainingConfig | dict[str, Any] | None = None,
    *,
    k_schedule: Callable[[int], int] | None = None,
) -> HighwayCallback:
    """Add a ``HighwayCallback`` to an existing Trainer, ahead of its ``report_to`` integrations; return it.

    Works on any Trainer instance (TRL's included). Call it before ``trainer.train()``.
    """
    callback = HighwayCallback(config, k_schedule=k_schedule)
    place_first(trainer, callback)
    tag_names = getattr(trainer, "_tag_names", None)  # TRL's trainers write their card's tags from this list
    if isinstance(tag_names, list) and MODEL_TAG not in tag_names:
        trainer._tag_names = [*tag_names, MODEL_TAG]
    callback.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    return callback


def place_first(trainer, callback: TrainerCallback) -> None:
    """Put ``callback`` right after the Trainer's DefaultFlowCallback (before the report_to integrations)."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    index = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    callbacks.insert(index, callback)


__all__ = ["MODEL_TAG", "HighwayCallback", "add_highway_callback", "place_first"]
