"""The embedded default image data set: scikit-learn's handwritten digits, runs on a fresh machine with no downloads.

1797 grayscale images of 8x8 pixels (values 0..16), 10 classes, shipped inside scikit-learn
(``sklearn.datasets.load_digits``, UCI ML hand-written digits). They are split deterministically (stratified by
class, the same split on every machine), scaled to [0, 1], upscaled (bilinear) to ``image_size`` x ``image_size``,
repeated over ``num_channels`` channels and normalized with ``(x - mean) / std``: ready as ``pixel_values`` of a
ViT-style model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

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


class DigitsDataset(Dataset):
    """Digits images and labels; items are ``{"pixel_values": [C, H, W] float, "labels": int64}`` for the Trainer.

    Images are kept at 8x8 and turned into ``pixel_values`` (upscaled, normalized) one item at a time, so a large
    ``image_size`` (224 for a pretrained ViT) costs no memory up front.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        image_size: int = 16,
        num_channels: int = 1,
        mean: float | list[float] = 0.5,
        std: float | list[float] = 0.5,
    ):
        if images.dim() != 3 or len(images) != len(labels):
            raise ValueError(
                f"images must be [N, H, W] with one label per image, got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}."
            )
        self.images = images
        self.labels = labels
        self.image_size, self.num_channels, self.mean, self.std = image_size, num_channels, mean, std
        digits_pixel_values(images[:1], image_size, num_channels, mean, std)  # validate the settings once

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = digits_pixel_values(
            self.images[index : index + 1], self.image_size, self.num_channels, self.mean, self.std
        )
        return {"pixel_values": pixels[0], "labels": self.labels[index]}

    def select(self, indices) -> DigitsDataset:
        """A subset (as ``datasets.Dataset.select``), e.g. ``ds.select(range(100))``."""
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        return DigitsDataset(
            self.images[indices], self.labels[indices], self.image_size, self.num_channels, self.mean, self.std
        )


@dataclass
class DigitsData:
    """The embedded digits split: ``train`` and ``validation`` datasets and the class names."""

    train: DigitsDataset
    validation: DigitsDataset
    label_names: list[str]


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


def digits_pixel_values(
    images: torch.Tensor,
    image_size: int = 16,
    num_channels: int = 1,
    mean: float | list[float] = 0.5,
    std: float | list[float] = 0.5,
) -> torch.Tensor:
    """8x8 digits (values 0..16, shape [N, 8, 8]) as normalized ``pixel_values`` [N, num_channels, size, size]."""
    if image_size < 1 or num_channels < 1:
        raise ValueError(f"image_size and num_channels must be >= 1, got {image_size} and {num_channels}.")
    x = images.float().unsqueeze(1) / 16.0
    if image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, num_channels, -1, -1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    if mean_t.numel() not in (1, num_channels) or std_t.numel() not in (1, num_channels):
        raise ValueError(f"mean/std need 1 or num_channels={num_channels} values, got {mean!r} and {std!r}.")
    return ((x - mean_t) / std_t).contiguous()


def digits_image_classification_data(
    image_size: int = 16,
    num_channels: int = 1,
    validation_fraction: float = 0.2,
    mean: float | list[float] = 0.5,
    std: float | list[float] = 0.5,
    seed: int = 0,
) -> DigitsData:
    """The embedded digits data set as train / validation datasets of ``pixel_values`` and ``labels``.

    ``image_size`` and ``num_channels`` should match the model's config (e.g. 16 and 1 for a small ViT trained from
    scratch; 224 and 3 to fine-tune a pretrained one, with its image processor's mean and std). The split depends only
    on ``validation_fraction`` and ``seed``.
    """
    digits = _load_digits()
    images = torch.as_tensor(digits.images)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = split_indices(labels, validation_fraction, seed)
    settings = {"image_size": image_size, "num_channels": num_channels, "mean": mean, "std": std}
    return DigitsData(
        train=DigitsDataset(images[train_idx], labels[train_idx], **settings),
        validation=DigitsDataset(images[val_idx], labels[val_idx], **settings),
        label_names=list(DIGITS_LABELS),
    )


__all__ = [
    "DIGITS_LABELS",
    "DigitsData",
    "DigitsDataset",
    "digits_image_classification_data",
    "digits_pixel_values",
    "split_indices",
]
