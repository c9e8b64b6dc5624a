"""ViT, DINOv2 and Swin under transformers' common model tests, unpatched and patched (k = 1, k = L).

Not with TrainingTesterMixin: its overfit test builds text batches only in transformers 5.25.0 (an image model
raises "Modality image not supported yet for training overfit", unpatched too)."""

from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from .suite import three_modes
from .testers import VisionTester
from .vendor.test_modeling_common import ModelTesterMixin

VIT = dict(
    image_size=30, patch_size=2, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=37, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    initializer_range=0.02, num_labels=10,
)  # fmt: skip


class ViT(ModelTesterMixin):
    all_model_classes = (ViTModel, ViTForImageClassification)
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = VisionTester(self, ViTConfig, dict(VIT, encoder_stride=2), image_size=30, patch_size=2)


class Dinov2(ModelTesterMixin):
    all_model_classes = (Dinov2Model, Dinov2ForImageClassification)
    test_resize_embeddings = False
    test_all_params_have_gradient = False  # the mask token is read only with bool_masked_pos (not in training here)

    def setUp(self):
        config = {k: v for k, v in VIT.items() if k != "intermediate_size"}
        self.model_tester = VisionTester(self, Dinov2Config, dict(config, mlp_ratio=4), image_size=30, patch_size=2)


class Swin(ModelTesterMixin):
    all_model_classes = (SwinModel, SwinForImageClassification)
    test_resize_embeddings = False

    def setUp(self):
        config = dict(
            image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 2, 1], num_heads=[2, 2, 4],
            window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            drop_path_rate=0.1, hidden_act="gelu", initializer_range=0.02, encoder_stride=8, num_labels=10,
        )  # fmt: skip
        # transformers' Swin tester: the stack attributes the mixin reads are those of the stages
        self.model_tester = VisionTester(self, SwinConfig, config, image_size=32, patch_size=2, extra_tokens=0)
        self.model_tester.num_hidden_layers = 3
        self.model_tester.hidden_size = 16


three_modes(ViT, globals())
three_modes(Dinov2, globals())
three_modes(Swin, globals())
