"""The exceptions hf_hwbp raises when it refuses a set-up, so that users can catch the package's own refusals.

Every refusal is raised before any gradient of the refused step exists (in ``patch_model``, in the forward, or when
a Trainer is built), and its message names the way out. ``HighwayBPError`` is the one class to catch; the
subclasses also derive from the built-in class the same refusal raised before they existed, so ``except
ValueError`` / ``except RuntimeError`` code keeps working.

Bad arguments (a wrong type, an out-of-range ``k``) are not refusals: they raise ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations


class HighwayBPError(RuntimeError):
    """Highway-BP refuses this model, set-up or step; the message says why and what to do instead."""


class UnsupportedModelError(HighwayBPError, ValueError):
    """The model's structure is not one Highway-BP can run (no residual stack, a stack it cannot route)."""


__all__ = ["HighwayBPError", "UnsupportedModelError"]
