"""The embedded default image data set: scikit-learn's handwritten digits, runs on a fresh machine with no downloads.

1797 grayscale images of 8x8 pixels, 10 classes, shipped inside scikit-learn (``sklearn.datasets.load_digits``, UCI ML
hand-written digits). ``digits_datasets`` gives them as ``datasets`` splits of PIL images and class labels, in the
shape ``load_dataset("imagefolder", ...)`` gives: an example script resizes and normalizes them with the model's
image processor, as it does any other images. The split is deterministic and stratified by class.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

DIGITS_LABELS = [str(i) for i in range(10)]


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "The embedded image data set (scikit-learn's digits) needs scikit-learn: pip install hf_hwbp[vision] "
            "(or pass your own images with --dataset_name / --train_dir)."
        ) from err
    return load_digits()


def split_indices(labels: torch.Tensor, validation_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stratified split: in every class the first ``round(fraction * n)`` of a seeded permutation
    go to validation. Independent of the global RNG state."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    train, validation = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = max(1, round(validation_fraction * len(members)))
        validation.append(members[:n_val])
        train.append(members[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(validation)).values


def digits_datasets(validation_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """The digits as ``train`` / ``validation`` datasets: ``"image"`` (8x8 grayscale PIL images, values 0..255) and
    ``"label"`` (a ``ClassLabel`` named "0".."9"). The split depends only on ``validation_fraction`` and ``seed``."""
    digits = _load_digits()
    pixels = np.round(np.asarray(digits.images) * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = split_indices(labels, validation_fraction, seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGITS_LABELS)})

    def split(indices: torch.Tensor) -> datasets.Dataset:
        rows = indices.tolist()
        return datasets.Dataset.from_dict(
            {"image": [pixels[i] for i in rows], "label": [int(labels[i]) for i in rows]}, features=features
        )

    return datasets.DatasetDict({"train": split(train_idx), "validation": split(val_idx)})


__all__ = ["DIGITS_LABELS", "digits_datasets", "split_indices"]
