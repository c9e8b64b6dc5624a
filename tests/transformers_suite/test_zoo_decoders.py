"""Mistral, Qwen3 and Mixtral (MoE) under transformers' common model tests, unpatched and patched (k = 1, k = L)."""

from transformers import (
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from .suite import three_modes
from .test_llama import CAUSAL_LM
from .testers import TextTester
from .vendor.test_modeling_common import ModelTesterMixin
from .vendor.test_training_mixin import TrainingTesterMixin


class Mistral(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (MistralModel, MistralForCausalLM)

    def setUp(self):
        self.model_tester = TextTester(
            self, MistralConfig, dict(CAUSAL_LM, sliding_window=4), causal_lm_class=MistralForCausalLM
        )


class Qwen3(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (Qwen3Model, Qwen3ForCausalLM)

    def setUp(self):
        self.model_tester = TextTester(self, Qwen3Config, dict(CAUSAL_LM, head_dim=8), causal_lm_class=Qwen3ForCausalLM)


class Mixtral(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (MixtralModel, MixtralForCausalLM)
    test_all_params_have_gradient = False  # as transformers' Mixtral tester: top-2 of 4 experts may skip one

    def setUp(self):
        # intermediate_size 32, not 37: the experts' grouped matmul (torch._grouped_mm) needs 16-byte aligned strides;
        # head_dim set: MixtralConfig leaves it None, which the rope-scaling test reads
        config = dict(CAUSAL_LM, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=8)
        self.model_tester = TextTester(self, MixtralConfig, config, causal_lm_class=MixtralForCausalLM)


three_modes(Mistral, globals())
three_modes(Qwen3, globals())
three_modes(Mixtral, globals())
