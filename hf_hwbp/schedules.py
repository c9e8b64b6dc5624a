"""k schedules: which number of Highway iterations to use at each optimizer step.

A schedule maps ``step`` (the 0-based index of the optimizer step about to run, i.e. ``trainer.state.global_step``
before that step) to k, an int >= 0. Schedules are pure: the same step always gives the same k, which is what makes
a run resumed from a checkpoint continue exactly where it stopped.

Named schedules (``HighwayConfig.k_schedule``, the ``--hwbp_k_schedule`` flag):

- ``"constant"``: ``k`` at every step.
- ``"step"``: ``min(k + step // every, k_max)``: k starts at ``k`` and grows by one every ``every`` optimizer steps, up
  to ``k_max`` (``None`` = the number of Highway blocks, where Highway-BP is exact backprop).
- ``"exact_last"``: ``k`` except for the last ``last_steps`` optimizer steps of the run (``step >= total_steps -
  last_steps``), which use exact backprop (k = number of blocks, and no adaptive stop).

Any callable ``step -> int`` works as a schedule too (see ``CallableSchedule``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

from .config import SCHEDULE_NAMES, validate_k


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"A schedule step must be an int >= 0 (an optimizer step index), got {step!r}.")
    return int(step)


class KSchedule:
    """Base class: ``schedule(step) -> k``; ``exact_at(step)`` says whether that step is meant as exact backprop."""

    def __call__(self, step: int) -> int:
        raise NotImplementedError

    def exact_at(self, step: int) -> bool:
        """True where the schedule asks for exact backprop (the trainer then also drops the adaptive stop)."""
        return False


@dataclass(frozen=True)
class ConstantSchedule(KSchedule):
    """``k`` at every step."""

    k: int

    def __post_init__(self) -> None:
        validate_k(self.k)

    def __call__(self, step: int) -> int:
        _check_step(step)
        return self.k


@dataclass(frozen=True)
class StepSchedule(KSchedule):
    """``min(k + step // every, k_max)``: one more iteration every ``every`` steps, capped at ``k_max``.

    ``k_max=None`` lets k grow without cap (the model clamps it to its number of blocks, i.e. exact backprop).
    """

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


@dataclass(frozen=True)
class ExactLastSchedule(KSchedule):
    """``base(step)`` for the first ``total_steps - last_steps`` steps, then exact backprop (``exact_k``).

    ``base`` is an int or another schedule; ``exact_k`` is the k that means exact backprop for the model (its
    number of Highway blocks).
    """

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


class CallableSchedule(KSchedule):
    """Wraps a user function ``step -> k`` and checks what it returns.

    The function gets the 0-based index of the optimizer step about to run (``trainer.state.global_step``) and must
    return an int >= 0. If it has an ``exact_at(step) -> bool`` method, that is used too.
    """

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


def build_schedule(
    name: str,
    *,
    k: int,
    num_blocks: int,
    total_steps: int | None = None,
    step_every: int | None = None,
    k_max: int | None = None,
    exact_last_steps: int | None = None,
) -> KSchedule:
    """The named schedule (one of ``SCHEDULE_NAMES``) for a model with ``num_blocks`` Highway blocks.

    ``total_steps`` (the run's number of optimizer steps) is needed by ``"exact_last"`` only; ``step_every`` and
    ``k_max`` by ``"step"`` only (``k_max=None`` = ``num_blocks``).
    """
    validate_k(k)
    if name == "constant":
        return ConstantSchedule(k)
    if name == "step":
        if step_every is None:
            raise ValueError("The 'step' schedule needs step_every (optimizer steps per increase of k).")
        return StepSchedule(k, step_every, max(k, num_blocks) if k_max is None else k_max)
    if name == "exact_last":
        if exact_last_steps is None or total_steps is None:
            raise ValueError("The 'exact_last' schedule needs exact_last_steps and total_steps.")
        return ExactLastSchedule(k, exact_last_steps, total_steps, num_blocks)
    raise ValueError(f"Unknown k schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)} (or pass a callable).")
