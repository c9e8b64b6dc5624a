"""Llama under transformers' common model tests, unpatched and patched (k = 1, k = L)."""

from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .suite import three_modes
from .testers import VOCAB, TextTester
from .vendor.test_modeling_common import ModelTesterMixin
from .vendor.test_training_mixin import TrainingTesterMixin

# transformers' CausalLMModelTester defaults (tests/causal_lm_tester.py, not in the source distribution)
CAUSAL_LM = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=37, hidden_act="gelu", max_position_embeddings=512, initializer_range=0.02,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3,
)  # fmt: skip


class Llama(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification)

    def setUp(self):
        self.model_tester = TextTester(self, LlamaConfig, CAUSAL_LM, causal_lm_class=LlamaForCausalLM)


three_modes(Llama, globals())
