"""HighwayConfig: the settings of Highway-BP, validated once with errors that say what to do."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields


@dataclass
class HighwayConfig:
    """Settings of Highway-BP(k) (see ALGORITHM.md).

    Args:
        k: number of Highway iterations (an int >= 0). ``k = 0`` trains every block with the gradient at
            the stack output; ``k >= number of blocks`` is exact backprop (k is clamped to that number).
        tol: optional adaptive stop: iterations end early once the relative change of the block gradients,
            ``||delta^(n+1) - delta^(n)|| / ||delta^(n+1)||``, falls below ``tol``. ``None`` runs all k.
        group_size: G consecutive layers form one Highway block (exact backprop inside it). ``G = 1``
            makes every layer a block; G >= number of layers is exact backprop.
    """

    k: int = 2
    tol: float | None = None
    group_size: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, numbers.Integral):
            raise TypeError(f"k must be an int >= 0 (the number of Highway iterations), got {self.k!r}.")
        if self.k < 0:
            raise ValueError(f"k must be >= 0 (0 = residual path only, >= number of blocks = exact), got {self.k}.")
        self.k = int(self.k)
        if self.tol is not None:
            if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real):
                raise TypeError(f"tol must be a positive float or None, got {self.tol!r}.")
            if not self.tol > 0:
                raise ValueError(f"tol must be > 0 (or None to always run k iterations), got {self.tol}.")
            self.tol = float(self.tol)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral):
            raise TypeError(f"group_size must be an int >= 1, got {self.group_size!r}.")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 (layers per Highway block), got {self.group_size}.")
        self.group_size = int(self.group_size)

    @classmethod
    def from_options(cls, k: int = 2, **options) -> HighwayConfig:
        """Build a config from keyword options, rejecting unknown names with the list of valid ones."""
        known = {f.name for f in fields(cls)} - {"k"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"Unknown Highway-BP option(s) {unknown}; valid options are k, {', '.join(sorted(known))}.")
        return cls(k=k, **options)

    def updated(self, **changes) -> HighwayConfig:
        """A validated copy with some fields changed (unknown names raise TypeError)."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update(changes)
        return HighwayConfig.from_options(**merged)
