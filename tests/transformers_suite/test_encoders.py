"""BERT, T5 and BART (encoders and encoder-decoders) under transformers' common model tests, unpatched and patched
(k = 1, k = L)."""

from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartForQuestionAnswering,
    BartModel,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    T5Config,
    T5ForConditionalGeneration,
    T5Model,
)

from .suite import three_modes
from .testers import VOCAB, Seq2SeqTester, TextTester
from .vendor.test_modeling_common import ModelTesterMixin
from .vendor.test_training_mixin import TrainingTesterMixin


class Bert(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (BertModel, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification)

    def setUp(self):
        config = dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
            type_vocab_size=16, initializer_range=0.02, num_labels=3,
        )  # fmt: skip
        self.model_tester = TextTester(self, BertConfig, config, token_type_ids=True, causal_lm_class=BertForMaskedLM)


class T5(ModelTesterMixin, TrainingTesterMixin):
    all_model_classes = (T5Model, T5ForConditionalGeneration)
    is_encoder_decoder = True

    def setUp(self):
        config = dict(
            vocab_size=VOCAB, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.1, initializer_factor=0.002, eos_token_id=1,
            pad_token_id=0, decoder_start_token_id=0,
        )  # fmt: skip
        self.model_tester = Seq2SeqTester(self, T5Config, config, causal_lm_class=T5ForConditionalGeneration)


class Bart(ModelTesterMixin, TrainingTesterMixin):
    # not BartForSequenceClassification: it needs the same number of eos tokens in every row (the mixin's padding
    # tests break that) and refuses inputs_embeds; transformers' own Bart tests override those tests for it
    all_model_classes = (BartModel, BartForConditionalGeneration, BartForQuestionAnswering)
    is_encoder_decoder = True

    def setUp(self):
        config = dict(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, dropout=0.1, attention_dropout=0.1,
            max_position_embeddings=64, eos_token_id=2, pad_token_id=1, bos_token_id=0, num_labels=3,
        )  # fmt: skip
        self.model_tester = Seq2SeqTester(
            self, BartConfig, config, eos_token_id=2, first_token=3, causal_lm_class=BartForConditionalGeneration
        )


three_modes(Bert, globals())
three_modes(T5, globals())
three_modes(Bart, globals())
