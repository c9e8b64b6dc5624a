#!/usr/bin/env python
"""Image classification with Highway backpropagation, in the shape of transformers' ``run_image_classification.py``.

The flags are run_image_classification's (``--model_name_or_path``, ``--dataset_name``, ``--train_dir`` /
``--validation_dir``, ``--train_val_split``, ``--image_column_name``, ``--label_column_name``,
``--max_train_samples``, ``--ignore_mismatched_sizes``, ... and every ``TrainingArguments`` flag), plus
``--model_type`` / ``--config_overrides`` to train from scratch, Highway-BP's (``--hwbp_k``, ``--hwbp_config``,
``--use_highway_bp false``, ...), LoRA (``--use_lora``), ``--compare_backprop`` and ``--layer_parallel`` (ViT, with
``hf_hwbp.LayerParallelTrainer`` under ``torchrun``). A single ``.json`` argument is read as an arguments file. A bad
flag value is a usage error in one line (exit status 2).

Images are resized and normalized by the model's image processor (``--image_processor_name`` or the checkpoint's;
for a model trained from scratch a ViT image processor at its image size, mean = std = 0.5). ``--max_train_samples``
and ``--max_eval_samples`` take a seeded random subset (shuffle, then select).

Defaults that differ from run_image_classification, all shown by ``--help`` for the command line it is given with:

- always: ``--do_train`` / ``--do_eval`` true, ``--output_dir outputs/run_image_classification_hwbp``,
  ``--remove_unused_columns false`` (the image column feeds the transform), and no checkpoints (``--save_strategy
  no``) unless ``--save_steps N`` or ``--save_strategy`` is given;
- no model argument (``--model_name_or_path``, ``--config_name``, ``--model_type``): the embedded recipe, a small
  ViT (4 layers, hidden size 64, 16x16 one-channel images in 4x4 patches) trained from scratch for 15 epochs, a log
  entry every 2 % of the run and an evaluation every 10 % (``--logging_steps 0.02 --eval_steps 0.1``); with your
  own images instead of the digits, the same ViT in RGB (every image converted to 3 channels; ``--config_overrides
  num_channels=1`` for grayscale) at the image size of the first image (at most 64, a multiple of the patch size);
- no data argument: the embedded data set, scikit-learn's handwritten digits (``hf_hwbp.examples.vision_data``;
  1797 8x8 images, no download; ``pip install hf_hwbp[vision]``).

``--use_lora`` on a model from scratch saves its base model in ``<output_dir>/base_model`` and names it in the adapter's
config. The last line the script prints says where the model, its card and its metrics are. The default run (675
steps) took 1.6 minutes on 2 busy CPU cores with ``OMP_NUM_THREADS=1`` (validation accuracy 0.98)::

    python scripts/run_image_classification_hwbp.py                     # embedded default
    python scripts/run_image_classification_hwbp.py --compare_backprop   # + plain backprop, beside output_dir
    python scripts/run_image_classification_hwbp.py --model_name_or_path ./vit-base --train_dir imgs/train --use_lora
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTImageProcessor,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

from hf_hwbp import HighwayTrainer, HighwayTrainingArguments, LayerParallelTrainer
from hf_hwbp.examples import (
    ComparisonArguments,
    LoraArguments,
    apply_lora,
    check_highway_supported,
    highway_model_types,
    parse_args_with_defaults,
)
from hf_hwbp.examples.arguments import (
    FlagError,
    check_launch,
    log_model_to_build,
    usage_errors,
    user_gave,
)
from hf_hwbp.examples.comparison import compare_with_backprop
from hf_hwbp.examples.outputs import outputs_line

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES))

SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": os.path.join("outputs", "run_image_classification_hwbp"),
    "do_train": True,
    "do_eval": True,
    "remove_unused_columns": False,  # the image column feeds the on-the-fly transform
    "save_strategy": "no",  # the final model is saved anyway; --save_steps N turns checkpoints on
    "dataloader_pin_memory": torch.cuda.is_available(),
}
EMBEDDED_MODEL_DEFAULTS: dict[str, Any] = {  # no model argument: a small ViT from scratch, and its recipe
    "model_type": "vit",
    "config_overrides": "image_size=16,patch_size=4,num_channels=1,hidden_size=64,num_hidden_layers=4,"
    "num_attention_heads=4,intermediate_size=128",
    "num_train_epochs": 15,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.06,
    "lr_scheduler_type": "cosine",
    "logging_steps": 0.02,  # ratios of the run: 50 points on the loss curves and 10 evaluations, whatever --max_steps
    "eval_strategy": "steps",
    "eval_steps": 0.1,
}
# Your images and no model: the same small ViT in RGB, its image size taken from the data (see main).
DATA_FOLLOWING_OVERRIDES = "patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128"
SCRATCH_CONV_IMAGE_SIZE = 32  # images fed to a from-scratch model whose config has no image size (ResNet)
MAX_SCRATCH_IMAGE_SIZE = 64  # a from-scratch image size taken from the data is at most this (set image_size to choose)
EMBEDDED_DATA_DEFAULTS: dict[str, Any] = {"train_val_split": 0.2}  # no data argument: the digits
MODEL_KEYS = ("model_name_or_path", "config_name", "model_type")
DATA_KEYS = ("dataset_name", "train_dir", "validation_dir")


def script_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The defaults for a command line whose flags are ``given`` (user flags still win over them)."""
    defaults = dict(SCRIPT_DEFAULTS)
    if user_gave(given, "save_steps", HighwayTrainingArguments):
        defaults["save_strategy"] = "steps"
    if all(given.get(key) is None for key in MODEL_KEYS):
        defaults.update(EMBEDDED_MODEL_DEFAULTS)
        if any(given.get(key) is not None for key in DATA_KEYS):  # your images: size and channels from them
            defaults["config_overrides"] = DATA_FOLLOWING_OVERRIDES
    if all(given.get(key) is None for key in DATA_KEYS):
        defaults.update(EMBEDDED_DATA_DEFAULTS)
    return defaults


def apply_config_overrides(config, overrides: str) -> set[str]:
    """``--config_overrides`` onto ``config``, list values included (``hidden_sizes=[32,64]``, which
    ``update_from_string`` cannot read); returns the keys set."""
    items, depth, current = [], 0, ""
    for char in overrides:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    keys = set()
    for item in filter(None, (i.strip() for i in items)):
        if "=" not in item:
            raise FlagError(f"--config_overrides: {item!r} is not key=value.")
        key, value = (part.strip() for part in item.split("=", 1))
        if value.startswith("["):
            if not hasattr(config, key):
                raise FlagError(f"--config_overrides: {config.model_type} configs have no {key!r}.")
            try:
                setattr(config, key, json.loads(value))
            except json.JSONDecodeError as err:
                raise FlagError(f"--config_overrides: {key}={value} is not a list ({err}).") from None
        else:
            try:
                config.update_from_string(f"{key}={value}")
            except ValueError as err:  # a key the config does not have, a value it cannot read
                raise FlagError(f"--config_overrides: {err}") from None
        keys.add(key)
    return keys


def _height_width(value) -> tuple[int, int] | None:
    """A config's image or patch size as (height, width): configs give an int or a [height, width] list."""
    if not value:
        return None
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def fit_config_to_images(config, image, given: set[str]) -> str:
    """A from-scratch ``config``'s channels and image size for your images, except where given; says what.

    Channels: 3 (RGB; every image is converted, a grayscale one loses nothing), whatever the first image is: a folder
    may mix grayscale and colour images. Image size: the first ``image``'s shorter side, at most
    ``MAX_SCRATCH_IMAGE_SIZE``, a multiple of the patch size (the image processor resizes every image to it)."""
    changed = []
    if "num_channels" not in given and hasattr(config, "num_channels"):
        config.num_channels = 3
        changed.append(f"num_channels={config.num_channels}")
    # a [height, width] image size (Hiera) stays as configured: the image processor resizes every image to it
    if "image_size" not in given and isinstance(getattr(config, "image_size", None), int):
        patch = getattr(config, "patch_size", 1) or 1
        side = min(min(image.size), MAX_SCRATCH_IMAGE_SIZE)
        config.image_size = max(patch, side // patch * patch)
        changed.append(f"image_size={config.image_size}")
    return ",".join(changed)


@dataclass
class ModelArguments:
    """Arguments pertaining to which model/config/image processor we are going to fine-tune, or train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path to pretrained model or model identifier. Don't set to train from scratch."},
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
            "help": "Override some default config settings when a model is trained from scratch, e.g. "
            "image_size=32,patch_size=4,num_hidden_layers=6"
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where do you want to store the pretrained models downloaded from the hub"}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The specific model version to use (branch name, tag name or commit id)."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Name or path of the image processor."})
    token: str | None = field(default=None, metadata={"help": "The token to use as HTTP bearer for remote files."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Whether to run code from the hub (only for repositories you trust)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Will enable to load a pretrained model whose head dimensions are different."},
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError(
                "--config_overrides can't be used in combination with --config_name or --model_name_or_path"
            )
        if self.model_type is not None and self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"Unknown --model_type {self.model_type!r} for image classification. Tested with Highway-BP: "
                f"{', '.join(highway_model_types(MODEL_TYPES))}. Every image-classification type: "
                f"{', '.join(MODEL_TYPES)}."
            )


@dataclass
class DataTrainingArguments:
    """Arguments pertaining to what data we are going to input our model for training and eval."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of a dataset from the hub (could be your own, possibly private)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Percent to split off of train for validation."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of training examples to a random subset of this size."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples to a random subset of this size."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The name of the image column."})
    label_column_name: str = field(default="label", metadata={"help": "The name of the label column."})

    def __post_init__(self):
        for name in ("train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"--{name} {path!r} is not a folder (one sub-folder of images per class).")
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")


ARGUMENT_TYPES = (ModelArguments, DataTrainingArguments, HighwayTrainingArguments, LoraArguments, ComparisonArguments)


def check_flags(parsed: tuple) -> None:
    """Flag combinations refused before anything is built (a ValueError: a usage error)."""
    _, _, training_args, _, compare_args = parsed
    compare_args.check(training_args)
    check_launch(training_args)


def parse_args(argv: list[str] | None = None) -> tuple:
    return parse_args_with_defaults(
        ARGUMENT_TYPES, argv, script_defaults, check=check_flags, prog=os.path.basename(__file__)
    )


def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["labels"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


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
    set_seed(training_args.seed)

    # Initialize our dataset: a hub dataset, image folders, or (none of them) the embedded digits.
    if data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.train_dir is not None or data_args.validation_dir is not None:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    else:
        from hf_hwbp.examples.vision_data import digits_datasets

        dataset = digits_datasets(validation_fraction=data_args.train_val_split)
    first_split = "train" if "train" in dataset else "validation"
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset[first_split].column_names:
            raise FlagError(
                f"--{'image' if column == data_args.image_column_name else 'label'}_column_name {column!r} is not a "
                f"column of the dataset (columns: {', '.join(dataset[first_split].column_names)})."
            )

    # If we don't have a validation split, split off a percentage of train as validation.
    data_args.train_val_split = None if "validation" in dataset else data_args.train_val_split
    if isinstance(data_args.train_val_split, float) and data_args.train_val_split > 0.0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"] = split["train"]
        dataset["validation"] = split["test"]

    # Prepare label mappings: class names from a ClassLabel column, else the sorted distinct values.
    label_feature = dataset[first_split].features[data_args.label_column_name]
    if hasattr(label_feature, "names"):
        labels = list(label_feature.names)

        def to_id(value):
            return int(value)
    else:
        labels = sorted({str(v) for v in dataset[first_split][data_args.label_column_name]})
        ids = {name: i for i, name in enumerate(labels)}

        def to_id(value):
            return ids[str(value)]

    label2id = {label: str(i) for i, label in enumerate(labels)}
    id2label = {str(i): label for i, label in enumerate(labels)}

    def compute_metrics(p):
        predictions = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return {"accuracy": float((np.argmax(predictions, axis=1) == p.label_ids).mean())}

    common = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.config_name or model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            num_labels=len(labels),
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            **common,
        )
    else:
        check_highway_supported(model_args.model_type, training_args.use_highway_bp, "image-classification")
        config = CONFIG_MAPPING[model_args.model_type]()
        given = apply_config_overrides(config, model_args.config_overrides or "")
        if (
            data_args.dataset_name is not None
            or data_args.train_dir is not None
            or data_args.validation_dir is not None
        ):
            fitted = fit_config_to_images(config, dataset[first_split][0][data_args.image_column_name], given)
            if fitted:
                logger.warning(
                    f"From scratch on your images: {fitted} (RGB: every image converted to 3 channels; the size of "
                    f"the first image, at most {MAX_SCRATCH_IMAGE_SIZE} pixels). Choose them with --config_overrides."
                )
        config.num_labels, config.label2id, config.id2label = len(labels), label2id, id2label
        if not config.architectures:  # some types map to several classes (DeiT): take the plain classifier
            classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[config.model_type]
            config.architectures = [classes[0] if isinstance(classes, (list, tuple)) else classes]
        size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if isinstance(size, int) and isinstance(patch, int) and size % patch:  # ViT-style patches; Hiera's convolve
            raise FlagError(f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}.")
    check_highway_supported(config.model_type, training_args.use_highway_bp, "image-classification")

    if model_args.image_processor_name or model_args.model_name_or_path:
        image_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **common
        )
    else:  # a model from scratch: a ViT image processor at its image size
        channels = getattr(config, "num_channels", 3)
        # ResNet configs have no image size; Hiera's is [height, width]
        height, width = _height_width(getattr(config, "image_size", None)) or (SCRATCH_CONV_IMAGE_SIZE,) * 2
        image_processor = ViTImageProcessor(
            size={"height": height, "width": width},
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
        )
    image_mode = "L" if getattr(config, "num_channels", 3) == 1 else "RGB"

    def build_model(args=training_args):
        set_seed(args.seed)  # the same initial weights in every run (--compare_backprop)
        if model_args.model_name_or_path:
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **common,
            )
        else:
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
        if lora_args.use_lora:
            heads = ("classifier", "score", "head")
            head = [name for name in heads if isinstance(getattr(model, name, None), torch.nn.Module)]
            model = apply_lora(
                model,
                lora_args,
                task_type=None,
                default_targets=["q_proj", "v_proj"],
                modules_to_save=head or None,
                scratch_output_dir=None if model_args.model_name_or_path else args.output_dir,
                write_base=args.should_save,
            )
        return model

    # The model's image processor resizes and normalizes every image (no augmentation).
    def transforms(example_batch):
        images = [image.convert(image_mode) for image in example_batch[data_args.image_column_name]]
        return {
            "pixel_values": list(image_processor(images, return_tensors="pt")["pixel_values"]),
            "labels": [to_id(label) for label in example_batch[data_args.label_column_name]],
        }

    if training_args.do_train:
        if "train" not in dataset:
            raise FlagError("--do_train requires a train dataset")
        if data_args.max_train_samples is not None:
            n = min(len(dataset["train"]), data_args.max_train_samples)
            dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(n))
        dataset["train"].set_transform(transforms)
    if training_args.do_eval:
        if "validation" not in dataset:
            raise FlagError("--do_eval requires a validation dataset")
        if data_args.max_eval_samples is not None:
            n = min(len(dataset["validation"]), data_args.max_eval_samples)
            dataset["validation"] = dataset["validation"].shuffle(seed=training_args.seed).select(range(n))
        dataset["validation"].set_transform(transforms)

    def build_trainer(args, model):
        trainer_class = LayerParallelTrainer if args.layer_parallel else HighwayTrainer
        return trainer_class(
            model=model,
            args=args,
            train_dataset=dataset["train"] if args.do_train else None,
            eval_dataset=dataset["validation"] if args.do_eval else None,
            compute_metrics=compute_metrics,
            processing_class=image_processor,
            data_collator=collate_fn,
        )

    if not model_args.model_name_or_path:
        log_model_to_build(AutoModelForImageClassification, config, logger, model_args.trust_remote_code)
    trainer = build_trainer(training_args, build_model())
    metrics: dict[str, float] = {}

    # Training
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        train_metrics = {**train_result.metrics, "train_samples": len(dataset["train"])}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)

    # Evaluation
    if training_args.do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(dataset["validation"])}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    # Write model card and (optionally) push to hub
    embedded = data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is None
    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": (
            "embedded data set (scikit-learn's handwritten digits, hf_hwbp.examples.vision_data)"
            if embedded
            else data_args.dataset_name or "your image folders"
        ),
        "tags": ["image-classification", "vision"],
    }
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
            columns=[("eval loss", "eval_loss", ".4f"), ("accuracy", "eval_accuracy", ".4f")],
            title="Image classification: Highway-BP vs backprop",
            comparison_dir=compare_args.comparison_dir,
            timing_rounds=compare_args.comparison_timing_rounds,
        )
        comparison = os.path.dirname(paths["markdown"]) if paths else None
    if training_args.should_save:
        print(outputs_line(training_args.output_dir, comparison))
    return metrics


if __name__ == "__main__":
    main()
