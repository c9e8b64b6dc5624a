"""Compact model testers for transformers' ``ModelTesterMixin`` and ``TrainingTesterMixin``.

transformers' source distribution ships the common mixins (``tests/test_modeling_common.py``) but not the per-model
test files (``tests/models/<name>/test_modeling_<name>.py``) nor ``tests/causal_lm_tester.py``: these testers play
their part, with the sizes of transformers' own testers (2 layers, hidden size 32, 4 heads, vocabulary 99, batch
13 -> 2 here to keep the suite short). Each provides what the mixins read: ``get_config``,
``prepare_config_and_inputs_for_common`` and the shape attributes (``batch_size``, ``seq_length``,
``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ...).
"""

from __future__ import annotations

from typing import Any

import torch

from .vendor.test_modeling_common import floats_tensor, ids_tensor, random_attention_mask

BATCH = 2
SEQ = 7
VOCAB = 99


class _Tester:
    """What every tester has: the test case, the config class and its keyword arguments."""

    is_training = True

    def __init__(self, parent, config_class, config_kwargs: dict[str, Any], **attributes):
        self.parent = parent
        self.config_class = config_class
        self.config_kwargs = dict(config_kwargs)
        self.batch_size = BATCH
        for name, value in attributes.items():
            setattr(self, name, value)

    def get_config(self):
        return self.config_class(**self.config_kwargs)


class TextTester(_Tester):
    """Token inputs: decoder-only LMs (GPT-2, Llama, Mistral, Qwen3, Mixtral) and encoders (BERT)."""

    def __init__(self, parent, config_class, config_kwargs, *, num_hidden_layers=2, token_type_ids=False, **kw):
        super().__init__(
            parent,
            config_class,
            config_kwargs,
            seq_length=SEQ,
            vocab_size=VOCAB,
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=num_hidden_layers,
            **kw,
        )
        self.token_type_ids = token_type_ids

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        inputs = {
            "input_ids": ids_tensor([self.batch_size, self.seq_length], self.vocab_size),
            "attention_mask": random_attention_mask([self.batch_size, self.seq_length]),
        }
        if self.token_type_ids:
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], 16)
        return config, inputs


class Seq2SeqTester(_Tester):
    """Encoder-decoder inputs (T5, BART): both stacks are patched."""

    def __init__(self, parent, config_class, config_kwargs, *, eos_token_id=None, first_token=0, **kw):
        super().__init__(
            parent,
            config_class,
            config_kwargs,
            seq_length=SEQ,
            encoder_seq_length=SEQ,
            decoder_seq_length=SEQ,
            vocab_size=VOCAB,
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            **kw,
        )
        self.eos_token_id = eos_token_id
        self.first_token = first_token

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        shape = [self.batch_size, self.seq_length]
        input_ids = ids_tensor(shape, self.vocab_size).clamp(self.first_token)
        decoder_input_ids = ids_tensor(shape, self.vocab_size).clamp(self.first_token)
        if self.eos_token_id is not None:  # BART's sequence classification reads the last eos of every example
            input_ids[:, -1] = self.eos_token_id
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": torch.ones(shape, dtype=torch.long),
        }
        return config, inputs


class VisionTester(_Tester):
    """Image inputs (ViT, DINOv2, Swin)."""

    def __init__(self, parent, config_class, config_kwargs, *, image_size, patch_size, extra_tokens=1, **kw):
        num_patches = (image_size // patch_size) ** 2
        # as transformers' ViT tester: the masked-image-modeling inputs the sdpa test builds (bool_masked_pos)
        kw.setdefault("mask_length", num_patches)
        kw.setdefault("num_masks", num_patches // 2)
        super().__init__(
            parent,
            config_class,
            config_kwargs,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            seq_length=num_patches + extra_tokens,
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            **kw,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return config, {"pixel_values": pixel_values}
