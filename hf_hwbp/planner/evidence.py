"""Which k the project's learning-quality evidence supports for a model (docs/choosing_k.md, results/quality/).

The target there is one-sided ("never loses"): on every seed the final validation loss at most 1 % above
backprop's (k = 1: 3 %), for ViT the accuracy at most 1 point below. The smallest k that met it on every seed is
what the planner recommends; a model type or regime with no measurement gets the default k = 2, the one k that met
the target on every set-up measured. The evidence comes from small models (6 layers, width 64 to 128): it says
what held there, not a guarantee for a larger model.
"""

from __future__ import annotations

from dataclasses import dataclass

REGIMES = ("from_scratch", "fine_tuning")
DEFAULT_K = 2
SOURCE = "docs/choosing_k.md"


@dataclass(frozen=True)
class KEvidence:
    """The smallest k the evidence supports, and why (one clause, citing where it was measured)."""

    k: int
    why: str
    measured: bool  # False: no measurement for this model type and regime (the default k)


_EVIDENCE: dict[tuple[str, str], KEvidence] = {
    ("gpt2", "from_scratch"): KEvidence(
        1,
        "GPT-2 from scratch: k = 1 stayed within 0.54 % of backprop's validation loss on all 5 seeds, while "
        "k = 0 ended 5.0 % above it",
        True,
    ),
    ("llama", "from_scratch"): KEvidence(
        0, "Llama from scratch: every k, k = 0 included, ended below backprop's validation loss on all 5 seeds", True
    ),
    ("vit", "from_scratch"): KEvidence(
        2,
        "ViT from scratch: k = 2 stayed within 0.83 points of backprop's accuracy on all 5 seeds, while k = 1 lost "
        "up to 1.67",
        True,
    ),
    ("gpt2", "fine_tuning"): KEvidence(
        0, "GPT-2 fine-tuning (full and LoRA): k = 0 stayed within 0.60 % of backprop's loss on all 6 runs", True
    ),
    ("llama", "fine_tuning"): KEvidence(
        0, "Llama fine-tuning (full and LoRA): k = 0 stayed within 0.67 % of backprop's loss on all 6 runs", True
    ),
}


def recommended_k(model_type: str | None, regime: str = "from_scratch") -> KEvidence:
    """The smallest k the evidence supports for ``model_type`` trained ``regime`` ("from_scratch" or
    "fine_tuning"); the default k = 2 where nothing was measured."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}.")
    found = _EVIDENCE.get((model_type or "", regime))
    if found is not None:
        return found
    what = f"{model_type} {regime.replace('_', '-')}" if model_type else f"this model ({regime.replace('_', '-')})"
    return KEvidence(
        DEFAULT_K,
        f"no quality measurement for {what}: the default k = 2, the one k that met the target on every set-up "
        "measured (GPT-2, Llama, ViT; from scratch and fine-tuning)",
        False,
    )


__all__ = ["DEFAULT_K", "REGIMES", "SOURCE", "KEvidence", "recommended_k"]
