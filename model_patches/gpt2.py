"""GPT-2 (GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification, ...): blocks in ``transformer.h``."""

from .base import StackAdapter

GPT2_ADAPTER = StackAdapter(name="GPT-2", stack_paths=("transformer.h", "h"))
