"""HighwayTrainer: the transformers Trainer with Highway-BP, k schedules and gradient-fidelity logging.

    from hf_hwbp.trainer import HighwayTrainer, HighwayTrainingArguments

    args = HighwayTrainingArguments(output_dir="out", hwbp_k=2, hwbp_fidelity_steps=50, report_to="none")
    trainer = HighwayTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
    trainer.train()

The trainer patches the model it is given (through DDP / PEFT wrappers: the transformers model inside) before
Accelerate wraps it, sets k before every optimizer step from the k schedule at ``state.global_step`` (so a resumed run
continues the schedule where it stopped), and adds to every training log entry (the ones with ``"loss"``):

- ``hwbp_k``: the k used by the last optimizer step (``schedule(global_step - 1)``: the entry with ``"step": N``
  reports the k of the N-th optimizer step);
- ``hwbp_iterations``: the Highway iterations actually run per backward since the previous entry, averaged over the
  backwards (micro-batches) in between (fewer than k with an adaptive stop, ``hwbp_tol``);
- every ``hwbp_fidelity_steps`` optimizer steps, ``hwbp_fidelity/cosine``, ``hwbp_fidelity/rel_error`` and the same
  per Highway block (``hwbp_fidelity/block_{j}_cosine``, ``..._rel_error``), plus ``hwbp_fidelity/k`` and
  ``hwbp_fidelity/iterations``: the Highway gradient against the exact gradient on the first micro-batch of that
  step. The measurement leaves the training gradients and the RNG streams as they were. If the step has no training
  log entry (``logging_steps`` does not divide it) the fidelity metrics get an entry of their own.

Evaluation and prediction run the plain model (the patch is inactive in eval mode and under ``torch.no_grad``).
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .api import exact_backprop, highway_state, is_patched, patch_model
from .fidelity import measure_fidelity
from .schedules import SCHEDULE_NAMES, CallableSchedule, KSchedule, build_schedule

logger = logging.getLogger(__name__)

AUTO_DEFAULT_TOL = 1e-3
"""Adaptive-stop tolerance used with ``hwbp_k="auto"`` when ``hwbp_tol`` is not given."""

FIDELITY_PREFIX = "hwbp_fidelity/"


def _parse_k(value: Any) -> int | str:
    """``hwbp_k`` as an int >= 0 or the string "auto" (accepts "2" from a command line)."""
    original = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"hwbp_k must be an int >= 0 or 'auto' (adaptive stop with hwbp_tol), got {original!r}."
            ) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"hwbp_k must be an int >= 0 or 'auto' (adaptive stop with hwbp_tol), got {original!r}.")
    if value < 0:
        raise ValueError(
            f"hwbp_k must be >= 0 (0 = residual path only, >= number of blocks = exact backprop) or 'auto', "
            f"got {original!r}."
        )
    return int(value)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


@dataclass
class HighwayTrainingArguments(TrainingArguments):
    """TrainingArguments plus the Highway-BP settings (all ``hwbp_*`` fields are ignored when use_highway_bp=False).

    k schedules (``hwbp_k_schedule``); ``step`` is the 0-based index of the optimizer step about to run:

    - ``"constant"``: ``hwbp_k`` at every step.
    - ``"step"``: ``min(hwbp_k + step // hwbp_k_step_every, hwbp_k_max)`` (``hwbp_k_max=None``: the number of
      Highway blocks, i.e. up to exact backprop).
    - ``"exact_last"``: ``hwbp_k``, except exact backprop (k = number of blocks, no adaptive stop) for the last
      ``hwbp_exact_last_steps`` optimizer steps of the run (``step >= max_steps - hwbp_exact_last_steps``).

    ``HighwayTrainer(..., k_schedule=fn)`` replaces the named schedule with any callable ``step -> k``.
    """

    use_highway_bp: bool = field(
        default=True,
        metadata={"help": "Train with Highway backpropagation (False: ordinary backprop, same trainer)."},
    )
    # Annotated `str` (not `int | str`): HfArgumentParser turns `int | str` into type=int, which would reject "auto".
    # __post_init__ turns the value into an int >= 0 or "auto".
    hwbp_k: str = field(
        default=2,
        metadata={
            "help": "Highway iterations k: an int >= 0 (0 = residual path only; >= number of blocks = exact "
            "backprop), or 'auto': up to the number of blocks, stopping adaptively once the relative change of the "
            f"block gradients falls below hwbp_tol (default {AUTO_DEFAULT_TOL} with 'auto'). The starting k of "
            "the 'step' schedule."
        },
    )
    hwbp_tol: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive stop: end the Highway iterations early once ||delta^(n+1) - delta^(n)|| / "
            f"||delta^(n+1)|| < hwbp_tol (> 0). None: always run k iterations ({AUTO_DEFAULT_TOL} with hwbp_k='auto')."
        },
    )
    hwbp_group_size: int = field(
        default=1,
        metadata={"help": "Consecutive layers per Highway block (exact backprop inside a block); 1 = every layer."},
    )
    hwbp_k_schedule: str = field(
        default="constant",
        metadata={
            "help": "k schedule over optimizer steps: 'constant' (hwbp_k); 'step' (hwbp_k + step // "
            "hwbp_k_step_every, capped at hwbp_k_max); 'exact_last' (exact backprop for the last "
            "hwbp_exact_last_steps steps).",
            "choices": list(SCHEDULE_NAMES),
        },
    )
    hwbp_k_step_every: int = field(
        default=100,
        metadata={"help": "'step' schedule: k grows by 1 every this many optimizer steps (>= 1)."},
    )
    hwbp_k_max: int | None = field(
        default=None,
        metadata={"help": "'step' schedule: largest k (>= hwbp_k). None: the number of Highway blocks (exact)."},
    )
    hwbp_exact_last_steps: int = field(
        default=0,
        metadata={"help": "'exact_last' schedule: the last this many optimizer steps use exact backprop (>= 1)."},
    )
    hwbp_fidelity_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimizer steps, compare the Highway gradient with the exact gradient on the "
            "same batch and log hwbp_fidelity/* (cosine, relative error, overall and per block). 0 = off."
        },
    )

    def __post_init__(self) -> None:
        self._validate_highway()
        super().__post_init__()
        self._validate_highway_combinations()

    def _validate_highway(self) -> None:
        if not isinstance(self.use_highway_bp, bool):
            raise ValueError(f"use_highway_bp must be True or False, got {self.use_highway_bp!r}.")
        self.hwbp_k = _parse_k(self.hwbp_k)
        if self.hwbp_tol is not None:
            if isinstance(self.hwbp_tol, bool) or not isinstance(self.hwbp_tol, numbers.Real) or not self.hwbp_tol > 0:
                raise ValueError(f"hwbp_tol must be a float > 0 or None, got {self.hwbp_tol!r}.")
            self.hwbp_tol = float(self.hwbp_tol)
        elif self.hwbp_k == "auto":
            self.hwbp_tol = AUTO_DEFAULT_TOL
        if not _is_int(self.hwbp_group_size) or self.hwbp_group_size < 1:
            raise ValueError(
                f"hwbp_group_size must be an int >= 1 (layers per Highway block), got {self.hwbp_group_size!r}."
            )
        if self.hwbp_k_schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"Unknown hwbp_k_schedule {self.hwbp_k_schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)} "
                "(or pass k_schedule=<callable step -> k> to HighwayTrainer)."
            )
        if not _is_int(self.hwbp_k_step_every) or self.hwbp_k_step_every < 1:
            raise ValueError(f"hwbp_k_step_every must be an int >= 1, got {self.hwbp_k_step_every!r}.")
        if self.hwbp_k_max is not None:
            if self.hwbp_k_schedule != "step":
                raise ValueError(
                    f"hwbp_k_max is used by the 'step' schedule only; got hwbp_k_schedule={self.hwbp_k_schedule!r}."
                )
            if not _is_int(self.hwbp_k_max) or self.hwbp_k_max < 0:
                raise ValueError(f"hwbp_k_max must be an int >= 0 or None, got {self.hwbp_k_max!r}.")
        if not _is_int(self.hwbp_exact_last_steps) or self.hwbp_exact_last_steps < 0:
            raise ValueError(f"hwbp_exact_last_steps must be an int >= 0, got {self.hwbp_exact_last_steps!r}.")
        if self.hwbp_k_schedule == "step":
            if self.hwbp_k == "auto":
                raise ValueError(
                    "hwbp_k='auto' already runs up to exact backprop; it has no 'step' schedule. Use an int "
                    "hwbp_k (the starting k), or hwbp_k_schedule='constant'."
                )
            if self.hwbp_k_max is not None and self.hwbp_k_max < self.hwbp_k:
                raise ValueError(f"hwbp_k_max ({self.hwbp_k_max}) must be >= hwbp_k ({self.hwbp_k}).")
        if self.hwbp_k_schedule == "exact_last" and self.hwbp_exact_last_steps < 1:
            raise ValueError("hwbp_k_schedule='exact_last' needs hwbp_exact_last_steps >= 1.")
        if self.hwbp_k_schedule != "exact_last" and self.hwbp_exact_last_steps > 0:
            raise ValueError(
                "hwbp_exact_last_steps is used by hwbp_k_schedule='exact_last' only; "
                f"got hwbp_k_schedule={self.hwbp_k_schedule!r}."
            )
        if not _is_int(self.hwbp_fidelity_steps) or self.hwbp_fidelity_steps < 0:
            raise ValueError(f"hwbp_fidelity_steps must be an int >= 0 (0 = off), got {self.hwbp_fidelity_steps!r}.")

    def _validate_highway_combinations(self) -> None:
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


_DEFAULTS = {
    name: f.default
    for name, f in HighwayTrainingArguments.__dataclass_fields__.items()
    if name.startswith(("hwbp_", "use_highway"))
}


# ----- LoRA target check --------------------------------------------------------------------------------------------
_LORA_WRAPPABLE = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention")


def _lora_target_matches(target: str, name: str) -> bool:
    # PEFT's rule for a list of names: the full module name, or its last dotted components.
    return name == target or name.endswith("." + target)


def check_lora_targets(model: nn.Module, target_modules: str | Iterable[str] | None) -> list[str]:
    """Check LoRA ``target_modules`` against ``model`` before (or after) ``peft.get_peft_model``.

    ``target_modules`` follows PEFT: a list of names (a module matches a name when its qualified name equals it or
    ends with ``"." + name``), a single string (a regular expression that must match a whole qualified name), or
    ``"all-linear"``. PEFT itself only complains when *no* name matches; a typo in one of several names is silently
    ignored. This raises a ValueError naming every target that matches no module, with the layer names the model
    does have. Works on a plain transformers model or a PEFT model (its base model is searched).

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
            raise ValueError(
                f"LoRA target_modules regex {target_modules!r} matches no module of {model_name} (a regex must "
                f"match the whole qualified name, e.g. 'model.layers.0.self_attn.q_proj'). Its layers: {available()}."
            )
        return matched
    targets = list(target_modules)
    if not targets:
        raise ValueError("LoRA target_modules is empty: name the layers LoRA should adapt (e.g. ['q_proj', 'v_proj']).")
    missing = [t for t in targets if not any(_lora_target_matches(t, n) for n in names)]
    if missing:
        raise ValueError(
            f"LoRA target_modules {missing} match no module of {model_name}; LoRA would silently skip them. "
            f"Names of its layers that LoRA can adapt: {available()}."
        )
    return [n for n in names if any(_lora_target_matches(t, n) for t in targets)]


def _check_peft_targets(model: nn.Module) -> None:
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        return
    for adapter, config in peft_config.items():
        targets = getattr(config, "target_modules", None)
        if targets is None:
            continue
        try:
            check_lora_targets(model, targets)
        except ValueError as err:
            raise ValueError(f"PEFT adapter {adapter!r}: {err}") from None


# ----- the trainer --------------------------------------------------------------------------------------------------
class HighwayTrainer(Trainer):
    """``transformers.Trainer`` that trains with Highway-BP (see the module docstring for what it logs).

    Args:
        *args, **kwargs: as for ``Trainer``; ``args`` should be a ``HighwayTrainingArguments`` (plain
            ``TrainingArguments`` get the Highway defaults: k=2, constant schedule).
        k_schedule: optional callable ``step -> k`` (an int >= 0) used instead of ``hwbp_k`` / ``hwbp_k_schedule``
            (leave those at their defaults). ``step`` is ``state.global_step`` before the optimizer step, i.e. the
            0-based index of the step about to run; all micro-batches of one optimizer step use the same k.
            ``hwbp_tol`` still applies. A ``KSchedule`` (``hf_hwbp.schedules``) works too; where its
            ``exact_at(step)`` is true the adaptive stop is dropped.

    The model (the transformers model inside DDP / PEFT wrappers) is patched in ``__init__`` (or at the first
    training step when it comes from ``model_init``); an already patched model gets the trainer's settings.
    """

    def __init__(self, *args, k_schedule: Callable[[int], int] | None = None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        model = kwargs.get("model", args[0] if args else None)
        if training_args is not None and k_schedule is not None:
            if _setting(training_args, "hwbp_k_schedule") != "constant" or _setting(training_args, "hwbp_k") != 2:
                raise ValueError(
                    "Pass either k_schedule=<callable> to HighwayTrainer or hwbp_k / hwbp_k_schedule in the "
                    "arguments, not both (k_schedule replaces them)."
                )
        if model is not None:
            _check_peft_targets(model)
        self._hwbp_user_schedule = None if k_schedule is None else CallableSchedule(k_schedule)
        self._hwbp_schedule_cache: tuple[tuple, KSchedule] | None = None
        self._hwbp_last_k: int | None = None
        self._hwbp_iter_sum = 0
        self._hwbp_iter_count = 0
        self._hwbp_fidelity_step: int | None = None
        self._hwbp_pending_fidelity: dict[str, float] | None = None
        super().__init__(*args, **kwargs)
        if not self._hwbp_enabled and _setting(self.args, "hwbp_fidelity_steps"):
            logger.warning("hwbp_fidelity_steps is ignored with use_highway_bp=False.")
        if self.model is not None and self._hwbp_enabled:
            self._hwbp_patch()  # before Accelerate wraps the model (in train())

    # ----- settings ---------------------------------------------------------------------------------------------
    @property
    def _hwbp_enabled(self) -> bool:
        return bool(_setting(self.args, "use_highway_bp"))

    def _hwbp_patch(self):
        """Patch ``self.model`` (or update the settings of an existing patch) with the run's starting settings."""
        base_k = _setting(self.args, "hwbp_k")
        tol = _setting(self.args, "hwbp_tol")
        group_size = _setting(self.args, "hwbp_group_size")
        patch_model(self.model, k=0 if base_k == "auto" else base_k, tol=tol, group_size=group_size)
        patch = highway_state(self.model)
        if self._hwbp_user_schedule is not None:
            patch.config = patch.config.updated(k=self._hwbp_user_schedule(0))
        elif base_k == "auto":
            patch.config = patch.config.updated(k=patch.num_blocks)
        return patch

    def _hwbp_ensure_patched(self):
        # A model from model_init (or one unpatched since __init__) gets patched at its first training step.
        return highway_state(self.model) if is_patched(self.model) else self._hwbp_patch()

    def hwbp_schedule(self, num_blocks: int | None = None) -> KSchedule:
        """The k schedule of this run (``num_blocks`` defaults to the patched model's number of Highway blocks)."""
        if self._hwbp_user_schedule is not None:
            return self._hwbp_user_schedule
        if num_blocks is None:
            num_blocks = self._hwbp_ensure_patched().num_blocks
        base_k = _setting(self.args, "hwbp_k")
        k = num_blocks if base_k == "auto" else base_k
        key = (k, num_blocks, self.state.max_steps)
        if self._hwbp_schedule_cache is None or self._hwbp_schedule_cache[0] != key:
            schedule = build_schedule(
                _setting(self.args, "hwbp_k_schedule"),
                k=k,
                num_blocks=num_blocks,
                total_steps=self.state.max_steps,
                step_every=_setting(self.args, "hwbp_k_step_every"),
                k_max=_setting(self.args, "hwbp_k_max"),
                exact_last_steps=_setting(self.args, "hwbp_exact_last_steps"),
            )
            self._hwbp_schedule_cache = (key, schedule)
        return self._hwbp_schedule_cache[1]

    def _hwbp_apply_schedule(self):
        """Set k (and the adaptive stop) for the optimizer step ``state.global_step``; return the patch."""
        patch = self._hwbp_ensure_patched()
        step = self.state.global_step
        schedule = self.hwbp_schedule(patch.num_blocks)
        k = schedule(step)
        tol = None if schedule.exact_at(step) else _setting(self.args, "hwbp_tol")
        if patch.config.k != k or patch.config.tol != tol:
            patch.config = patch.config.updated(k=k, tol=tol)
        self._hwbp_last_k = k
        return patch

    # ----- training step ----------------------------------------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if not self._hwbp_enabled:
            with exact_backprop(self.model):  # a model patched by the caller trains with plain backprop too
                return super().training_step(model, inputs, num_items_in_batch)
        patch = self._hwbp_apply_schedule()
        every = _setting(self.args, "hwbp_fidelity_steps")
        step = self.state.global_step
        if every and (step + 1) % every == 0 and self._hwbp_fidelity_step != step:
            self._hwbp_fidelity_step = step  # first micro-batch of the optimizer step only
            self._hwbp_measure_fidelity(model, inputs, num_items_in_batch)
        patch.last_iterations = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if patch.last_iterations is not None:
            self._hwbp_iter_sum += patch.last_iterations
            self._hwbp_iter_count += 1
        return loss

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
        self._hwbp_pending_fidelity = logs

    # ----- logging ----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._hwbp_enabled and "loss" in logs:  # a training log entry (not eval, not the final summary)
            if self._hwbp_last_k is not None:
                logs["hwbp_k"] = self._hwbp_last_k
            if self._hwbp_iter_count:
                logs["hwbp_iterations"] = self._hwbp_iter_sum / self._hwbp_iter_count
                self._hwbp_iter_sum, self._hwbp_iter_count = 0, 0
            if self._hwbp_pending_fidelity:
                logs.update(self._hwbp_pending_fidelity)
                self._hwbp_pending_fidelity = None
        super().log(logs, start_time)

    def _maybe_log_save_evaluate(self, *args, **kwargs) -> None:
        # Fidelity metrics measured on a step without a training log entry get an entry of their own (before any
        # evaluation or checkpoint of this step, so the checkpoint's log_history has them).
        if self._hwbp_pending_fidelity:
            will_log = self.control.should_log and self.state.global_step > getattr(self, "_globalstep_last_logged", -1)
            if not will_log:
                pending, self._hwbp_pending_fidelity = self._hwbp_pending_fidelity, None
                self.log(pending)
        return super()._maybe_log_save_evaluate(*args, **kwargs)


def _setting(args: TrainingArguments | None, name: str) -> Any:
    """A Highway setting of ``args``, or its default for plain TrainingArguments (or None)."""
    if args is None:
        return _DEFAULTS[name]
    return getattr(args, name, _DEFAULTS[name])


__all__ = ["AUTO_DEFAULT_TOL", "HighwayTrainer", "HighwayTrainingArguments", "check_lora_targets"]
