"""HighwayConfig: every Highway-BP setting in one validated dataclass, saved and loaded as JSON like PEFT's configs.

    config = HighwayConfig(k=2, k_schedule="exact_last", exact_last_steps=100)
    config.save_pretrained("out")                       # out/hwbp_config.json
    HighwayConfig.from_pretrained("out") == config      # True
    HighwayConfig.from_dict(config.to_dict()) == config

The same settings exist as command-line flags: ``--hwbp_k``, ``--hwbp_tol``, ... (``HighwayArguments``, one flag per
field with the ``hwbp_`` prefix) or all at once as ``--hwbp_config '{"k": 2}'`` (a JSON string or a .json file).
``config.to_cli_args()`` writes those flags back. The meaning of k, the adaptive stop and grouping is defined in
docs/algorithm.md.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal

CONFIG_NAME = "hwbp_config.json"
"""File name of a saved HighwayConfig (``save_pretrained`` / ``from_pretrained``)."""

AUTO_DEFAULT_TOL = 1e-3
"""Adaptive-stop tolerance used with ``k="auto"`` when ``tol`` is not given."""

SCHEDULE_NAMES: tuple[str, ...] = ("constant", "step", "exact_last")
"""The named k schedules (see ``hf_hwbp.schedules``)."""

BACKEND_NAMES: tuple[str, ...] = ("auto", "sequential", "batched")
"""How a stack's Highway iterations run (see ``hf_hwbp.batched``)."""

ENGINE_FIELDS: tuple[str, ...] = ("k", "tol", "group_size", "backend")
"""The fields a patched model's backward reads; the others are training settings (schedule, fidelity logging)."""


@dataclass
class HighwayConfig:
    """Settings of Highway-BP(k) for one model or one training run (see docs/algorithm.md).

    ``patch_model`` reads ``k``, ``tol`` and ``group_size``; ``HighwayCallback`` / ``HighwayTrainer`` read all of them.
    Every field is checked in ``__post_init__`` (and again by ``validate()``): bad values raise ``TypeError`` /
    ``ValueError`` naming the field and what it accepts.
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
    tol: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive stop: end the Highway iterations early once ||delta^(n+1) - delta^(n)|| / "
            f"||delta^(n+1)|| < tol (> 0). None: always run k iterations ({AUTO_DEFAULT_TOL} with k='auto')."
        },
    )
    group_size: int = field(
        default=1,
        metadata={"help": "Consecutive layers per Highway block (exact backprop inside a block); 1 = every layer."},
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "How the Highway iterations run: 'sequential' (block by block on the recorded graphs); "
            "'batched' (all blocks' VJPs of one iteration as one call over their stacked weights, for blocks of one "
            "architecture without active dropout; other stacks fall back to sequential with a log line); 'auto' "
            "(batched where supported and measured faster on this device, else sequential; the log says which).",
            "choices": list(BACKEND_NAMES),
        },
    )
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
        self.validate()

    def validate(self) -> None:
        """Check every field (and their combinations) and normalize them (e.g. ``tol`` to float)."""
        for name, value in normalized_settings(dataclasses.asdict(self)).items():
            setattr(self, name, value)

    # ----- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, k: int = 2, **options) -> HighwayConfig:
        """A config for a patched model (``patch_model(model, k, **options)``): ``k``, ``tol``, ``group_size``,
        ``backend``.

        Unknown names raise ``TypeError`` with the valid ones; ``k`` must be an int here (``"auto"`` and the
        schedules are training settings, resolved per step by ``HighwayCallback``).
        """
        known = set(ENGINE_FIELDS) - {"k"}
        unknown = sorted(set(options) - known)
        if unknown:
            training = sorted(set(unknown) & {f.name for f in dataclasses.fields(cls)})
            hint = (
                f" ({', '.join(training)}: training settings, applied by HighwayCallback / HighwayTrainer)"
                if training
                else ""
            )
            raise TypeError(
                f"Unknown Highway-BP option(s) {unknown}{hint}; valid options are k, {', '.join(sorted(known))}."
            )
        if k == "auto":
            raise ValueError(
                "k='auto' is a training setting (HighwayCallback / HighwayTrainer run up to the number of blocks "
                "with an adaptive stop). For patch_model pass an int k, e.g. k=<number of layers>, tol=1e-3."
            )
        return cls(k=k, **options)

    def updated(self, **changes) -> HighwayConfig:
        """A validated copy with some fields changed (unknown names raise ``TypeError``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"Unknown Highway-BP option(s) {unknown}; valid options are {', '.join(sorted(known))}.")
        return dataclasses.replace(self, **changes)

    # ----- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HighwayConfig:
        """A config from a dict such as ``to_dict()`` writes (unknown keys raise ``TypeError``)."""
        if not isinstance(values, dict):
            raise TypeError(f"A HighwayConfig is read from a dict, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"Unknown Highway-BP setting(s) {unknown}; valid settings are {', '.join(sorted(known))}.")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> HighwayConfig:
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
    def from_pretrained(cls, path: str | os.PathLike) -> HighwayConfig:
        """Read a folder written by ``save_pretrained`` (or a .json file directly)."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No Highway-BP config at {str(path)!r} (save one with config.save_pretrained).")
        return cls.from_json_file(path)

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


def normalized_settings(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check HighwayConfig settings (every field present) and return them normalized.

    ``prefix`` names the fields in the errors as the user wrote them (``"hwbp_"`` for the command-line flags).
    Type errors raise ``TypeError``, out-of-range values and bad combinations ``ValueError``.
    """

    def name(field_name: str) -> str:
        return prefix + field_name

    out = dict(values)
    k = out["k"] = validate_k(out["k"], name("k"), allow_auto=True)
    tol = out["tol"]
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
            raise TypeError(f"{name('tol')} must be a float > 0 or None, got {tol!r}.")
        if not tol > 0:
            raise ValueError(f"{name('tol')} must be a float > 0 (or None to always run k iterations), got {tol}.")
        out["tol"] = float(tol)
    elif k == "auto":
        out["tol"] = AUTO_DEFAULT_TOL
    for field_name, minimum, meaning in (
        ("group_size", 1, "layers per Highway block"),
        ("k_step_every", 1, "optimizer steps per increase of k"),
        ("exact_last_steps", 0, "optimizer steps of exact backprop at the end"),
        ("fidelity_steps", 0, "optimizer steps between fidelity measurements; 0 = off"),
    ):
        value = out[field_name]
        if not _is_int(value):
            raise TypeError(f"{name(field_name)} must be an int >= {minimum} ({meaning}), got {value!r}.")
        if value < minimum:
            raise ValueError(f"{name(field_name)} must be an int >= {minimum} ({meaning}), got {value!r}.")
        out[field_name] = int(value)
    if out["backend"] not in BACKEND_NAMES:
        raise ValueError(f"Unknown {name('backend')} {out['backend']!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    schedule = out["k_schedule"]
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(
            f"Unknown {name('k_schedule')} {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)} "
            "(or pass k_schedule=<callable step -> k> to HighwayCallback / HighwayTrainer)."
        )
    k_max = out["k_max"]
    if k_max is not None:
        if schedule != "step":
            raise ValueError(
                f"{name('k_max')} is used by the 'step' schedule only; got {name('k_schedule')}={schedule!r}."
            )
        if not _is_int(k_max) or k_max < 0:
            raise ValueError(f"{name('k_max')} must be an int >= 0 or None, got {k_max!r}.")
        out["k_max"] = int(k_max)
    if schedule == "step":
        if k == "auto":
            raise ValueError(
                f"{name('k')}='auto' already runs up to exact backprop; it has no 'step' schedule. Use an int "
                f"{name('k')} (the starting k), or {name('k_schedule')}='constant'."
            )
        if k_max is not None and k_max < k:
            raise ValueError(f"{name('k_max')} ({k_max}) must be >= {name('k')} ({k}).")
    if schedule == "exact_last" and out["exact_last_steps"] < 1:
        raise ValueError(f"{name('k_schedule')}='exact_last' needs {name('exact_last_steps')} >= 1.")
    if schedule != "exact_last" and out["exact_last_steps"] > 0:
        raise ValueError(
            f"{name('exact_last_steps')} is used by {name('k_schedule')}='exact_last' only; "
            f"got {name('k_schedule')}={schedule!r}."
        )
    return out


__all__ = [
    "AUTO_DEFAULT_TOL",
    "BACKEND_NAMES",
    "CONFIG_NAME",
    "ENGINE_FIELDS",
    "SCHEDULE_NAMES",
    "HighwayConfig",
    "normalized_settings",
    "validate_k",
]
