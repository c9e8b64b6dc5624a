"""Command-line pieces of the example scripts: defaults that depend on what the user gave, LoRA and comparison flags.

``parse_args_with_defaults`` is ``HfArgumentParser`` with one addition: a script may change some defaults
depending on the flags given (the embedded recipe when no model is named). The defaults are computed before the
real parse, so ``--help`` prints the defaults that will be applied to that command line, and they are only
defaults: every flag the user passes wins.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

HELP_FLAGS = ("-h", "--help")


def parse_args_with_defaults(
    dataclass_types: tuple[type, ...],
    argv: list[str] | None,
    defaults_for: Callable[[dict[str, Any]], dict[str, Any]],
) -> tuple:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into ``dataclass_types`` with ``defaults_for(given)`` as defaults.

    ``given`` maps every field to the value the user gave (or its dataclass default). A single ``.json`` argument
    is an arguments file (run_clm's convention); the defaults fill in what it leaves out.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0]), encoding="utf-8") as f:
            given = json.load(f)
        parser = HfArgumentParser(dataclass_types)
        defaults = _checked(parser, defaults_for(given))
        return parser.parse_dict({**defaults, **given})
    probe = HfArgumentParser(dataclass_types)
    namespace, _ = probe.parse_known_args([arg for arg in argv if arg not in HELP_FLAGS])
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**_checked(parser, defaults_for(vars(namespace))))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _checked(parser: HfArgumentParser, defaults: dict[str, Any]) -> dict[str, Any]:
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise KeyError(f"Script defaults for unknown arguments {unknown}.")
    return defaults


def as_bool(value: Any) -> bool:
    """A boolean flag's value as argparse may leave it in a first pass ("true", "1", True)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "t")
    return bool(value)


@dataclass
class LoraArguments:
    """LoRA adapters (peft) instead of training every weight."""

    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (peft) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names LoRA adapts (space or comma separated, or 'all-linear'). Default: peft's "
            "choice for the model type (c_attn for GPT-2, q_proj v_proj for Llama and ViT)."
        },
    )

    def __post_init__(self):
        if self.lora_target_modules is not None:
            self.lora_target_modules = [
                t.strip() for item in self.lora_target_modules for t in item.split(",") if t.strip()
            ]
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}.")


@dataclass
class ComparisonArguments:
    """Train the same model with plain backprop too, and compare."""

    compare_backprop: bool = field(
        default=False,
        metadata={
            "help": "Also train the same model from the same seed with plain backprop, and write loss_curves.png, "
            "comparison.md and comparison.json. Everything goes beside output_dir, in --comparison_dir (the "
            "backprop model in its backprop/ folder), so output_dir holds only the Highway-BP model."
        },
    )
    comparison_dir: str | None = field(
        default=None, metadata={"help": "Where --compare_backprop writes. Default: '<output_dir>-comparison'."}
    )

    def check(self, training_args) -> None:
        """Refuse a comparison that cannot be one, before anything is built."""
        if not self.compare_backprop:
            return
        if not getattr(training_args, "use_highway_bp", False):
            raise ValueError("--compare_backprop compares Highway-BP with plain backprop: leave --use_highway_bp true.")
        if not training_args.do_train:
            raise ValueError("--compare_backprop compares two training runs: leave --do_train true.")


@dataclass
class LayerParallelArguments:
    """Layer-parallel training (hf_hwbp.parallel) instead of the Trainer."""

    layer_parallel: bool = field(
        default=False,
        metadata={
            "help": "Layer-parallel training (hf_hwbp.parallel): one pipeline stage per process, every stage "
            "running its Highway backward at the same time. Launch with `torchrun --nproc_per_node S`. GPT-2 and "
            "Llama; uses --hwbp_k, --hwbp_group_size, --learning_rate, --weight_decay, --max_grad_norm, "
            "--warmup_steps, --max_steps; --use_highway_bp false trains with pipeline backprop."
        },
    )


__all__ = ["ComparisonArguments", "LayerParallelArguments", "LoraArguments", "as_bool", "parse_args_with_defaults"]
