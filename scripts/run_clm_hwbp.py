#!/usr/bin/env python
"""Causal language modeling with Highway backpropagation, in the manner of transformers' ``run_clm.py``.

The flags are run_clm's (``--model_name_or_path``, ``--model_type``/``--config_overrides``, ``--tokenizer_name``,
``--dataset_name``, ``--train_file``/``--validation_file``, ``--block_size``, ``--max_train_samples``, ...) plus every
``TrainingArguments`` flag and the Highway-BP ones of ``HighwayTrainingArguments`` (``--hwbp_k``, ``--hwbp_tol``,
``--hwbp_group_size``, ``--hwbp_k_schedule``, ``--use_highway_bp false``, ...). A single ``.json`` argument is read as
an arguments file, as in run_clm.

With no model and no data arguments it runs the embedded default: a 4-layer GPT-2 (n_embd 128, 1M parameters)
trained from scratch on the Python reference manual that ships with CPython (``hf_hwbp.data``), with a byte-level BPE
tokenizer trained on the spot. No download; under 3 minutes on 2 CPU cores (validation perplexity ~105). On a machine
shared with other jobs, run with ``OMP_NUM_THREADS=1``: two threads competing for busy cores can be several times
slower. Its recipe (``EMBEDDED_DEFAULTS``: lr 1e-3, warmup, cosine, 600 steps of 8 x 128 tokens, ...) applies
whenever no model argument is given (also with ``--train_file``) and only fills in what you do not pass::

    python scripts/run_clm_hwbp.py                          # embedded default, prints eval loss and perplexity
    python scripts/run_clm_hwbp.py --compare_backprop       # + the same run with plain backprop: PNG + table
    python scripts/run_clm_hwbp.py --hwbp_k 0 --max_steps 100 --output_dir outputs/k0
    python scripts/run_clm_hwbp.py --model_name_or_path ./my-gpt2 --train_file train.txt --use_lora

Differences from run_clm: ``--do_train`` and ``--do_eval`` default to true; ``--output_dir`` defaults to
``outputs/run_clm_hwbp``; without ``--tokenizer_name`` or ``--model_name_or_path`` a byte-level BPE tokenizer is
trained on the training texts (run_clm refuses); a model trained from scratch gets the tokenizer's vocabulary size;
``transformers`` logs at its default level (warnings) unless ``--log_level`` is given.

Outputs in ``output_dir``: the model and tokenizer, ``train_results.json``, ``eval_results.json``,
``all_results.json`` (with ``perplexity``), ``trainer_state.json``; with ``--compare_backprop`` also the plain
backprop run in ``output_dir/backprop``, ``loss_curves.png``, ``comparison.md`` and ``comparison.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
    default_data_collator,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_hwbp.data import (
    chunk_stream,
    reference_manual_documents,
    split_documents,
    tokenize_to_stream,
    train_bpe_tokenizer,
)
from hf_hwbp.trainer import HighwayTrainer, HighwayTrainingArguments, check_lora_targets
from model_patches import supported_model_types

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "run_clm_hwbp")
TEXT_EXTENSIONS = ("csv", "json", "txt")

# Defaults of this script (run_clm has none of these): an explicit flag always wins.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "do_train": True,
    "do_eval": True,
    "dataloader_pin_memory": torch.cuda.is_available(),  # no pinned-memory warning on CPU-only machines
}
# The small-model recipe (no model argument; with no data argument either, the embedded default run).
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "model_type": "gpt2",
    "config_overrides": "n_layer=4,n_embd=128,n_head=4",
    "block_size": 128,
    "tokenizer_vocab_size": 2048,
    "validation_split_percentage": 10,
    "max_steps": 600,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 60,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "no",
}
# --smoke_test: a few seconds, for tests. Applies in every mode; the tiny model only to the embedded one.
SMOKE_DEFAULTS: dict[str, Any] = {
    "max_steps": 4,
    "max_train_samples": 32,
    "max_eval_samples": 8,
    "block_size": 32,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_strategy": "no",
    "warmup_steps": 0,
}
SMOKE_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "config_overrides": "n_layer=2,n_embd=32,n_head=2",
    "tokenizer_vocab_size": 300,
}
# The small-model recipe applies when no model argument is given; the embedded corpus when no data argument is.
MODEL_KEYS = ("model_name_or_path", "model_type", "config_name")
CLM_DATA_KEYS = ("dataset_name", "train_file", "validation_file")


@dataclass
class ModelArguments:
    """Which model/config/tokenizer to fine-tune, or train from scratch (run_clm's flags), and LoRA."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model checkpoint (local path or hub id) for weights initialization. Leave out to train "
            "from scratch (--model_type)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "If training from scratch, a causal-LM model type. With Highway-BP: one of "
            + ", ".join(t for t in supported_model_types() if t in MODEL_TYPES)
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override some default config settings when a model is trained from scratch, e.g. "
            "n_layer=4,n_embd=128,resid_pdrop=0.0"
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained tokenizer name or path if not the same as model_name. Without either, a "
            "byte-level BPE tokenizer is trained on the training texts."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary size of the BPE tokenizer trained on the spot (>= 260)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the pretrained models and datasets downloaded from the hub."}
    )
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Whether to use a fast tokenizer."})
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(default=None, metadata={"help": "HTTP bearer token for remote files."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Whether to run code from the hub (only for repositories you trust)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Load the model under this dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError(
                "--config_overrides can't be used in combination with --config_name or --model_name_or_path "
                "(it applies to a model trained from scratch, with --model_type)."
            )
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            highway = [t for t in supported_model_types() if t in MODEL_TYPES]
            raise ValueError(
                f"Unknown --model_type {self.model_type!r} for causal language modeling. Model types with a Highway-BP "
                f"adapter: {', '.join(highway)}. Every causal-LM type: {', '.join(MODEL_TYPES)}."
            )


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
class DataTrainingArguments:
    """What data to train and evaluate on (run_clm's flags). None of them: the embedded reference manual."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "The input training data file (csv, json, txt)."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "An optional evaluation data file to evaluate the perplexity on (csv, json, txt)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of training examples (blocks) to this value if set."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples (blocks) to this value if set."}
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Sequence length of the training blocks. Default: the model max input length (at most 1024)."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Overwrite the cached training and evaluation sets"})
    validation_split_percentage: int | None = field(
        default=5,
        metadata={"help": "The percentage of the train set used as validation set in case there's no validation split"},
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes to use for the preprocessing."}
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Whether to keep line breaks when using TXT files."})

    def __post_init__(self):
        for flag in ("train_file", "validation_file"):
            path = getattr(self, flag)
            if path is None:
                continue
            extension = path.rsplit(".", 1)[-1].lower()
            if extension not in TEXT_EXTENSIONS:
                raise ValueError(f"--{flag} {path!r} should be a csv, a json or a txt file.")
            if not os.path.isfile(path):
                raise ValueError(
                    f"--{flag} {path!r} does not exist. Pass an existing .txt/.csv/.json file, or leave out every data "
                    "argument to train on the embedded corpus."
                )
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise ValueError(f"--validation_split_percentage must be in 1..99, got {self.validation_split_percentage}.")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2, got {self.block_size}.")
        for flag in ("max_train_samples", "max_eval_samples"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}.")


@dataclass
class RunArguments:
    """What this script runs besides the one training run."""

    compare_backprop: bool = field(
        default=False,
        metadata={
            "help": "Also train the same model from the same seed with plain backprop (in output_dir/backprop) "
            "and write loss_curves.png, comparison.md and comparison.json to output_dir."
        },
    )
    smoke_test: bool = field(
        default=False,
        metadata={"help": "Shrink everything (tiny model, a few steps) to check the pipeline in seconds."},
    )
    layer_parallel: bool = field(
        default=False,
        metadata={
            "help": "Layer-parallel training (hf_hwbp.parallel): one pipeline stage per process, every stage "
            "running its Highway backward at the same time. Launch with `torchrun --nproc_per_node S`. GPT-2 and "
            "Llama; uses --hwbp_k, --hwbp_group_size, --learning_rate, --weight_decay, --max_grad_norm, "
            "--warmup_steps, --max_steps; --use_highway_bp false trains with pipeline backprop."
        },
    )


# ----- arguments (shared with run_image_classification_hwbp.py) -------------------------------------------------------
def parse_script_args(
    dataclass_types: tuple,
    argv: list[str] | None,
    *,
    script_defaults: dict[str, Any],
    embedded_keys: tuple[str, ...],
    embedded_defaults: dict[str, Any],
    smoke_defaults: dict[str, Any],
    smoke_embedded_defaults: dict[str, Any],
) -> tuple:
    """HfArgumentParser over ``dataclass_types`` where the script's defaults fill in what the user left out.

    The embedded recipe applies when none of ``embedded_keys`` (the model arguments) is given; the smoke recipe with
    ``--smoke_test`` (and its tiny model when none of ``embedded_keys`` is given). A single ``.json`` argument is an
    arguments file (run_clm's convention).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)

    def defaults_for(given: dict[str, Any]) -> dict[str, Any]:
        embedded = all(given.get(key) is None for key in embedded_keys)
        smoke = _as_bool(given.get("smoke_test", False))
        merged = dict(script_defaults)
        if embedded:
            merged.update(embedded_defaults)
        if smoke:
            merged.update(smoke_defaults)
            if embedded:
                merged.update(smoke_embedded_defaults)
        return merged

    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(os.path.abspath(argv[0])) as f:
            given = json.load(f)
        return parser.parse_dict({**defaults_for(given), **given})
    namespace, _ = parser.parse_known_args(argv)
    parser.set_defaults(**defaults_for(vars(namespace)))
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "t")
    return bool(value)


def setup_logging(training_args) -> int:
    """run_clm's logging, except that transformers keeps its default level (warnings) unless --log_level is given."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    script_level = logging.INFO if training_args.log_level == "passive" and training_args.should_log else log_level
    logger.setLevel(script_level)
    logging.getLogger("__main__").setLevel(script_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    return script_level


def check_highway_supported(model_type: str | None, training_args, task: str) -> None:
    """A clear error before anything is built when Highway-BP has no adapter for the model type."""
    if training_args.use_highway_bp and model_type not in supported_model_types():
        raise ValueError(
            f"Highway-BP has no adapter for model_type={model_type!r}; {task} types with one: "
            f"{', '.join(supported_model_types())}. Pass --use_highway_bp false to train this model with plain "
            "backprop."
        )


def apply_lora(model, lora_args, *, task_type: str | None, default_targets: list[str] | None = None, **extra):
    """Wrap ``model`` with LoRA adapters (peft), after checking that the target modules exist."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = lora_args.lora_target_modules
    model_type = model.config.model_type
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or default_targets
        if targets is None:
            raise ValueError(
                f"peft has no default LoRA target modules for model_type={model_type!r}: pass "
                "--lora_target_modules (e.g. q_proj v_proj, or all-linear)."
            )
    if list(targets) == ["all-linear"]:
        targets = "all-linear"
    modules = dict(model.named_modules())
    matched = check_lora_targets(model, targets)  # a clear error for any name that matches nothing
    conv1d = any(type(modules[name]).__name__ == "Conv1D" for name in matched)  # GPT-2's transposed weights
    config = LoraConfig(
        task_type=task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        **extra,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoRA on {targets}: {trainable:,} trainable parameters of {total:,}")
    return model


# ----- timing and comparison (shared with run_image_classification_hwbp.py) -------------------------------------------
class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, optimizer), evaluation and logging excluded."""

    def __init__(self):
        self.durations: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.durations.append(time.perf_counter() - self._start)
            self._start = None

    def seconds_per_step(self) -> float | None:
        """Median over the steps after the first two (warm-up); robust to a shared machine's spikes."""
        steady = self.durations[2:] if len(self.durations) > 4 else self.durations
        return statistics.median(steady) if steady else None


@dataclass
class RunResult:
    """One training run: its name, settings, final metrics and log history."""

    name: str
    output_dir: str
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    seconds_per_step: float | None
    highway_k: int | str | None = None

    def mean_iterations(self) -> float | None:
        values = [entry["hwbp_iterations"] for entry in self.log_history if "hwbp_iterations" in entry]
        return sum(values) / len(values) if values else None

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(entry["step"], entry[key]) for entry in self.log_history if key in entry and "step" in entry]
        return [p[0] for p in points], [p[1] for p in points]


def run_label(training_args) -> str:
    if not training_args.use_highway_bp:
        return "backprop"
    return f"highway_bp_k{training_args.hwbp_k}"


def backprop_arguments(training_args):
    """The same training arguments with plain backprop, writing to ``output_dir/backprop``."""
    return dataclasses.replace(
        training_args,
        use_highway_bp=False,
        output_dir=os.path.join(training_args.output_dir, "backprop"),
    )


def write_comparison(
    results: list[RunResult], output_dir: str, columns: list[tuple[str, str, str]], title: str
) -> dict[str, str]:
    """``loss_curves.png``, ``comparison.md`` and ``comparison.json`` of runs (the last one is the baseline).

    ``columns``: (header, metrics key, format spec) of the metrics to tabulate besides time per step.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--compare_backprop plots with matplotlib: pip install hf_hwbp[plots]") from err
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "png": os.path.join(output_dir, "loss_curves.png"),
        "markdown": os.path.join(output_dir, "comparison.md"),
        "json": os.path.join(output_dir, "comparison.json"),
    }

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, result in reversed(list(enumerate(results))):  # the baseline first, the Highway run on top
        color, marker = f"C{i}", "os^v"[i % 4]
        steps, losses = result.curve("loss")
        if steps:
            ax.plot(steps, losses, color=color, alpha=0.6, linewidth=1, label=f"{result.name} train")
        steps, losses = result.curve("eval_loss")
        if steps:
            ax.plot(
                steps, losses, color=color, marker=marker, linestyle="--", linewidth=1.5, label=f"{result.name} eval"
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)

    baseline = results[-1].seconds_per_step
    header = ["run", "k", "mean iterations"] + [c[0] for c in columns] + ["s / step", "time vs backprop"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for result in results:
        iterations = result.mean_iterations()
        ratio = result.seconds_per_step / baseline if result.seconds_per_step and baseline else None
        cells = [
            result.name,
            "-" if result.highway_k is None else str(result.highway_k),
            "-" if iterations is None else f"{iterations:.2f}",
        ]
        cells += [_fmt(result.metrics.get(key), spec) for _, key, spec in columns]
        cells += [_fmt(result.seconds_per_step, ".3f"), _fmt(ratio, ".2f") + ("x" if ratio else "")]
        lines.append("| " + " | ".join(cells) + " |")
        rows.append(
            {
                "run": result.name,
                "output_dir": result.output_dir,
                "k": result.highway_k,
                "mean_iterations": iterations,
                "seconds_per_step": result.seconds_per_step,
                "time_vs_backprop": ratio,
                "metrics": result.metrics,
            }
        )
    lines += [
        "",
        "s / step: median wall time of an optimizer step (forward, backward, optimizer; evaluation excluded) after "
        "two warm-up steps, on this machine. One device and no layer parallelism: Highway-BP(k) does k extra "
        "input-only backward sweeps here, so it is not expected to be faster (see ALGORITHM.md, cost model).",
        "",
        f"Loss curves: {os.path.basename(paths['png'])}",
        "",
    ]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines))
    with open(paths["json"], "w") as f:
        json.dump(rows, f, indent=2)
    return paths


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_training(trainer, args, timer, train_dataset, eval_dataset, extra_eval=None) -> RunResult:
    """Train and evaluate one variant (Highway-BP or backprop) and collect what the comparison needs."""
    name = run_label(args)
    logger.info(f"*** Train: {name} -> {args.output_dir} ***")
    metrics = train_and_evaluate(
        trainer,
        args,
        len(train_dataset) if train_dataset is not None else None,
        len(eval_dataset) if eval_dataset is not None else None,
        extra_eval=extra_eval,
    )
    metrics["seconds_per_step"] = timer.seconds_per_step()
    return RunResult(
        name=name,
        output_dir=args.output_dir,
        metrics=metrics,
        log_history=list(trainer.state.log_history),
        seconds_per_step=timer.seconds_per_step(),
        highway_k=args.hwbp_k if args.use_highway_bp else None,
    )


def train_and_evaluate(trainer, training_args, n_train: int | None, n_eval: int | None, extra_eval=None) -> dict:
    """run_clm's train / save / evaluate sequence; returns the merged train and eval metrics."""
    metrics: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # and the tokenizer / image processor
        train_metrics = dict(train_result.metrics)
        train_metrics["train_samples"] = n_train
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = n_eval
        if extra_eval is not None:
            eval_metrics.update(extra_eval(eval_metrics))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


# ----- causal LM ------------------------------------------------------------------------------------------------------
def load_raw_texts(model_args, data_args) -> datasets.DatasetDict:
    """run_clm's dataset loading: a hub dataset or csv/json/txt files, with a validation split carved if missing."""
    pct = data_args.validation_split_percentage or 5
    if data_args.dataset_name is not None:
        load = {"path": data_args.dataset_name, "name": data_args.dataset_config_name}
        load.update(cache_dir=model_args.cache_dir, token=model_args.token)
    else:
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = (data_args.train_file or data_args.validation_file).rsplit(".", 1)[-1].lower()
        load = {"path": "text" if extension == "txt" else extension, "data_files": data_files}
        load["cache_dir"] = model_args.cache_dir
        if extension == "txt":
            load["keep_linebreaks"] = data_args.keep_linebreaks
    raw = load_dataset_dict(load)
    if "validation" not in raw and "train" in raw:
        raw["validation"] = datasets.load_dataset(**load, split=f"train[:{pct}%]")
        raw["train"] = datasets.load_dataset(**load, split=f"train[{pct}%:]")
    return raw


def load_dataset_dict(load: dict[str, Any]) -> datasets.DatasetDict:
    raw = datasets.load_dataset(**load)
    if not isinstance(raw, datasets.DatasetDict):
        raw = datasets.DatasetDict({"train": raw})
    return raw


def build_config(model_args, logger_=logger):
    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.config_name:
        return AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    if model_args.model_name_or_path:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    if model_args.model_type is None:
        raise ValueError("Pass --model_name_or_path, --config_name or --model_type (to train from scratch).")
    config = CONFIG_MAPPING[model_args.model_type]()
    logger_.info("You are instantiating a new config instance from scratch.")
    if model_args.config_overrides is not None:
        logger_.info(f"Overriding config: {model_args.config_overrides}")
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as err:
            raise ValueError(
                f"--config_overrides {model_args.config_overrides!r}: {err}. Use comma-separated key=value pairs of "
                f"{type(config).__name__} attributes, e.g. n_layer=4,n_embd=128."
            ) from None
    return config


def _overridden(model_args, key: str) -> bool:
    return bool(model_args.config_overrides) and any(
        item.split("=", 1)[0].strip() == key for item in model_args.config_overrides.split(",")
    )


def build_tokenizer(model_args, training_texts):
    """The tokenizer to use; without --tokenizer_name / --model_name_or_path, a BPE trained on ``training_texts()``."""
    tokenizer_kwargs = {
        "cache_dir": model_args.cache_dir,
        "use_fast": model_args.use_fast_tokenizer,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.tokenizer_name:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name, **tokenizer_kwargs)
    if model_args.model_name_or_path:
        return AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs)
    logger.info(f"Training a byte-level BPE tokenizer (vocab {model_args.tokenizer_vocab_size}) on the training texts")
    return train_bpe_tokenizer(training_texts(), model_args.tokenizer_vocab_size)


def build_model(model_args, lora_args, config, tokenizer):
    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            dtype=dtype,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        logger.info(f"Training new model from scratch - Total size={n_params / 2**20:.2f}M params")
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))
    if lora_args.use_lora:
        model = apply_lora(model, lora_args, task_type="CAUSAL_LM")
    return model


def scratch_config_for_tokenizer(config, model_args, tokenizer, block_size: int | None):
    """A from-scratch config sized to the tokenizer (vocab, special tokens) and to --block_size (positions), unless
    --config_overrides sets them."""
    if not _overridden(model_args, "vocab_size"):
        config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and value < config.vocab_size:
            setattr(config, name, value)
    positions = next((a for a in ("n_positions", "max_position_embeddings") if hasattr(config, a)), None)
    if block_size is not None and positions is not None:
        if not _overridden(model_args, positions):
            setattr(config, positions, block_size)
        elif getattr(config, positions) < block_size:
            raise ValueError(
                f"--block_size {block_size} exceeds {positions}={getattr(config, positions)} of --config_overrides; "
                f"lower --block_size or raise {positions}."
            )
    return config


def _resolve_block_size(data_args, tokenizer, config) -> int:
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    if data_args.block_size is None:
        block_size = min(tokenizer.model_max_length, max_pos, 1024)
        logger.info(f"--block_size not given: using {block_size}.")
        return block_size
    if data_args.block_size > max_pos:
        raise ValueError(
            f"--block_size {data_args.block_size} exceeds the model's {max_pos} positions; pass "
            f"--block_size <= {max_pos}."
        )
    return data_args.block_size


def embedded_lm_datasets(model_args, data_args, config_for_tokenizer):
    """The embedded corpus (hf_hwbp.data): tokenizer, train and validation datasets of blocks."""
    fraction = (data_args.validation_split_percentage or 10) / 100
    train_docs, val_docs = split_documents(reference_manual_documents(), fraction)
    tokenizer = build_tokenizer(model_args, lambda: train_docs)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-text (eos) token to separate documents; pick another tokenizer.")
    config = config_for_tokenizer(tokenizer)
    block_size = _resolve_block_size(data_args, tokenizer, config)
    splits = {}
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        blocks = chunk_stream(tokenize_to_stream(tokenizer, docs), block_size).tolist()
        mask = [[1] * block_size] * len(blocks)  # no padding (and no warning about eos = pad)
        splits[name] = datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": mask, "labels": blocks})
    return tokenizer, config, datasets.DatasetDict(splits)


def file_lm_datasets(model_args, data_args, training_args, config_for_tokenizer):
    """run_clm's path: load texts, tokenize, group into blocks of block_size."""
    raw = load_raw_texts(model_args, data_args)
    first_split = "train" if "train" in raw else "validation"
    column_names = list(raw[first_split].features)
    text_column = "text" if "text" in column_names else column_names[0]
    tokenizer = build_tokenizer(model_args, lambda: [t for t in raw[first_split][text_column] if t])
    config = config_for_tokenizer(tokenizer)
    block_size = _resolve_block_size(data_args, tokenizer, config)

    def tokenize_function(examples):
        return tokenizer(examples[text_column])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = (len(concatenated[next(iter(examples))]) // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw.map(
            tokenize_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )
    with training_args.main_process_first(desc="grouping texts together"):
        lm = tokenized.map(
            group_texts,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Grouping texts in chunks of {block_size}",
        )
    for name in lm:
        if len(lm[name]) == 0:
            raise ValueError(
                f"The {name} split has fewer than --block_size={block_size} tokens; lower --block_size or add text."
            )
    return tokenizer, config, lm


def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_preds) -> dict[str, float]:
    """Next-token accuracy (run_clm's metric, without the `evaluate` package)."""
    preds, labels = eval_preds
    labels = np.asarray(labels)[:, 1:].reshape(-1)
    preds = np.asarray(preds)[:, :-1].reshape(-1)
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else float("nan")}


def perplexity_of(metrics: dict[str, float]) -> dict[str, float]:
    try:
        return {"perplexity": math.exp(metrics["eval_loss"])}
    except OverflowError:
        return {"perplexity": float("inf")}


def _select(dataset, limit: int | None):
    return dataset.select(range(min(len(dataset), limit))) if limit is not None else dataset


def run_layer_parallel(
    model_args, lora_args, training_args, config, tokenizer, train_dataset, eval_dataset, run_args
) -> dict[str, float]:
    """--layer_parallel: train with hf_hwbp.parallel under torchrun, then evaluate and save on rank 0."""
    import torch.distributed as dist

    from hf_hwbp.parallel import train_layer_parallel

    if run_args.compare_backprop or lora_args.use_lora:
        raise ValueError("--layer_parallel does not combine with --compare_backprop or --use_lora.")
    if training_args.use_highway_bp and not isinstance(training_args.hwbp_k, int):
        raise ValueError("--layer_parallel needs an integer --hwbp_k (not 'auto').")
    if train_dataset is None:
        raise ValueError("--layer_parallel trains: it needs --do_train and a train dataset.")
    steps = training_args.max_steps
    if steps <= 0:
        steps = math.ceil(
            len(train_dataset) / training_args.per_device_train_batch_size * training_args.num_train_epochs
        )
    set_seed(training_args.seed)
    model = build_model(model_args, lora_args, config, tokenizer)
    generator = torch.Generator().manual_seed(training_args.seed)  # the same batches on every rank
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=training_args.per_device_train_batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=default_data_collator,
        drop_last=True,
    )

    def batches():
        while True:
            yield from loader

    warmup = training_args.warmup_steps

    def lr_lambda(step: int) -> float:  # linear warmup, then cosine decay to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    start = time.perf_counter()
    losses = train_layer_parallel(
        model,
        batches(),
        k=training_args.hwbp_k if training_args.use_highway_bp else 0,
        group_size=training_args.hwbp_group_size,
        steps=steps,
        lr=training_args.learning_rate,
        method="highway" if training_args.use_highway_bp else "backprop",
        weight_decay=training_args.weight_decay,
        max_grad_norm=training_args.max_grad_norm or None,
        lr_lambda=lr_lambda,
        seed=training_args.seed,
        log_every=training_args.logging_steps if training_args.logging_steps >= 1 else 0,
        sync_model=True,
        device="cpu" if training_args.use_cpu or not torch.cuda.is_available() else None,
    )
    seconds = time.perf_counter() - start
    metrics = {
        "train_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "train_steps": len(losses),
        "seconds_per_step": seconds / max(1, len(losses)),
        "stages": dist.get_world_size(),
    }
    if eval_dataset is not None:
        model.eval()
        eval_loader = torch.utils.data.DataLoader(
            eval_dataset, batch_size=training_args.per_device_eval_batch_size, collate_fn=default_data_collator
        )
        device = next(model.parameters()).device
        with torch.no_grad():
            eval_losses = [model(**{k: v.to(device) for k, v in b.items()}).loss.item() for b in eval_loader]
        metrics["eval_loss"] = float(np.mean(eval_losses))
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if dist.get_rank() == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        model.save_pretrained(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as f:
            json.dump({**metrics, "train_losses": losses}, f, indent=2)
        method = f"highway k={training_args.hwbp_k}" if training_args.use_highway_bp else "backprop"
        print(
            f"[layer-parallel {method}, {metrics['stages']} stages] "
            + (
                f"validation loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
                if "eval_loss" in metrics
                else ""
            )
            + f"{metrics['seconds_per_step']:.3f} s/step"
        )
    return metrics


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the script with ``argv`` (default: the command line). Returns each run's metrics by run name."""
    model_args, lora_args, data_args, training_args, run_args = parse_script_args(
        (ModelArguments, LoraArguments, DataTrainingArguments, HighwayTrainingArguments, RunArguments),
        argv,
        script_defaults=SCRIPT_DEFAULTS,
        embedded_keys=MODEL_KEYS,
        embedded_defaults=EMBEDDED_DEFAULTS,
        smoke_defaults=SMOKE_DEFAULTS,
        smoke_embedded_defaults=SMOKE_EMBEDDED_DEFAULTS,
    )
    setup_logging(training_args)
    embedded = all(getattr(data_args, key) is None for key in CLM_DATA_KEYS)
    logger.info(
        f"device: {training_args.device}, n_gpu: {training_args.n_gpu}, Highway-BP: {training_args.use_highway_bp}"
        + (f" (k={training_args.hwbp_k})" if training_args.use_highway_bp else "")
        + (", data: embedded Python reference manual" if embedded else "")
    )
    if run_args.compare_backprop and not training_args.use_highway_bp:
        raise ValueError("--compare_backprop compares Highway-BP with plain backprop: leave --use_highway_bp true.")
    if run_args.compare_backprop and not training_args.do_train:
        raise ValueError("--compare_backprop compares two training runs: leave --do_train true.")

    # Everything that can be wrong with the arguments fails here, before data or weights are loaded.
    set_seed(training_args.seed)
    config = build_config(model_args)
    check_highway_supported(config.model_type, training_args, "causal-LM")

    def config_for_tokenizer(tokenizer):
        if model_args.model_name_or_path or model_args.config_name:
            return config
        return scratch_config_for_tokenizer(config, model_args, tokenizer, data_args.block_size)

    if embedded:
        tokenizer, config, lm_datasets = embedded_lm_datasets(model_args, data_args, config_for_tokenizer)
    else:
        tokenizer, config, lm_datasets = file_lm_datasets(model_args, data_args, training_args, config_for_tokenizer)
    if training_args.do_train and "train" not in lm_datasets:
        raise ValueError("--do_train requires a train dataset (--train_file or a dataset with a train split).")
    if training_args.do_eval and "validation" not in lm_datasets:
        raise ValueError("--do_eval requires a validation dataset (--validation_file or a validation split).")
    train_dataset = _select(lm_datasets["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = _select(lm_datasets["validation"], data_args.max_eval_samples) if training_args.do_eval else None

    if run_args.layer_parallel:
        return {
            "layer_parallel": run_layer_parallel(
                model_args, lora_args, training_args, config, tokenizer, train_dataset, eval_dataset, run_args
            )
        }

    variants = [training_args] + ([backprop_arguments(training_args)] if run_args.compare_backprop else [])
    results = []
    for args in variants:
        set_seed(args.seed)  # the same initial weights (and LoRA adapters) in every run
        model = build_model(model_args, lora_args, config, tokenizer)
        timer = StepTimer()
        trainer = HighwayTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=default_data_collator,
            compute_metrics=compute_metrics if args.do_eval else None,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics if args.do_eval else None,
            callbacks=[timer],
        )
        result = run_training(trainer, args, timer, train_dataset, eval_dataset, extra_eval=perplexity_of)
        results.append(result)
        name, metrics = result.name, result.metrics
        if "eval_loss" in metrics and args.should_save:  # the main process only
            print(
                f"[{name}] validation loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
                + (f", {metrics['seconds_per_step']:.3f} s/step" if metrics["seconds_per_step"] else "")
            )
        del trainer, model

    if run_args.compare_backprop and training_args.should_save:
        paths = write_comparison(
            results,
            training_args.output_dir,
            columns=[
                ("eval loss", "eval_loss", ".4f"),
                ("perplexity", "perplexity", ".2f"),
                ("token accuracy", "eval_accuracy", ".3f"),
            ],
            title="Causal LM: Highway-BP vs backprop",
        )
        with open(paths["markdown"]) as f:
            print(f.read())
        print(f"Wrote {paths['png']}, {paths['markdown']} and {paths['json']}")
    return {r.name: r.metrics for r in results}


if __name__ == "__main__":
    main()
