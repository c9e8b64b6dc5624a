"""The planner's command line (``python -m hf_hwbp.plan``): flags in the example scripts' style, parsed with
transformers' ``HfArgumentParser``; the model is built as scripts/run_clm_hwbp.py builds one.

``--model_type`` (default gpt2) builds a small model with random weights from its config (the scripts' small
recipe, 4 layers of width 128, unless ``--config_overrides`` says otherwise); ``--model_name_or_path`` loads a local
folder (no download). Causal LMs get random token ids as the batch, image classifiers random pixels; for anything
else call ``hf_hwbp.plan(model, example_batch)`` in Python. A bad flag value is a one-line usage error; a model
``patch_model`` refuses is one line too (its ``HighwayBPError``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    HfArgumentParser,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import logging

from ..config import BACKEND_NAMES
from ..errors import HighwayBPError
from ..examples.arguments import log_model_to_build, small_config_overrides
from ..examples.models import highway_model_types
from .core import DEFAULT_MAP_MICROBATCHES, plan
from .evidence import REGIMES

logger = logging.get_logger(__name__)

PROG = "python -m hf_hwbp.plan"
SCRIPT_VOCAB_SIZE = 2048  # the BPE tokenizer scripts/run_clm_hwbp.py trains when given none
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TASKS = {
    "causal-LM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "image-classification": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
}
MODEL_CLASSES = {"causal-LM": AutoModelForCausalLM, "image-classification": AutoModelForImageClassification}


@dataclass
class PlanArguments:
    """What to plan for: the model, the batch of one step, what to measure."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A local model folder (save_pretrained's); nothing is downloaded."}
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Without --model_name_or_path: a model built from this config type with random weights "
            "(default gpt2; causal LMs and image classifiers). Tested with Highway-BP: "
            + ", ".join(highway_model_types([t for names in TASKS.values() for t in names]))
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "With --model_type: config settings, e.g. n_layer=8,n_embd=256,n_head=8. Default: the example "
            "scripts' small recipe (4 layers, width 128, 4 heads; causal LMs: vocabulary 2048, their tokenizer's)."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype.", "choices": list(DTYPES)})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    batch_size: int = field(default=8, metadata={"help": "Samples per optimizer step (the whole batch)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sample (causal LMs)."})
    ks: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Highway-BP k to measure (the k the quality evidence supports is added)."},
    )
    backend: list[str] = field(
        default_factory=lambda: ["sequential", "batched"],
        metadata={"help": "patch_model backends to measure.", "choices": list(BACKEND_NAMES)},
    )
    processes: int = field(
        default=1,
        metadata={
            "help": "N > 1: also launch N processes here to measure the link and the per-rank compute, predict DDP "
            "and FSDP2 over N, and measure and predict layer-parallel over N stages."
        },
    )
    microbatches: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "Micro-batches M of the layer-parallel steps measured."}
    )
    rounds: int = field(default=5, metadata={"help": "Timed steps per method (interleaved rounds; medians)."})
    compile: bool = field(
        default=False, metadata={"help": "Also time backprop through torch.compile (compiling takes minutes on CPU)."}
    )
    regime: str | None = field(
        default=None,
        metadata={
            "help": "Which quality evidence chooses k (docs/choosing_k.md). Default: from_scratch with "
            "--model_type, fine_tuning with --model_name_or_path.",
            "choices": list(REGIMES),
        },
    )
    stages: list[int] | None = field(
        default=None, metadata={"help": "Stages S of the predicted map (default 2, 4, 8, ... up to the blocks)."}
    )
    map_microbatches: list[int] = field(
        default_factory=lambda: list(DEFAULT_MAP_MICROBATCHES),
        metadata={"help": "Micro-batches M of the predicted map (up to the batch size)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads while measuring (default: torch's)."})
    output_dir: str | None = field(default=None, metadata={"help": "Write plan.json, plan.md and plan_map.png here."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and batch."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self):
        if self.model_name_or_path is not None and (self.model_type or self.config_overrides):
            raise ValueError("--model_name_or_path loads a saved model: drop --model_type / --config_overrides.")
        if self.model_type is not None and self.model_type not in CONFIG_MAPPING:
            raise ValueError(f"Unknown --model_type {self.model_type!r} (transformers' config types).")
        for name in ("batch_size", "seq_len", "processes", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if any(k < 0 for k in self.ks):
            raise ValueError(f"--ks must be >= 0, got {self.ks}.")
        for name in ("microbatches", "map_microbatches", "stages"):
            values = getattr(self, name) or []
            if any(v < 1 for v in values):
                raise ValueError(f"--{name} must be >= 1, got {values}.")
            if name == "microbatches" and max(values) > self.batch_size:
                raise ValueError(f"--microbatches must not exceed --batch_size {self.batch_size}, got {values}.")
        if self.processes > self.batch_size:
            raise ValueError(f"--processes {self.processes} exceeds --batch_size {self.batch_size}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}.")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no GPU is visible to torch here.")


def _task(model_type: str) -> str:
    for task, names in TASKS.items():
        if model_type in names:
            return task
    raise ValueError(
        f"The planner's command line builds causal LMs and image classifiers; {model_type!r} is neither. Call "
        "hf_hwbp.plan(model, example_batch) in Python for other models."
    )


def build_model(args: PlanArguments):
    """The model the flags name, in train mode on the device and dtype asked, and its task."""
    if args.model_name_or_path is not None:
        if not Path(args.model_name_or_path).is_dir():
            raise ValueError(f"--model_name_or_path {args.model_name_or_path}: no such folder (nothing is downloaded).")
        config = AutoConfig.from_pretrained(args.model_name_or_path)
        task = _task(config.model_type)
        model = MODEL_CLASSES[task].from_pretrained(args.model_name_or_path, dtype=DTYPES[args.dtype])
    else:
        model_type = args.model_type or "gpt2"
        config = CONFIG_MAPPING[model_type]()
        task = _task(model_type)
        overrides = args.config_overrides
        if overrides is None:  # the example scripts' small recipe, with the vocabulary of their default tokenizer
            overrides = small_config_overrides(model_type)
            if task == "causal-LM":
                overrides += f",vocab_size={SCRIPT_VOCAB_SIZE}"
        config.update_from_string(overrides)
        log_model_to_build(MODEL_CLASSES[task], config, logger)
        torch.manual_seed(args.seed)
        model = MODEL_CLASSES[task].from_config(config)
    if getattr(model, "loss_type", "") is None:  # GPT2LMHeadModel's name matches no loss: say the one it uses
        model.loss_type = "ForCausalLM"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device=device, dtype=DTYPES[args.dtype]).train(), task


def example_batch(model, task: str, args: PlanArguments) -> dict:
    """Random inputs of the flags' shape: token ids (labels = ids) or pixels with class labels."""
    config = model.config
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(args.seed)
    if task == "causal-LM":
        positions = next((a for a in ("n_positions", "max_position_embeddings") if hasattr(config, a)), None)
        if positions is not None and args.seq_len > getattr(config, positions):
            raise ValueError(f"--seq_len {args.seq_len} exceeds the model's {positions}={getattr(config, positions)}.")
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    shape = (args.batch_size, config.num_channels, size, size)
    pixels = torch.randn(shape, generator=generator).to(device=device, dtype=next(model.parameters()).dtype)
    labels = torch.randint(0, config.num_labels, (args.batch_size,), generator=generator)
    return {"pixel_values": pixels, "labels": labels.to(device)}


def _build(args: PlanArguments):
    """The model and its example batch; transformers refusing the flags' config is a ``ValueError``."""
    try:
        model, task = build_model(args)
        return model, example_batch(model, task, args)
    except (HighwayBPError, ValueError):
        raise
    except Exception as error:  # noqa: BLE001 - e.g. an assert in a model's __init__: the user's flags, one line
        raise ValueError(f"cannot build the model from these flags: {type(error).__name__}: {error}") from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _usage_error(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> PlanArguments:
    """The flags as ``PlanArguments``; a bad value exits with a one-line usage error (status 2)."""
    parser = HfArgumentParser(PlanArguments, prog=PROG, description=__doc__)
    parser.error = _usage_error  # one line instead of argparse's usage block
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        _usage_error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the planner from flags; print the table and the recommendation. Returns the exit status."""
    args = parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        model, batch = _build(args)
        regime = args.regime or ("fine_tuning" if args.model_name_or_path else "from_scratch")
        result = plan(
            model,
            batch,
            ks=args.ks,
            backends=args.backend,
            processes=args.processes,
            microbatches=args.microbatches,
            rounds=args.rounds,
            compile=args.compile,
            regime=regime,
            stages=args.stages,
            map_microbatches=args.map_microbatches,
            threads=args.threads,
            output_dir=args.output_dir,
            progress=args.progress,
            command=command,
        )
    except HighwayBPError as error:
        print(f"{PROG}: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    print(result.setup["description"])
    print()
    print(result)
    for note in result.notes:
        print(f"- {note}")
    if args.output_dir:
        print(f"\nWrote plan.json, plan.md and the map to {args.output_dir}")
    return 0


__all__ = ["PlanArguments", "build_model", "example_batch", "main", "parse_args"]
