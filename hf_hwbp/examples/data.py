"""The embedded default corpus and tokenizer: runs on a fresh machine with no downloads.

The text is the Python reference manual that every CPython ships (``pydoc_data.topics``: real English
prose and code, about 465k characters). The tokenizer is a byte-level BPE trained on that text on the
spot with ``tokenizers`` (a second or two), wrapped as a ``PreTrainedTokenizerFast``; it ends every text it
encodes with the end-of-text token, so documents stay separated when run_clm's ``group_texts`` concatenates them.
"""

from __future__ import annotations

import hashlib

import datasets
import torch
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"


def reference_manual_documents() -> list[str]:
    """The topics of the Python reference manual, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def split_documents(documents: list[str], validation_fraction: float = 0.1, seed: str = "hwbp") -> tuple[list, list]:
    """A deterministic train/validation split by document (hash of the text), independent of Python's hash seed."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    train, validation = [], []
    for doc in documents:
        digest = hashlib.sha256((seed + doc[:200]).encode()).digest()
        (validation if digest[0] / 256 < validation_fraction else train).append(doc)
    if not validation:
        validation.append(train.pop())
    return train, validation


def reference_manual_datasets(validation_fraction: float = 0.1) -> datasets.DatasetDict:
    """The embedded corpus as ``train`` / ``validation`` datasets of documents (a ``"text"`` column).

    The same shape as ``load_dataset("text", ...)`` gives for files, so it goes through run_clm's tokenize and
    ``group_texts`` steps like any other data.
    """
    train, validation = split_documents(reference_manual_documents(), validation_fraction)
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "validation": datasets.Dataset.from_dict({"text": validation}),
        }
    )


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts and size).

    Encoding with special tokens (the default) ends every text with the end-of-text token.
    """
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + special tokens), got {vocab_size}.")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN], show_progress=False
    )
    eos_id = bpe.token_to_id(EOS_TOKEN)
    bpe._tokenizer.post_processor = TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def tokenize_to_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by the end-of-text token."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def chunk_stream(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """Non-overlapping blocks of ``block_size`` tokens (the remainder is dropped), as run_clm's group_texts."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    n = (len(stream) // block_size) * block_size
    if n == 0:
        raise ValueError(f"The corpus has {len(stream)} tokens, fewer than block_size={block_size}.")
    return stream[:n].view(-1, block_size)


def reference_manual_lm_data(
    block_size: int = 128, vocab_size: int = 2048, validation_fraction: float = 0.1
) -> tuple[PreTrainedTokenizerFast, torch.Tensor, torch.Tensor]:
    """(tokenizer, train blocks, validation blocks) of the embedded corpus for causal-LM training."""
    train_docs, val_docs = split_documents(reference_manual_documents(), validation_fraction)
    tokenizer = train_bpe_tokenizer(train_docs, vocab_size)
    train = chunk_stream(tokenize_to_stream(tokenizer, train_docs), block_size)
    validation = chunk_stream(tokenize_to_stream(tokenizer, val_docs), block_size)
    return tokenizer, train, validation
