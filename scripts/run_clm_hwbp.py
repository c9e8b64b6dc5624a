#!/usr/bin/env python
"""Causal language modeling with Highway backpropagation: transformers' ``run_clm.py`` plus the Highway-BP flags.

The flags are run_clm's (``--model_name_or_path``, ``--model_type``/``--config_overrides``, ``--tokenizer_name``,
``--dataset_name``, ``--train_file``/``--validation_file``, ``--block_size``, ``--max_train_samples``, ... and every
``TrainingArguments`` flag) plus Highway-BP's (``--hwbp_k``, ``--hwbp_config``, ``--use_highway_bp false``, ...; see
``hf_hwbp.HighwayTrainingArguments``), LoRA (``--use_lora``), ``--compare_backprop`` and ``--layer_parallel``
(layer-parallel Highway-BP with ``hf_hwbp.LayerParallelTrainer``: one pipeline stage per process, launched with
``torchrun --nproc_per_node S``; ``--layer_parallel_microbatches M``). A single ``.json`` argument is read as an
arguments file. A bad flag value is a usage error in one line (exit status 2).

Defaults that differ from run_clm, all shown by ``--help`` for the command line it is given with:

- always: ``--do_train`` and ``--do_eval`` true, ``--output_dir outputs/run_clm_hwbp``, and no checkpoints
  (``--save_strategy no``) unless ``--save_steps N`` or ``--save_strategy`` is given (the final model is always saved
  in ``--output_dir``);
- a model from scratch (no ``--model_name_or_path`` / ``--config_name``): the small recipe, whatever
  ``--model_type`` (default gpt2): 4 layers, width 128, 4 heads (``--config_overrides`` replaces that) trained with
  lr 1e-3, cosine, 5 epochs of 8 x 128 tokens, a log entry every 2 % of the run and an evaluation every 10 % of it
  (``--logging_steps 0.02 --eval_steps 0.1``), ...; the script logs the parameter count and memory before building;
- no data argument either: the embedded corpus, the Python reference manual that ships with CPython
  (``hf_hwbp.examples.data``), through the same ``map``/``group_texts`` path as files;
- no tokenizer: a byte-level BPE tokenizer trained on the training texts (run_clm refuses).

Any flag you pass wins over these defaults. ``--use_lora`` on a model from scratch saves its (random, frozen) base
model in ``<output_dir>/base_model`` and names it in the adapter's config, so that
``AutoPeftModelForCausalLM.from_pretrained(output_dir)`` loads the result offline. The last line the script prints
says where the model, its card and its metrics are. No download; the default run (575 steps) took 7 minutes on 2
busy CPU cores with ``OMP_NUM_THREADS=1`` (validation loss 4.68, perplexity 108); on a machine shared with other jobs
use ``OMP_NUM_THREADS=1``::

    python scripts/run_clm_hwbp.py                          # embedded default, Highway-BP(2)
    python scripts/run_clm_hwbp.py --compare_backprop       # + the same run with plain backprop, beside output_dir
    python scripts/run_clm_hwbp.py --hwbp_k 0 --max_steps 100 --output_dir outputs/k0
    python scripts/run_clm_hwbp.py --model_name_or_path ./my-gpt2 --train_file train.txt --use_lora
    torchrun --nproc_per_node 2 scripts/run_clm_hwbp.py --layer_parallel --hwbp_k 1 --use_cpu   # 2 stages
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    default_data_collator,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_hwbp import HighwayTrainer, HighwayTrainingArguments, LayerParallelTrainer
from hf_hwbp.examples import (
    ComparisonArguments,
    LoraArguments,
    apply_lora,
    check_highway_supported,
    fit_config_to_tokenizer,
    highway_model_types,
    parse_args_with_defaults,
)
from hf_hwbp.examples.arguments import (
    FlagError,
    check_launch,
    log_model_to_build,
    small_config_overrides,
    usage_errors,
    user_gave,
)
from hf_hwbp.examples.comparison import compare_with_backprop
from hf_hwbp.examples.data import reference_manual_datasets, train_bpe_tokenizer
from hf_hwbp.examples.outputs import outputs_line

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
TOKENIZER_VOCAB_SIZE = 2048  # of the BPE tokenizer trained when no tokenizer is given

SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": os.path.join("outputs", "run_clm_hwbp"),
    "do_train": True,
    "do_eval": True,
    "save_strategy": "no",  # the final model is saved anyway; --save_steps N turns checkpoints on
    "dataloader_pin_memory": torch.cuda.is_available(),  # no pinned-memory warning on CPU-only machines
}
EMBEDDED_MODEL_DEFAULTS: dict[str, Any] = {  # a model from scratch (GPT-2 unless --model_type): small, and its recipe
    "model_type": "gpt2",
    "config_overrides": "n_layer=4,n_embd=128,n_head=4",  # small_config_overrides(--model_type) for other types
    "block_size": 128,
    "num_train_epochs": 5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 0.1,
    "lr_scheduler_type": "cosine",
    "logging_steps": 0.02,  # a ratio of the run: 50 points on the curves, whatever --max_steps
    "eval_strategy": "steps",
    "eval_steps": 0.1,
}
EMBEDDED_DATA_DEFAULTS: dict[str, Any] = {"validation_split_percentage": 10}  # no data argument: the embedded corpus
PRETRAINED_KEYS = ("model_name_or_path", "config_name")
DATA_KEYS = ("dataset_name", "train_file", "validation_file")


def script_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The defaults for a command line whose flags are ``given`` (user flags still win over them).

    A model from scratch (no ``--model_name_or_path`` / ``--config_name``) gets the small recipe whatever its
    ``--model_type``: 4 layers, width 128 (``small_config_overrides``), and the recipe's training settings. Giving
    ``--save_steps`` makes the default ``--save_strategy`` "steps" (the script's is "no")."""
    defaults = dict(SCRIPT_DEFAULTS)
    if user_gave(given, "save_steps", HighwayTrainingArguments):
        defaults["save_strategy"] = "steps"
    if all(given.get(key) is None for key in PRETRAINED_KEYS):
        defaults.update(EMBEDDED_MODEL_DEFAULTS)
        model_type = given.get("model_type")
        if model_type is not None:
            del defaults["model_type"]
            if model_type in MODEL_TYPES:  # an unknown type is refused by ModelArguments, naming the known ones
                defaults["config_overrides"] = small_config_overrides(model_type)
    if all(given.get(key) is None for key in DATA_KEYS):
        defaults.update(EMBEDDED_DATA_DEFAULTS)
    return defaults


@dataclass
class ModelArguments:
    """Arguments pertaining to which model/config/tokenizer we are going to fine-tune, or train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model checkpoint for weights initialization. Don't set if you want to train a model from "
            "scratch."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "If training from scratch, pass a model type. Tested with Highway-BP: "
            + ", ".join(highway_model_types(MODEL_TYPES))
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override some existing default config settings when a model is trained from scratch. Example: "
            "n_embd=10,resid_pdrop=0.2"
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained tokenizer name or path if not the same as model_name. Without either, a byte-level "
            "BPE tokenizer is trained on the training texts."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where do you want to store the pretrained models downloaded from the hub"}
    )
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Whether to use a fast tokenizer."})
    model_revision: str = field(
        default="main", metadata={"help": "The specific model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(default=None, metadata={"help": "The token to use as HTTP bearer for remote files."})
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
                "--config_overrides can't be used in combination with --config_name or --model_name_or_path"
            )
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"Unknown --model_type {self.model_type!r} for causal language modeling. Tested with Highway-BP: "
                f"{', '.join(highway_model_types(MODEL_TYPES))}. Every causal-LM type: {', '.join(MODEL_TYPES)}."
            )


@dataclass
class DataTrainingArguments:
    """Arguments pertaining to what data we are going to input our model for training and eval."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "The input training data file (a text file)."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "An optional input evaluation data file to evaluate the perplexity on (a text file)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of training examples to this value if set."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples to this value if set."}
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Input sequence length after tokenization. Default to the model max input length for single "
            "sentence inputs (take into account special tokens)."
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
    keep_linebreaks: bool = field(
        default=True, metadata={"help": "Whether to keep line breaks when using TXT files or not."}
    )

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None:
                if path.rsplit(".", 1)[-1] not in ("csv", "json", "txt"):
                    raise ValueError(f"`{name}` should be a csv, a json or a txt file.")
                if not os.path.isfile(path):
                    raise ValueError(f"--{name} {path!r} does not exist.")
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise ValueError(f"--validation_split_percentage must be in 1..99, got {self.validation_split_percentage}.")


ARGUMENT_TYPES = (ModelArguments, DataTrainingArguments, HighwayTrainingArguments, LoraArguments, ComparisonArguments)


def check_flags(parsed: tuple) -> None:
    """Flag combinations refused before anything is built (a ValueError: a usage error)."""
    _, _, training_args, _, compare_args = parsed
    compare_args.check(training_args)
    check_launch(training_args)


def parse_args(argv: list[str] | None = None) -> tuple:
    """The script's arguments: run_clm's, Highway-BP's (layer-parallel included), LoRA, comparison."""
    return parse_args_with_defaults(
        ARGUMENT_TYPES, argv, script_defaults, check=check_flags, prog=os.path.basename(__file__)
    )


@usage_errors(os.path.basename(__file__))
def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args, lora_args, compare_args = parse_args(argv)

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    logging.getLogger("hf_hwbp").setLevel(log_level)  # what Highway-BP runs (blocks, k after clamping)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"Highway-BP: {training_args.highway_config if training_args.use_highway_bp else 'off'}"
    )

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: a hub dataset, csv/json/txt files, or (none of them) the embedded corpus.
    if data_args.dataset_name is not None:
        hub = dict(cache_dir=model_args.cache_dir, token=model_args.token)
        raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub)
        if "validation" not in raw_datasets:
            pct = data_args.validation_split_percentage
            raw_datasets["validation"] = load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=f"train[:{pct}%]", **hub
            )
            raw_datasets["train"] = load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split=f"train[{pct}%:]", **hub
            )
    elif data_args.train_file is not None or data_args.validation_file is not None:
        data_files = {}
        dataset_args = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = (data_args.train_file or data_args.validation_file).split(".")[-1]
        if extension == "txt":
            extension = "text"
            dataset_args["keep_linebreaks"] = data_args.keep_linebreaks
        raw_datasets = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir, **dataset_args)
        # If no validation data is there, validation_split_percentage will be used to divide the dataset.
        if "validation" not in raw_datasets:
            pct = data_args.validation_split_percentage
            load = dict(data_files=data_files, cache_dir=model_args.cache_dir, **dataset_args)
            raw_datasets["validation"] = load_dataset(extension, split=f"train[:{pct}%]", **load)
            raw_datasets["train"] = load_dataset(extension, split=f"train[{pct}%:]", **load)
    else:
        raw_datasets = reference_manual_datasets(data_args.validation_split_percentage / 100)

    # Load pretrained model and tokenizer
    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    else:
        check_highway_supported(model_args.model_type, training_args.use_highway_bp, "causal-LM")
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.info(f"A new {model_args.model_type} config from scratch.")
        if model_args.config_overrides is not None:
            logger.info(f"Overriding config: {model_args.config_overrides}")
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as err:  # a key the config does not have, a value it cannot read
                raise FlagError(f"--config_overrides: {err}") from None
    check_highway_supported(config.model_type, training_args.use_highway_bp, "causal-LM")

    first_split = "train" if training_args.do_train else "validation"
    column_names = list(raw_datasets[first_split].features)
    text_column_name = "text" if "text" in column_names else column_names[0]
    tokenizer_kwargs = {
        "cache_dir": model_args.cache_dir,
        "use_fast": model_args.use_fast_tokenizer,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **tokenizer_kwargs)
    elif model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **tokenizer_kwargs)
    else:
        logger.info(f"Training a byte-level BPE tokenizer (vocabulary {TOKENIZER_VOCAB_SIZE}) on the training texts")
        texts = [text for text in raw_datasets[first_split][text_column_name] if text]
        tokenizer = train_bpe_tokenizer(texts, TOKENIZER_VOCAB_SIZE)
    if not (model_args.model_name_or_path or model_args.config_name):
        config = fit_config_to_tokenizer(config, tokenizer, data_args.block_size, model_args.config_overrides)

    def build_model(args=training_args):
        set_seed(args.seed)  # the same initial weights in every run (--compare_backprop)
        if model_args.model_name_or_path:
            dtype = model_args.dtype if model_args.dtype in ["auto", None] else getattr(torch, model_args.dtype)
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path, config=config, dtype=dtype, **config_kwargs
            )
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        if getattr(model, "loss_type", "") is None:  # GPT2LMHeadModel's name matches no loss: say the one it uses
            model.loss_type = "ForCausalLM"
        # Resize the embeddings only when necessary to avoid index errors.
        embedding_size = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > embedding_size:
            model.resize_token_embeddings(len(tokenizer))
        if lora_args.use_lora:
            from_scratch = not model_args.model_name_or_path
            model = apply_lora(
                model,
                lora_args,
                task_type="CAUSAL_LM",
                scratch_output_dir=args.output_dir if from_scratch else None,
                write_base=args.should_save,
            )
        return model

    if not model_args.model_name_or_path:
        log_model_to_build(AutoModelForCausalLM, config, logger, model_args.trust_remote_code)
    model = build_model()

    # Preprocessing the datasets: tokenize all the texts, then group them in blocks of block_size.
    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(
            tokenize_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )
    max_pos_embeddings = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)
    if data_args.block_size is None:
        block_size = min(tokenizer.model_max_length, max_pos_embeddings, 1024)
    else:
        if data_args.block_size > max_pos_embeddings:
            raise FlagError(f"--block_size {data_args.block_size} exceeds the model's {max_pos_embeddings} positions.")
        block_size = data_args.block_size

    # Main data processing function that will concatenate all texts from our dataset and generate chunks of block_size.
    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder.
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(
            group_texts,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=not data_args.overwrite_cache,
            desc=f"Grouping texts in chunks of {block_size}",
        )

    if training_args.do_train:
        if "train" not in tokenized_datasets:
            raise FlagError("--do_train requires a train dataset")
        train_dataset = lm_datasets["train"]
        if data_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if training_args.do_eval:
        if "validation" not in tokenized_datasets:
            raise FlagError("--do_eval requires a validation dataset")
        eval_dataset = lm_datasets["validation"]
        if data_args.max_eval_samples is not None:
            eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))

        def preprocess_logits_for_metrics(logits, labels):
            if isinstance(logits, tuple):
                logits = logits[0]
            return logits.argmax(dim=-1)

        def compute_metrics(eval_preds):
            preds, labels = eval_preds
            # preds have the same shape as the labels after the argmax; shift the labels
            labels = labels[:, 1:].reshape(-1)
            preds = preds[:, :-1].reshape(-1)
            mask = labels != -100
            return {"accuracy": float(np.mean(preds[mask] == labels[mask]))}

    for name, split in (("train", training_args.do_train), ("validation", training_args.do_eval)):
        if split and len(lm_datasets[name]) == 0:
            raise FlagError(f"The {name} split has fewer than --block_size={block_size} tokens.")

    # Saved with the model: its real limit (a tokenizer trained here says 1e30), set after tokenizing the long texts.
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions and tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions

    def build_trainer(args, model):
        trainer_class = LayerParallelTrainer if args.layer_parallel else HighwayTrainer
        return trainer_class(
            model=model,
            args=args,
            train_dataset=train_dataset if args.do_train else None,
            eval_dataset=eval_dataset if args.do_eval else None,
            processing_class=tokenizer,
            data_collator=default_data_collator,
            compute_metrics=compute_metrics if args.do_eval else None,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics if args.do_eval else None,
        )

    trainer = build_trainer(training_args, model)
    metrics: dict[str, float] = {}

    # Training
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # Saves the tokenizer too for easy upload
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)

    # Evaluation
    def perplexity(eval_metrics):
        try:
            return {"perplexity": math.exp(eval_metrics["eval_loss"])}
        except OverflowError:
            return {"perplexity": float("inf")}

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        eval_metrics.update(perplexity(eval_metrics))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None:
        kwargs["dataset"] = "embedded corpus (the Python reference manual, hf_hwbp.examples.data)"
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)

    comparison = None
    if compare_args.compare_backprop:
        paths = compare_with_backprop(
            trainer,
            metrics,
            lambda args: build_trainer(args, build_model(args)),
            columns=[("eval loss", "eval_loss", ".4f"), ("perplexity", "perplexity", ".2f")],
            title="Causal LM: Highway-BP vs backprop",
            comparison_dir=compare_args.comparison_dir,
            timing_rounds=compare_args.comparison_timing_rounds,
            extra_eval=perplexity,
        )
        comparison = os.path.dirname(paths["markdown"]) if paths else None
    if training_args.should_save:
        print(outputs_line(training_args.output_dir, comparison))
    return metrics


if __name__ == "__main__":
    main()
