"""Command-line pieces of the example scripts: defaults that depend on what the user gave, LoRA and comparison flags.

``parse_args_with_defaults`` is ``HfArgumentParser`` with two additions: a script may change some defaults
depending on the flags given (the embedded recipe when no model is named), and a bad value is a usage error in one
line (``<script>: error: ...``, exit status 2), as argparse reports its own, also when the value is refused by an
arguments class or by a script's check of the parsed flags. The defaults are computed before the real parse, so
``--help`` prints the defaults that will be applied to that command line, and they are only defaults: every flag
the user passes wins.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from transformers import HfArgumentParser

HELP_FLAGS = ("-h", "--help")


class FlagError(ValueError):
    """A flag's value refused once the data or the model shows that it cannot work (a LoRA target the model does not
    have, an image size the patches do not divide): a usage error too, reported as one line by ``usage_errors``."""


def usage_line(prog: str, message: str) -> str:
    return f"{prog}: error: {' '.join(str(message).split())} (see --help)\n"


def usage_errors(prog: str):
    """Decorate a script's ``main``: a ``FlagError`` it raises becomes a one-line usage error (exit status 2)."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except FlagError as err:
                sys.stderr.write(usage_line(prog, str(err)))
                raise SystemExit(2) from None

        return run

    return decorate


class ScriptArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose usage errors are one line (argparse prints the whole usage first, which for a
    script with every ``TrainingArguments`` flag is a screen of text above the one line that matters)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, usage_line(self.prog, message))


def parse_args_with_defaults(
    dataclass_types: tuple[type, ...],
    argv: list[str] | None,
    defaults_for: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    check: Callable[[tuple], None] | None = None,
    prog: str | None = None,
) -> tuple:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into ``dataclass_types`` with ``defaults_for(given)`` as defaults.

    ``given`` maps every field to the value the user gave (or its dataclass default). A single ``.json`` argument
    is an arguments file (run_clm's convention); the defaults fill in what it leaves out. ``check(parsed)`` may
    refuse a combination of flags with a ``ValueError``. Every ``ValueError`` of the arguments classes or of
    ``check`` exits as a usage error (status 2, one line on stderr, named after ``prog``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ScriptArgumentParser(dataclass_types, prog=prog)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            with open(os.path.abspath(argv[0]), encoding="utf-8") as f:
                given = json.load(f)
            parsed = parser.parse_dict({**_checked(parser, defaults_for(given)), **given})
        else:
            probe = ScriptArgumentParser(dataclass_types, prog=prog)
            namespace, _ = probe.parse_known_args([arg for arg in argv if arg not in HELP_FLAGS])
            parser.set_defaults(**_checked(parser, defaults_for(vars(namespace))))
            parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
        if check is not None:
            check(parsed)
    except ValueError as err:
        parser.error(str(err))
    return parsed


def _checked(parser: HfArgumentParser, defaults: dict[str, Any]) -> dict[str, Any]:
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise KeyError(f"Script defaults for unknown arguments {unknown}.")
    return defaults


# ----- from-scratch recipes ------------------------------------------------------------------------------------------
SMALL_SIZES: tuple[tuple[tuple[str, ...], int], ...] = (  # config attribute names (any model type) -> small value
    (("n_layer", "num_hidden_layers", "num_layers"), 4),
    (("n_embd", "hidden_size", "d_model"), 128),
    (("n_head", "num_attention_heads"), 4),
    (("num_key_value_heads",), 4),
    (("intermediate_size", "ffn_dim", "d_ff"), 512),
)


def small_config_overrides(model_type: str, head_dim: int = 32) -> str:
    """``--config_overrides`` that make any ``model_type`` the embedded recipe's small model (4 layers, width 128,
    4 heads), naming only the attributes its config has (GPT-2: ``n_layer=4,n_embd=128,n_head=4``)."""
    from transformers import CONFIG_MAPPING

    present = {name for name, value in CONFIG_MAPPING[model_type]().to_dict().items() if value is not None}
    items = []
    for names, value in SMALL_SIZES:
        name = next((n for n in names if n in present), None)
        if name is not None:
            items.append(f"{name}={value}")
    if "head_dim" in present:  # some configs (Qwen3, Gemma, ...) fix it apart from the width
        items.append(f"head_dim={head_dim}")
    return ",".join(items)


def user_gave(given: dict[str, Any], name: str, dataclass_type: type) -> bool:
    """Whether ``given`` (a first-pass parse, or an arguments file) sets ``name`` away from its dataclass default."""
    if name not in given:
        return False
    default = dataclass_type.__dataclass_fields__[name].default
    value = given[name]
    if value is None:
        return False
    try:
        return float(value) != float(default)
    except (TypeError, ValueError):
        return str(value) != str(default)


def check_launch(training_args) -> None:
    """Refuse, before data, tokenizer or model are built, a launch that cannot run what was asked."""
    if getattr(training_args, "layer_parallel", False) and training_args.world_size < 2:
        raise ValueError(
            "--layer_parallel trains one pipeline stage per process, and this is a single process: launch the script "
            "with `torchrun --nproc_per_node <stages> ...` or `accelerate launch --num_processes <stages> ...` (an "
            "accelerate config needs num_processes >= 2), or drop --layer_parallel."
        )


def log_model_to_build(model_class, config, logger, trust_remote_code: bool = False) -> int:
    """Log what a from-scratch model will be (type, layers, parameters, float32 memory) before it is built, from an
    instance on the meta device (no memory); returns its parameter count."""
    import torch

    with torch.device("meta"):
        meta = model_class.from_config(config, trust_remote_code=trust_remote_code)
    n_params = sum({id(p): p.numel() for p in meta.parameters()}.values())
    layers = next(
        (getattr(config, n) for n in ("n_layer", "num_hidden_layers", "num_layers") if hasattr(config, n)), None
    )
    if layers is None and isinstance(getattr(config, "depths", None), list):  # ResNet-like: layers per stage
        layers = sum(config.depths)
    logger.warning(
        f"Building a {config.model_type} model from scratch: {layers} layers, {n_params / 1e6:.2f}M parameters, "
        f"{n_params * 4 / 2**20:.1f} MiB of float32 weights (about 4x that to train with Adam). Change it with "
        "--config_overrides."
    )
    return n_params


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
    comparison_timing_rounds: int = field(
        default=10,
        metadata={
            "help": "--compare_backprop times a forward + backward of both trained models in this many interleaved "
            "rounds (medians, spread and the load average go into comparison.md)."
        },
    )

    def check(self, training_args) -> None:
        """Refuse a comparison that cannot be one, before anything is built."""
        if self.comparison_timing_rounds < 1:
            raise ValueError(f"--comparison_timing_rounds must be >= 1, got {self.comparison_timing_rounds}.")
        if not self.compare_backprop:
            return
        if not getattr(training_args, "use_highway_bp", False):
            raise ValueError("--compare_backprop compares Highway-BP with plain backprop: leave --use_highway_bp true.")
        if not training_args.do_train:
            raise ValueError("--compare_backprop compares two training runs: leave --do_train true.")
        if getattr(training_args, "layer_parallel", False):
            raise ValueError(
                "--compare_backprop does not run with --layer_parallel: train the baseline as a second run with "
                "--use_highway_bp false (pipeline backprop over the same stages)."
            )


__all__ = [
    "ComparisonArguments",
    "FlagError",
    "LoraArguments",
    "ScriptArgumentParser",
    "as_bool",
    "check_launch",
    "log_model_to_build",
    "parse_args_with_defaults",
    "small_config_overrides",
    "usage_errors",
    "usage_line",
    "user_gave",
]
