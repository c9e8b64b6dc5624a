"""ViT (ViTForImageClassification, ViTModel): blocks in ``vit.layers`` (transformers 5.x)."""

from .base import StackAdapter

VIT_ADAPTER = StackAdapter(name="ViT", stack_paths=("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"))
