"""k schedules: which number of Highway iterations to use at each optimizer step.

A schedule maps ``step`` (the 0-based index of the optimizer step about to run, i.e. ``trainer.state.global_step``
before that step) to k, an int >= 0. Schedules are pure: the same step always gives the same k, which is what makes
a run resumed from a checkpoint continue exactly where it stopped.

Each named schedule is one small class that owns its settings: ``settings`` names the ``HighwayTrainingConfig``
fields it reads, ``check_settings`` validates them, ``from_settings`` builds it for a run and ``describe`` says what
it does (the model card). ``SCHEDULES`` maps ``HighwayTrainingConfig.k_schedule`` (``--hwbp_k_schedule``) to them:

- ``"constant"``: ``k`` at every step.
- ``"step"``: ``min(k + step // k_step_every, k_max)``: k starts at ``k`` and grows by one every ``k_step_every``
  optimizer steps, up to ``k_max`` (``None`` = the number of Highway blocks, where Highway-BP is exact backprop).
- ``"exact_last"``: ``k`` except for the last ``exact_last_steps`` optimizer steps of the run (``step >= total_steps -
  exact_last_steps``), which use exact backprop (k = number of blocks, and no adaptive stop).

Any callable ``step -> int`` works as a schedule too (see ``CallableSchedule``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .config import check_int, validate_k


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"A schedule step must be an int >= 0 (an optimizer step index), got {step!r}.")
    return int(step)


class KSchedule:
    """Base class: ``schedule(step) -> k``; ``exact_at(step)`` says whether that step is meant as exact backprop.

    A named schedule also says which training settings it reads (``settings``), checks them (``check_settings``),
    builds itself from them (``from_settings``) and describes them (``describe``).
    """

    name: ClassVar[str] = ""
    settings: ClassVar[tuple[str, ...]] = ()  # the HighwayTrainingConfig fields this schedule reads besides k

    def __call__(self, step: int) -> int:
        raise NotImplementedError

    def exact_at(self, step: int) -> bool:
        """True where the schedule asks for exact backprop (the trainer then also drops the adaptive stop)."""
        return False

    @classmethod
    def check_settings(cls, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """This schedule's settings among ``values`` (a ``HighwayTrainingConfig``'s), checked and normalized."""
        return {}

    @classmethod
    def from_settings(cls, values: Mapping[str, Any], *, k: int, num_blocks: int, total_steps: int) -> KSchedule:
        """The schedule of a run of ``total_steps`` optimizer steps on a model with ``num_blocks`` Highway blocks;
        ``k`` is the starting k (``"auto"`` already resolved to ``num_blocks``)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, values: Mapping[str, Any]) -> str:
        """One line for the model card: what this schedule does with ``values``."""
        return cls.name


@dataclass(frozen=True)
class ConstantSchedule(KSchedule):
    """``k`` at every step."""

    name: ClassVar[str] = "constant"
    k: int

    def __post_init__(self) -> None:
        validate_k(self.k)

    def __call__(self, step: int) -> int:
        _check_step(step)
        return self.k

    @classmethod
    def from_settings(cls, values, *, k, num_blocks, total_steps) -> ConstantSchedule:
        return cls(k)


@dataclass(frozen=True)
class StepSchedule(KSchedule):
    """``min(k + step // every, k_max)``: one more iteration every ``every`` steps, capped at ``k_max``.

    ``k_max=None`` lets k grow without cap (the model clamps it to its number of blocks, i.e. exact backprop).
    """

    name: ClassVar[str] = "step"
    settings: ClassVar[tuple[str, ...]] = ("k_step_every", "k_max")
    k: int
    every: int
    k_max: int | None = None

    def __post_init__(self) -> None:
        validate_k(self.k)
        if isinstance(self.every, bool) or not isinstance(self.every, numbers.Integral) or self.every < 1:
            raise ValueError(
                f"The 'step' schedule needs every >= 1 (optimizer steps per increase of k), got {self.every!r}."
            )
        if self.k_max is not None:
            validate_k(self.k_max, "k_max")
            if self.k_max < self.k:
                raise ValueError(f"k_max ({self.k_max}) must be >= the starting k ({self.k}) for the 'step' schedule.")

    def __call__(self, step: int) -> int:
        k = self.k + _check_step(step) // self.every
        return k if self.k_max is None else min(k, self.k_max)

    @classmethod
    def check_settings(cls, values, prefix=""):
        k = values["k"]
        if k == "auto":
            raise ValueError(
                f"{prefix}k='auto' already runs up to exact backprop; it has no 'step' schedule. Use an int "
                f"{prefix}k (the starting k), or {prefix}k_schedule='constant'."
            )
        every = check_int(values["k_step_every"], prefix + "k_step_every", 1, "optimizer steps per increase of k")
        k_max = values["k_max"]
        if k_max is not None:
            if isinstance(k_max, bool) or not isinstance(k_max, numbers.Integral) or k_max < 0:
                raise ValueError(f"{prefix}k_max must be an int >= 0 or None, got {k_max!r}.")
            if k_max < k:
                raise ValueError(f"{prefix}k_max ({k_max}) must be >= {prefix}k ({k}).")
            k_max = int(k_max)
        return {"k_step_every": every, "k_max": k_max}

    @classmethod
    def from_settings(cls, values, *, k, num_blocks, total_steps) -> StepSchedule:
        k_max = values["k_max"]
        return cls(k, values["k_step_every"], max(k, num_blocks) if k_max is None else k_max)

    @classmethod
    def describe(cls, values) -> str:
        cap = "the number of Highway blocks" if values["k_max"] is None else str(values["k_max"])
        return f"step: k = {values['k']} + step // {values['k_step_every']}, at most {cap}"


@dataclass(frozen=True)
class ExactLastSchedule(KSchedule):
    """``base(step)`` for the first ``total_steps - last_steps`` steps, then exact backprop (``exact_k``).

    ``base`` is an int or another schedule; ``exact_k`` is the k that means exact backprop for the model (its
    number of Highway blocks).
    """

    name: ClassVar[str] = "exact_last"
    settings: ClassVar[tuple[str, ...]] = ("exact_last_steps",)
    base: KSchedule | int
    last_steps: int
    total_steps: int
    exact_k: int

    def __post_init__(self) -> None:
        if (
            isinstance(self.last_steps, bool)
            or not isinstance(self.last_steps, numbers.Integral)
            or self.last_steps < 1
        ):
            raise ValueError(f"The 'exact_last' schedule needs last_steps >= 1, got {self.last_steps!r}.")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, numbers.Integral):
            raise TypeError(
                f"total_steps must be an int (the run's number of optimizer steps), got {self.total_steps!r}."
            )
        validate_k(self.exact_k, "exact_k")
        if not callable(self.base):
            validate_k(self.base, "k")

    def exact_at(self, step: int) -> bool:
        return _check_step(step) >= self.total_steps - self.last_steps

    def __call__(self, step: int) -> int:
        if self.exact_at(step):
            return self.exact_k
        return self.base(step) if callable(self.base) else self.base

    @classmethod
    def check_settings(cls, values, prefix=""):
        steps = values["exact_last_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(
                f"{prefix}k_schedule='exact_last' needs {prefix}exact_last_steps >= 1 (optimizer steps of exact "
                f"backprop at the end of the run), got {steps!r}."
            )
        return {"exact_last_steps": int(steps)}

    @classmethod
    def from_settings(cls, values, *, k, num_blocks, total_steps) -> ExactLastSchedule:
        return cls(k, values["exact_last_steps"], total_steps, num_blocks)

    @classmethod
    def describe(cls, values) -> str:
        steps = values["exact_last_steps"]
        return f"exact_last: k = {values['k']}, exact backprop for the last {steps} optimizer steps"


class CallableSchedule(KSchedule):
    """Wraps a user function ``step -> k`` and checks what it returns.

    The function gets the 0-based index of the optimizer step about to run (``trainer.state.global_step``) and must
    return an int >= 0. If it has an ``exact_at(step) -> bool`` method, that is used too.
    """

    name: ClassVar[str] = "callable"

    def __init__(self, fn: Callable[[int], int]):
        if not callable(fn):
            raise TypeError(f"k_schedule must be a callable step -> k, got {fn!r}.")
        self.fn = fn

    def __call__(self, step: int) -> int:
        k = self.fn(_check_step(step))
        try:
            return validate_k(k)
        except (TypeError, ValueError) as err:
            raise type(err)(f"k_schedule({step}) returned {k!r}: {err}") from None

    def exact_at(self, step: int) -> bool:
        exact_at = getattr(self.fn, "exact_at", None)
        return bool(exact_at(step)) if callable(exact_at) else False

    def __repr__(self) -> str:
        return f"CallableSchedule({self.fn!r})"


SCHEDULES: dict[str, type[KSchedule]] = {cls.name: cls for cls in (ConstantSchedule, StepSchedule, ExactLastSchedule)}
"""The named schedules, by ``HighwayTrainingConfig.k_schedule``."""

SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)


def schedule_class(name: str, setting: str = "k_schedule") -> type[KSchedule]:
    """The schedule class named ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown {setting} {name!r}; choose one of {', '.join(SCHEDULE_NAMES)} (or pass k_schedule=<callable "
            "step -> k> to HighwayCallback / HighwayTrainer)."
        ) from None


__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "CallableSchedule",
    "ConstantSchedule",
    "ExactLastSchedule",
    "KSchedule",
    "StepSchedule",
    "schedule_class",
]
