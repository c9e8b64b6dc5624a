"""HighwayTrainingConfig: the Highway-BP settings of a training run, validated once, saved and loaded as JSON.

    config = HighwayTrainingConfig(k=2, k_schedule="exact_last", exact_last_steps=100)
    config.save_pretrained("out")                               # out/hwbp_config.json
    HighwayTrainingConfig.from_pretrained("out") == config      # True
    config.engine_config(step, num_blocks=12, total_steps=1000)   # the HighwayConfig of that optimizer step

It holds the engine settings (``k``, ``tol``, ``group_size``, ``backend``: ``hf_hwbp.HighwayConfig``, what a patched
model's backward reads) plus what only a training run has: ``k="auto"`` (k = the number of blocks with an adaptive
stop), the k schedule (``k_schedule`` and the fields its class in ``hf_hwbp.schedules`` reads) and fidelity logging.
``HighwayCallback`` / ``HighwayTrainer`` apply ``engine_config(step, ...)`` before every optimizer step.

The same settings exist as command-line flags: ``--hwbp_k``, ``--hwbp_tol``, ... (``HighwayArguments``, one flag per
field with the ``hwbp_`` prefix) or all at once as ``--hwbp_config '{"k": 2}'`` (a JSON string or a .json file);
``config.to_cli_args()`` writes those flags back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import (
    BACKEND_HELP,
    BACKEND_NAMES,
    GROUP_SIZE_HELP,
    TOL_HELP,
    ConfigFile,
    HighwayConfig,
    check_int,
    normalized_engine_settings,
)
from .errors import HighwayBPError
from .schedules import SCHEDULE_NAMES, SCHEDULES, KSchedule, schedule_class

AUTO_DEFAULT_TOL = 0.05
"""Adaptive-stop tolerance used with ``k="auto"`` when ``tol`` is not given: the tolerance measured in
docs/choosing_k.md (it met the quality target there, stopping after 4 to 5 of 6 iterations)."""


class UnsupportedTrainingSetupError(HighwayBPError, ValueError):
    """Highway-BP training refuses this set-up (a Trainer, an arguments combination, a mode that cannot run it);
    the message names the way out. A ``ValueError`` too, as the training arguments' own checks raise."""


@dataclass
class HighwayTrainingConfig(ConfigFile):
    """Settings of Highway-BP for one training run (see the module docstring and docs/trainer.md).

    Every field is checked in ``__post_init__``: bad values raise ``TypeError`` / ``ValueError`` naming the field
    and what it accepts; a setting of a schedule other than ``k_schedule`` is refused (it would do nothing).
    """

    k: int | Literal["auto"] = field(
        default=2,
        metadata={
            "help": "Highway iterations k: an int >= 0 (0 = residual path only; >= number of blocks = exact "
            "backprop), or 'auto': up to the number of blocks, stopping adaptively once the relative change of the "
            f"block gradients falls below tol (default {AUTO_DEFAULT_TOL} with 'auto'). The starting k of the "
            "'step' schedule."
        },
    )
    tol: float | None = field(default=None, metadata={"help": f"{TOL_HELP} ({AUTO_DEFAULT_TOL} with k='auto')."})
    group_size: int = field(default=1, metadata={"help": GROUP_SIZE_HELP})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP, "choices": list(BACKEND_NAMES)})
    k_schedule: str = field(
        default="constant",
        metadata={
            "help": "k schedule over optimizer steps: 'constant' (k); 'step' (k + step // k_step_every, capped at "
            "k_max); 'exact_last' (exact backprop for the last exact_last_steps steps).",
            "choices": list(SCHEDULE_NAMES),
        },
    )
    k_step_every: int = field(
        default=100, metadata={"help": "'step' schedule: k grows by 1 every this many optimizer steps (>= 1)."}
    )
    k_max: int | None = field(
        default=None,
        metadata={"help": "'step' schedule: largest k (>= k). None: the number of Highway blocks (exact backprop)."},
    )
    exact_last_steps: int = field(
        default=0,
        metadata={"help": "'exact_last' schedule: the last this many optimizer steps use exact backprop (>= 1)."},
    )
    fidelity_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimizer steps, compare the Highway gradient with the exact gradient on the "
            "same batch and log hwbp_fidelity/* (cosine, relative error, overall and per block; HighwayTrainer "
            "only). 0 = off."
        },
    )

    def __post_init__(self) -> None:
        for name, value in normalized_training_settings(dataclasses.asdict(self)).items():
            setattr(self, name, value)

    @classmethod
    def from_engine_config(cls, config: HighwayConfig, **training) -> HighwayTrainingConfig:
        """A training configuration that runs ``config`` (plus the ``training`` settings given)."""
        return cls(**config.to_dict(), **training)

    # ----- per step ---------------------------------------------------------------------------------------------
    def schedule(self, num_blocks: int, total_steps: int) -> KSchedule:
        """The k schedule of a run of ``total_steps`` optimizer steps on a model with ``num_blocks`` Highway blocks
        (``k="auto"`` starts at ``num_blocks``)."""
        k = num_blocks if self.k == "auto" else self.k
        return SCHEDULES[self.k_schedule].from_settings(
            self.to_dict(), k=k, num_blocks=num_blocks, total_steps=total_steps
        )

    def engine_config(
        self, step: int, *, num_blocks: int, total_steps: int, schedule: KSchedule | None = None
    ) -> HighwayConfig:
        """The ``HighwayConfig`` of optimizer step ``step`` (0-based): k from the schedule (``schedule``, else this
        config's), and no adaptive stop on a step the schedule makes exact."""
        schedule = schedule if schedule is not None else self.schedule(num_blocks, total_steps)
        k = schedule(step)
        return HighwayConfig(
            k=k, tol=None if schedule.exact_at(step) else self.tol, group_size=self.group_size, backend=self.backend
        )

    def describe_schedule(self) -> str:
        """What the k schedule does, in one line (the model card's)."""
        return SCHEDULES[self.k_schedule].describe(self.to_dict())

    # ----- command line -----------------------------------------------------------------------------------------
    def to_cli_args(self, prefix: str = "hwbp_") -> list[str]:
        """The flags that give this config back (``HighwayArguments`` parses them): ``["--hwbp_k", "2", ...]``.

        Fields at None (``tol``, ``k_max``) are left out: that is their default.
        """
        args: list[str] = []
        for name, value in self.to_dict().items():
            if value is not None:
                args += [f"--{prefix}{name}", str(value)]
        return args


def normalized_training_settings(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check ``HighwayTrainingConfig`` settings (every field present) and return them normalized.

    The engine settings are checked as ``HighwayConfig`` checks them (``k`` may be ``"auto"``), the k schedule's by
    its class (``hf_hwbp.schedules``); the settings of the other schedules must stay at their defaults. ``prefix``
    names the fields in the errors as the user wrote them (``"hwbp_"`` for the command-line flags). Type errors
    raise ``TypeError``, out-of-range values and bad combinations ``ValueError``.
    """
    out = normalized_engine_settings(values, prefix, allow_auto=True)
    if out["k"] == "auto" and out["tol"] is None:
        out["tol"] = AUTO_DEFAULT_TOL
    chosen = schedule_class(out["k_schedule"], prefix + "k_schedule")
    defaults = {f.name: f.default for f in dataclasses.fields(HighwayTrainingConfig)}
    for other in SCHEDULES.values():
        for name in other.settings:
            if other is not chosen and name not in chosen.settings and out[name] != defaults[name]:
                raise ValueError(
                    f"{prefix}{name} is used by {prefix}k_schedule={other.name!r} only; got "
                    f"{prefix}k_schedule={chosen.name!r}."
                )
    out.update(chosen.check_settings(out, prefix))
    out["fidelity_steps"] = check_int(
        out["fidelity_steps"], prefix + "fidelity_steps", 0, "optimizer steps between fidelity measurements; 0 = off"
    )
    return out


__all__ = [
    "AUTO_DEFAULT_TOL",
    "HighwayTrainingConfig",
    "UnsupportedTrainingSetupError",
    "normalized_training_settings",
]
