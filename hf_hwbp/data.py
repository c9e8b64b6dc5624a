"""Old import path of :mod:`hf_hwbp.examples.data` (the embedded default corpus and tokenizer), kept working."""

from .examples.data import (
    EOS_TOKEN,
    chunk_stream,
    reference_manual_datasets,
    reference_manual_documents,
    reference_manual_lm_data,
    split_documents,
    tokenize_to_stream,
    train_bpe_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "chunk_stream",
    "reference_manual_datasets",
    "reference_manual_documents",
    "reference_manual_lm_data",
    "split_documents",
    "tokenize_to_stream",
    "train_bpe_tokenizer",
]
