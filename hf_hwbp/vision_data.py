"""Old import path of :mod:`hf_hwbp.examples.vision_data` (the embedded digits image data set), kept working."""

from .examples.vision_data import DIGITS_LABELS, digits_datasets, split_indices

__all__ = ["DIGITS_LABELS", "digits_datasets", "split_indices"]
