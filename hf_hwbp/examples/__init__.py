"""What the example scripts (scripts/run_clm_hwbp.py, scripts/run_image_classification_hwbp.py) share.

The scripts keep the shape of transformers' run_clm.py / run_image_classification.py; this package holds the parts
those scripts do not have: the embedded default recipes (defaults that user flags always beat, shown by --help),
LoRA, the Highway model-type check, the comparison with backprop (``comparison``) and the embedded data that makes
a run work with no downloads (``data``: a text corpus and its tokenizer; ``vision_data``: the digits images).
Layer-parallel training is a training argument (``--layer_parallel``, ``hf_hwbp.HighwayTrainingArguments``) that the
scripts answer with ``hf_hwbp.LayerParallelTrainer``.
"""

from .arguments import ComparisonArguments, LoraArguments, parse_args_with_defaults
from .lora import apply_lora
from .models import check_highway_supported, fit_config_to_tokenizer, highway_model_types

__all__ = [
    "ComparisonArguments",
    "LoraArguments",
    "apply_lora",
    "check_highway_supported",
    "fit_config_to_tokenizer",
    "highway_model_types",
    "parse_args_with_defaults",
]
