#!/usr/bin/env python
"""Image classification with Highway backpropagation, in the manner of transformers' ``run_image_classification.py``.

The flags are run_image_classification's (``--model_name_or_path``, ``--dataset_name``, ``--train_dir`` /
``--validation_dir``, ``--train_val_split``, ``--image_column_name``, ``--label_column_name``,
``--ignore_mismatched_sizes``, ...) plus ``--model_type`` / ``--config_overrides`` to train from scratch, LoRA
(``--use_lora``), every ``TrainingArguments`` flag and the Highway-BP ones (``--hwbp_k``, ``--use_highway_bp false``,
...). A single ``.json`` argument is read as an arguments file.

With no model and no data arguments it runs the embedded default: a small ViT (4 layers, hidden size 64, 16x16
images in 4x4 patches, 1 channel) trained from scratch on scikit-learn's handwritten digits (``hf_hwbp.vision_data``:
1797 8x8 images, 10 classes, shipped inside scikit-learn; no download) for 15 epochs: about 30 s on 2 CPU cores,
validation accuracy ~0.99. Its recipe (``EMBEDDED_DEFAULTS``) applies whenever no model argument is given and only
fills in what you do not pass::

    python scripts/run_image_classification_hwbp.py                     # embedded default
    python scripts/run_image_classification_hwbp.py --compare_backprop   # + plain backprop: PNG + table
    python scripts/run_image_classification_hwbp.py --model_name_or_path ./vit-base --use_lora   # fine-tune on digits
    python scripts/run_image_classification_hwbp.py --model_name_or_path ./vit-base --train_dir imgs/train

With ``--model_name_or_path`` and no data arguments the digits are upscaled to the model's image size and channels
and normalized with its image processor's mean and std. Images of ``--dataset_name`` / ``--train_dir`` are resized
(bilinear) and normalized the same way, without augmentation (no torchvision needed).

Differences from run_image_classification: ``--do_train`` / ``--do_eval`` default to true, ``--output_dir`` to
``outputs/run_image_classification_hwbp``, ``--remove_unused_columns`` to false. Outputs in ``output_dir``: the model
and image processor, ``train_results.json``, ``eval_results.json`` and ``all_results.json`` (with
``eval_accuracy``); with ``--compare_backprop`` also ``output_dir/backprop``, ``loss_curves.png``, ``comparison.md``
and ``comparison.json``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTImageProcessor,
    set_seed,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_clm_hwbp import (  # noqa: E402  (the scripts share their argument, timing and comparison helpers)
    LoraArguments,
    RunArguments,
    StepTimer,
    apply_lora,
    backprop_arguments,
    check_highway_supported,
    parse_script_args,
    run_training,
    setup_logging,
    write_comparison,
)

from hf_hwbp.trainer import HighwayTrainer, HighwayTrainingArguments  # noqa: E402
from model_patches import supported_model_types  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_TYPES = tuple(sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES))
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "run_image_classification_hwbp")

SCRIPT_DEFAULTS: dict[str, Any] = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "do_train": True,
    "do_eval": True,
    "remove_unused_columns": False,  # the image column feeds the on-the-fly transform
    "dataloader_pin_memory": torch.cuda.is_available(),
}
# The embedded default run (no model argument): a small ViT from scratch on the digits.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "model_type": "vit",
    "config_overrides": "image_size=16,patch_size=4,num_channels=1,hidden_size=64,num_hidden_layers=4,"
    "num_attention_heads=4,intermediate_size=128",
    "train_val_split": 0.2,
    "num_train_epochs": 15,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "eval_strategy": "epoch",
    "save_strategy": "no",
}
SMOKE_DEFAULTS: dict[str, Any] = {
    "max_steps": 4,
    "max_train_samples": 64,
    "max_eval_samples": 32,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "logging_steps": 1,
    "eval_strategy": "steps",
    "eval_steps": 2,
    "save_strategy": "no",
    "warmup_steps": 0,
}
SMOKE_EMBEDDED_DEFAULTS: dict[str, Any] = {
    "config_overrides": "image_size=8,patch_size=4,num_channels=1,hidden_size=16,num_hidden_layers=3,"
    "num_attention_heads=2,intermediate_size=32",
}
MODEL_KEYS = ("model_name_or_path", "model_type", "config_name")
IMAGE_DATA_KEYS = ("dataset_name", "train_dir", "validation_dir")


@dataclass
class ModelArguments:
    """Which model/config/image processor to fine-tune, or train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Path to a pretrained model (or hub id). Leave out to train from scratch (--model_type)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "If training from scratch, an image-classification model type. With Highway-BP: one of "
            + ", ".join(t for t in supported_model_types() if t in MODEL_TYPES)
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
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Name or path of the image processor config (mean, std) if not model_name."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the pretrained models and datasets downloaded from the hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(default=None, metadata={"help": "HTTP bearer token for remote files."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Whether to run code from the hub (only for repositories you trust)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classifier has another number of labels (re-initialized)."},
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
                f"Unknown --model_type {self.model_type!r} for image classification. Model types with a Highway-BP "
                f"adapter: {', '.join(highway)}. Every image-classification type: {', '.join(MODEL_TYPES)}."
            )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on. None of them: the embedded digits (scikit-learn)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of a dataset from the hub (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder containing the training data."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder containing the validation data."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of train split off for validation (when there is no validation)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of training examples to this value if set."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the number of evaluation examples to this value if set."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The column of the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column of the labels."})

    def __post_init__(self):
        for flag in ("train_dir", "validation_dir"):
            path = getattr(self, flag)
            if path is not None and not os.path.isdir(path):
                raise ValueError(
                    f"--{flag} {path!r} is not a folder. Pass a folder of images (one sub-folder per class, the "
                    "datasets 'imagefolder' layout), or leave out every data argument to train on the embedded digits."
                )
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        for flag in ("max_train_samples", "max_eval_samples"):
            if getattr(self, flag) is not None and getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1, got {getattr(self, flag)}.")


def build_config(model_args, num_labels: int, label_names: list[str]):
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    name = model_args.config_name or model_args.model_name_or_path
    if name:
        return AutoConfig.from_pretrained(
            name,
            num_labels=num_labels,
            label2id=label2id,
            id2label=id2label,
            finetuning_task="image-classification",
            **config_kwargs,
        )
    if model_args.model_type is None:
        raise ValueError("Pass --model_name_or_path, --config_name or --model_type (to train from scratch).")
    config = CONFIG_MAPPING[model_args.model_type]()
    logger.info("You are instantiating a new config instance from scratch.")
    if model_args.config_overrides is not None:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as err:
            raise ValueError(
                f"--config_overrides {model_args.config_overrides!r}: {err}. Use comma-separated key=value pairs of "
                f"{type(config).__name__} attributes, e.g. image_size=32,patch_size=4."
            ) from None
    config.num_labels = num_labels
    config.id2label, config.label2id = id2label, label2id
    if getattr(config, "image_size", None) is not None and getattr(config, "patch_size", None):
        if config.image_size % config.patch_size:
            raise ValueError(
                f"image_size={config.image_size} is not a multiple of patch_size={config.patch_size}; fix "
                "--config_overrides."
            )
    return config


def image_geometry(config) -> tuple[int, int]:
    """(image size, channels) the model expects."""
    size = getattr(config, "image_size", None) or 224
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size), int(getattr(config, "num_channels", None) or 3)


def build_image_processor(model_args, config):
    """The pretrained image processor (for mean / std), or a ViT one at the model's size with mean = std = 0.5."""
    name = model_args.image_processor_name or model_args.model_name_or_path
    if name:
        try:
            return AutoImageProcessor.from_pretrained(
                name, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token
            )
        except OSError:
            if model_args.image_processor_name:
                raise
            logger.warning(f"No image processor found at {name!r}: normalizing with mean = std = 0.5.")
    size, channels = image_geometry(config)
    return ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
    )


def _mean_std(processor, channels: int) -> tuple[list[float], list[float]]:
    mean = list(getattr(processor, "image_mean", None) or [0.5])
    std = list(getattr(processor, "image_std", None) or [0.5])
    if len(mean) != channels:
        mean = [float(np.mean(mean))] * channels
    if len(std) != channels:
        std = [float(np.mean(std))] * channels
    return mean, std


def build_model(model_args, lora_args, config):
    if model_args.model_name_or_path:
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        )
    else:
        model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"Training new model from scratch - Total size={n_params / 2**20:.2f}M params")
    if lora_args.use_lora:
        head = [
            name for name in ("classifier", "score", "head") if isinstance(getattr(model, name, None), torch.nn.Module)
        ]
        model = apply_lora(
            model, lora_args, task_type=None, default_targets=["q_proj", "v_proj"], modules_to_save=head or None
        )
    return model


def embedded_datasets(data_args, config_for_labels, model_args):
    """The digits, at the image size / channels / normalization of the model."""
    from hf_hwbp.vision_data import DIGITS_LABELS, digits_image_classification_data

    config = config_for_labels(len(DIGITS_LABELS), DIGITS_LABELS)
    processor = build_image_processor(model_args, config)
    size, channels = image_geometry(config)
    mean, std = _mean_std(processor, channels)
    data = digits_image_classification_data(
        image_size=size, num_channels=channels, validation_fraction=data_args.train_val_split or 0.2, mean=mean, std=std
    )
    return config, processor, {"train": data.train, "validation": data.validation}


def pil_to_pixel_values(size: int, channels: int, mean: list[float], std: list[float]):
    """A PIL image -> normalized [channels, size, size] float tensor (bilinear resize, no augmentation)."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"Images can be fed to models with 1 or 3 channels, this one has num_channels={channels}.")
    mode = "L" if channels == 1 else "RGB"
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def convert(image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        array = np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy((array - mean_a) / std_a)

    return convert


def hub_or_folder_datasets(model_args, data_args, config_for_labels):
    """run_image_classification's path: a hub dataset or image folders, transformed on the fly."""
    import datasets

    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    first = "train" if "train" in dataset else next(iter(dataset))
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset[first].column_names:
            raise ValueError(
                f"Column {column!r} is not in the dataset (columns: {', '.join(dataset[first].column_names)}); pass "
                "--image_column_name / --label_column_name."
            )
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    feature = dataset[first].features[data_args.label_column_name]
    if hasattr(feature, "names"):
        label_names = list(feature.names)
        to_id = int
    else:
        label_names = sorted({str(v) for v in dataset[first][data_args.label_column_name]})
        ids = {name: i for i, name in enumerate(label_names)}

        def to_id(value):
            return ids[str(value)]

    config = config_for_labels(len(label_names), label_names)
    processor = build_image_processor(model_args, config)
    size, channels = image_geometry(config)
    convert = pil_to_pixel_values(size, channels, *_mean_std(processor, channels))

    def transform(batch):
        return {
            "pixel_values": [convert(image) for image in batch[data_args.image_column_name]],
            "labels": [to_id(label) for label in batch[data_args.label_column_name]],
        }

    for name in dataset:
        dataset[name].set_transform(transform)
    return config, processor, dict(dataset)


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([int(example["labels"]) for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def compute_metrics(eval_pred) -> dict[str, float]:
    predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": float((np.argmax(predictions, axis=-1) == eval_pred.label_ids).mean())}


def _select(dataset, limit: int | None):
    return dataset.select(range(min(len(dataset), limit))) if limit is not None else dataset


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
    logger.setLevel(setup_logging(training_args))
    embedded = all(getattr(data_args, key) is None for key in IMAGE_DATA_KEYS)
    logger.info(
        f"device: {training_args.device}, Highway-BP: {training_args.use_highway_bp}"
        + (f" (k={training_args.hwbp_k})" if training_args.use_highway_bp else "")
        + (", data: embedded digits (scikit-learn)" if embedded else "")
    )
    if run_args.compare_backprop and not training_args.use_highway_bp:
        raise ValueError("--compare_backprop compares Highway-BP with plain backprop: leave --use_highway_bp true.")
    if run_args.compare_backprop and not training_args.do_train:
        raise ValueError("--compare_backprop compares two training runs: leave --do_train true.")

    set_seed(training_args.seed)
    # Fail on the model type before touching data or weights.
    if model_args.model_type is not None and not (model_args.model_name_or_path or model_args.config_name):
        check_highway_supported(model_args.model_type, training_args, "image-classification")

    def config_for_labels(num_labels: int, label_names: list[str]):
        config = build_config(model_args, num_labels, label_names)
        check_highway_supported(config.model_type, training_args, "image-classification")
        return config

    if embedded:
        config, processor, splits = embedded_datasets(data_args, config_for_labels, model_args)
    else:
        config, processor, splits = hub_or_folder_datasets(model_args, data_args, config_for_labels)
    if training_args.do_train and "train" not in splits:
        raise ValueError("--do_train requires a train dataset (--train_dir or a dataset with a train split).")
    if training_args.do_eval and "validation" not in splits:
        raise ValueError("--do_eval requires a validation dataset (--validation_dir, --train_val_split or a split).")
    train_dataset = _select(splits["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = _select(splits["validation"], data_args.max_eval_samples) if training_args.do_eval else None

    variants = [training_args] + ([backprop_arguments(training_args)] if run_args.compare_backprop else [])
    results = []
    for args in variants:
        set_seed(args.seed)
        model = build_model(model_args, lora_args, config)
        timer = StepTimer()
        trainer = HighwayTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processor,
            data_collator=collate_fn,
            compute_metrics=compute_metrics if args.do_eval else None,
            callbacks=[timer],
        )
        result = run_training(trainer, args, timer, train_dataset, eval_dataset)
        results.append(result)
        name, metrics = result.name, result.metrics
        if "eval_accuracy" in metrics and args.should_save:  # the main process only
            print(
                f"[{name}] validation accuracy {metrics['eval_accuracy']:.4f}, loss {metrics['eval_loss']:.4f}"
                + (f", {metrics['seconds_per_step']:.3f} s/step" if metrics["seconds_per_step"] else "")
            )
        del trainer, model

    if run_args.compare_backprop and training_args.should_save:
        paths = write_comparison(
            results,
            training_args.output_dir,
            columns=[("eval loss", "eval_loss", ".4f"), ("accuracy", "eval_accuracy", ".4f")],
            title="Image classification: Highway-BP vs backprop",
        )
        with open(paths["markdown"]) as f:
            print(f.read())
        print(f"Wrote {paths['png']}, {paths['markdown']} and {paths['json']}")
    return {r.name: r.metrics for r in results}


if __name__ == "__main__":
    main()
