"""HighwayConfig: what a patched model's backward reads (k, tol, group_size, backend), validated once.

    config = HighwayConfig(k=2, tol=None, group_size=1, backend="auto")
    hf_hwbp.patch_model(model, config=config)       # as PEFT's get_peft_model(model, config)
    config.save_pretrained("out")                    # out/hwbp_config.json
    HighwayConfig.from_pretrained("out") == config   # True

These are the engine settings. How they change over a training run (the k schedule, ``k="auto"``, fidelity logging)
is the training configuration, ``hf_hwbp.training_config.HighwayTrainingConfig``, whose ``engine_config(step, ...)``
gives the ``HighwayConfig`` of each optimizer step. The meaning of k, the adaptive stop and grouping is defined in
docs/algorithm.md.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "hwbp_config.json"
"""File name of a saved Highway-BP configuration (``save_pretrained`` / ``from_pretrained``)."""

BACKEND_NAMES: tuple[str, ...] = ("auto", "sequential", "batched")
"""How a stack's Highway iterations run (see ``hf_hwbp.batched``)."""

ENGINE_FIELDS: tuple[str, ...] = ("k", "tol", "group_size", "backend")
"""The fields of ``HighwayConfig``: what a patched model's backward reads."""

K_HELP = (
    "Highway iterations k: an int >= 0 (0 = residual path only; >= number of blocks = exact backprop, run as the "
    "model's own backward)."
)
TOL_HELP = (
    "Adaptive stop: end the Highway iterations early once ||delta^(n+1) - delta^(n)|| / ||delta^(n+1)|| < tol "
    "(> 0). None: always run k iterations."
)
GROUP_SIZE_HELP = "Consecutive layers per Highway block (exact backprop inside a block); 1 = every layer."
BACKEND_HELP = (
    "How the Highway iterations run: 'sequential' (block by block on the recorded graphs); 'batched' (all blocks' "
    "VJPs of one iteration as one call over their stacked weights, for blocks of one architecture without active "
    "dropout; other stacks fall back to sequential with a log line); 'auto' (batched where supported and measured "
    "faster on this device, else sequential; the log says which)."
)


class ConfigFile:
    """JSON round trip of a settings dataclass, the way PEFT's configs do it: ``to_dict`` / ``from_dict``,
    ``save_pretrained(dir)`` / ``from_pretrained(dir or file)`` (``hwbp_config.json``), and ``updated(**changes)``.

    Unknown keys raise ``TypeError`` naming the valid ones, plus ``unknown_hint(names)`` (a subclass says where
    those settings belong)."""

    kind: ClassVar[str] = "Highway-BP setting"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def unknown_hint(cls, names: list[str]) -> str:
        return ""

    @classmethod
    def _check_names(cls, names) -> None:
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"Unknown {cls.kind}(s) {unknown} for {cls.__name__}{cls.unknown_hint(unknown)}; valid settings are "
                f"{', '.join(cls.field_names())}."
            )

    def updated(self, **changes):
        """A validated copy with some fields changed (unknown names raise ``TypeError``)."""
        self._check_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """A config from a dict such as ``to_dict()`` writes (unknown keys raise ``TypeError``)."""
        if not isinstance(values, dict):
            raise TypeError(f"A {cls.__name__} is read from a dict, got {type(values).__name__}.")
        cls._check_names(values)
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``hwbp_config.json`` into ``save_directory`` (created if needed); returns the file's path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike):
        """Read a folder written by ``save_pretrained`` (or a .json file directly)."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No Highway-BP config at {str(path)!r} (save one with config.save_pretrained).")
        return cls.from_json_file(path)


@dataclass
class HighwayConfig(ConfigFile):
    """The settings a patched model's backward reads (see docs/algorithm.md).

    Every field is checked in ``__post_init__``: a bad value raises ``TypeError`` / ``ValueError`` naming the field
    and what it accepts. k schedules, ``k="auto"`` and fidelity logging are training settings
    (``HighwayTrainingConfig``); this config refuses them by name.
    """

    k: int = field(default=2, metadata={"help": K_HELP})
    tol: float | None = field(default=None, metadata={"help": TOL_HELP})
    group_size: int = field(default=1, metadata={"help": GROUP_SIZE_HELP})
    backend: str = field(default="auto", metadata={"help": BACKEND_HELP, "choices": list(BACKEND_NAMES)})

    def __post_init__(self) -> None:
        for name, value in normalized_engine_settings(dataclasses.asdict(self)).items():
            setattr(self, name, value)

    @classmethod
    def unknown_hint(cls, names: list[str]) -> str:
        return (
            " (HighwayConfig holds what the backward reads; the k schedule, k='auto' and fidelity logging are "
            "training settings: HighwayTrainingConfig, applied per step by HighwayCallback / HighwayTrainer)"
        )

    @classmethod
    def from_options(cls, k: int = 2, **options) -> HighwayConfig:
        """A config from ``patch_model``'s keywords: ``k``, ``tol``, ``group_size``, ``backend``.

        Unknown names raise ``TypeError`` with the valid ones (and where a training setting belongs); ``k`` must be
        an int here (``"auto"`` is a training setting, resolved per step by ``HighwayCallback``).
        """
        cls._check_names(options)
        return cls(k=k, **options)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def validate_k(k: Any, name: str = "k", *, allow_auto: bool = False, exact_from: str = "number of blocks") -> int | str:
    """``k`` as an int >= 0 (or ``"auto"`` where ``allow_auto``), else the one error every k setting raises.

    ``name`` is the setting as the user wrote it (``"hwbp_k"``, ``"k_max"``); ``exact_from`` says from which k on
    Highway-BP is exact backprop (``"number of blocks"``, ``"T"`` for a recurrent layer over T time steps).
    Raises ``TypeError`` for a non-int (bools refused), ``ValueError`` for k < 0.
    """
    if allow_auto and k == "auto":
        return k
    if not _is_int(k):
        or_auto = " or 'auto'" if allow_auto else ""
        raise TypeError(f"{name} must be an int >= 0 (the number of Highway iterations){or_auto}, got {k!r}.")
    if k < 0:
        raise ValueError(f"{name} must be >= 0 (0 = residual path only, >= {exact_from} = exact backprop), got {k}.")
    return int(k)


def check_int(value: Any, name: str, minimum: int, meaning: str) -> int:
    """``value`` as an int >= ``minimum``; ``TypeError`` / ``ValueError`` naming ``name`` and ``meaning``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}.")
    return int(value)


def normalized_engine_settings(values: dict[str, Any], prefix: str = "", *, allow_auto: bool = False) -> dict:
    """Check the engine settings among ``values`` (``k``, ``tol``, ``group_size``, ``backend``, all present) and
    return ``values`` with them normalized (``tol`` as float, ...).

    ``prefix`` names the fields in the errors as the user wrote them (``"hwbp_"`` for the command-line flags);
    ``allow_auto`` lets ``k`` be ``"auto"`` (the training configuration's). Type errors raise ``TypeError``,
    out-of-range values ``ValueError``.
    """
    out = dict(values)
    if out["k"] == "auto" and not allow_auto:
        raise ValueError(
            f"{prefix}k='auto' is a training setting (HighwayTrainingConfig: HighwayCallback / HighwayTrainer run up "
            "to the number of blocks with an adaptive stop). For patch_model pass an int k, e.g. k=<number of "
            "layers>, tol=0.05."
        )
    out["k"] = validate_k(out["k"], prefix + "k", allow_auto=allow_auto)
    tol = out["tol"]
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"{prefix}tol must be a float > 0 or None, got {tol!r}.")
        if not tol > 0:
            raise ValueError(f"{prefix}tol must be a float > 0 (or None to always run k iterations), got {tol}.")
        out["tol"] = float(tol)
    out["group_size"] = check_int(out["group_size"], prefix + "group_size", 1, "layers per Highway block")
    if out["backend"] not in BACKEND_NAMES:
        raise ValueError(f"Unknown {prefix}backend {out['backend']!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    return out


__all__ = [
    "BACKEND_NAMES",
    "CONFIG_NAME",
    "ENGINE_FIELDS",
    "ConfigFile",
    "HighwayConfig",
    "check_int",
    "normalized_engine_settings",
    "validate_k",
]
