"""GPT-2 under transformers' common model tests, unpatched and patched (k = 1, k = L)."""

from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from .suite import three_modes
from .testers import VOCAB, TextTester
from .vendor.test_modeling_common import ModelTesterMixin
from .vendor.test_training_mixin import TrainingTesterMixin


class GPT2(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2ForTokenClassification)

    def setUp(self):
        config = dict(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=37, activation_function="gelu",
            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, n_positions=512, initializer_range=0.02,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1, num_labels=3,
        )  # fmt: skip
        self.model_tester = TextTester(self, GPT2Config, config, token_type_ids=True, causal_lm_class=GPT2LMHeadModel)


three_modes(GPT2, globals())
