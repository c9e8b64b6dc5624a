"""Shared helpers of benchmarks/bench_fidelity.py and benchmarks/bench_training.py.

Small models built from configs (random init, no hub), the two offline data sets (the embedded Python
reference manual for language models, scikit-learn's 8x8 digits upsampled to 16x16 for ViT), the learning-rate
schedule, and the machine note written next to every result.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL_NAMES = ("gpt2", "llama", "vit")


# ----- machine -----------------------------------------------------------------------------------------------
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        return "n/a"


def machine_note(threads: int) -> dict:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "uptime": uptime(),
    }


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line, written with a single O_APPEND write (safe with several runs appending to one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a killed run
                pass
    return rows


# ----- data --------------------------------------------------------------------------------------------------
_LM_CACHE: dict = {}


def lm_data(block_size: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train blocks [N, T], validation blocks [M, T], vocab size) of the embedded corpus."""
    key = (block_size, vocab_size)
    if key not in _LM_CACHE:
        from hf_hwbp.examples.data import reference_manual_lm_data

        tokenizer, train, val = reference_manual_lm_data(block_size=block_size, vocab_size=vocab_size)
        _LM_CACHE[key] = (train, val, len(tokenizer))
    return _LM_CACHE[key]


def digits_data(image_size: int = 16, val_fraction: float = 0.2, split_seed: int = 0):
    """Digits (8x8 -> image_size x image_size, 1 channel, standardized): (x_train, y_train, x_val, y_val).

    A fixed stratified split (independent of the training seed); standardization uses train statistics.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        list(range(len(y))), test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    x_train, y_train, x_val, y_val = x[idx_train], y[idx_train], x[idx_val], y[idx_val]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val


# ----- models ------------------------------------------------------------------------------------------------
def build_model(
    name: str,
    depth: int,
    hidden: int = 64,
    heads: int = 4,
    vocab_size: int = 2048,
    block_size: int = 64,
    image_size: int = 16,
    patch_size: int = 4,
    num_labels: int = 10,
    dropout: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small randomly initialized transformers model (train mode), built from a config with ``seed``."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=hidden,
            n_layer=depth,
            n_head=heads,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        model = tf.GPT2LMHeadModel(config)
    elif name == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 8 * 8 or hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=block_size,
            attention_dropout=dropout,
            tie_word_embeddings=False,
        )
        model = tf.LlamaForCausalLM(config)
    elif name == "vit":
        config = tf.ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=1,
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=hidden * 4,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            num_labels=num_labels,
        )
        model = tf.ViTForImageClassification(config)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    model.config.use_cache = False
    return model.to(dtype).train()


def loss_of(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The training loss of a batch: (input_ids, labels) for causal LMs, (pixel_values, labels) for ViT."""
    inputs, labels = batch
    if inputs.is_floating_point():
        return model(pixel_values=inputs, labels=labels).loss
    return model(input_ids=inputs, labels=labels).loss


# ----- optimization ------------------------------------------------------------------------------------------
def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_order(num_items: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The index batches of ``steps`` steps: epochs of a seeded permutation (same for every method)."""
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    perm = torch.randperm(num_items, generator=gen)
    pos = 0
    while len(batches) < steps:
        if pos + batch_size > num_items:
            perm, pos = torch.randperm(num_items, generator=gen), 0
        batches.append(perm[pos : pos + batch_size])
        pos += batch_size
    return batches


# ----- background runs ---------------------------------------------------------------------------------------
BACKGROUND_PIDS = Path("/tmp/hwbp_background.pids")


def register_background(path: Path = BACKGROUND_PIDS) -> None:
    """List this process in ``path`` (timing jobs pause the processes listed there) and unlist it at exit."""
    import atexit
    import fcntl
    import signal
    import sys

    pid = str(os.getpid())

    def edit(add: bool) -> None:
        with open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            lines = [line.strip() for line in f.read().splitlines() if line.strip() and line.strip() != pid]
            if add:
                lines.append(pid)
            f.seek(0)
            f.truncate()
            f.write("".join(line + "\n" for line in lines))

    edit(True)
    atexit.register(edit, False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the atexit hook on `kill` too


# ----- runs and summaries ----------------------------------------------------------------------------------------
def start_runs(output_dir: Path, threads: int, script: str, argv: list[str] | None, background: bool) -> set:
    """What every training benchmark does before its runs: list itself as a background job if asked, set the
    threads, silence transformers, record the machine in ``machine.jsonl``; returns the (task, method, seed) keys
    already in ``runs.jsonl`` (for ``--resume``)."""
    import sys

    from transformers.utils import logging as hf_logging

    if background:
        register_background()
    set_threads(threads)
    hf_logging.set_verbosity_error()
    note = machine_note(threads) | {"argv": sys.argv if argv is None else [script, *argv]}
    append_jsonl(output_dir / "machine.jsonl", note)
    print(json.dumps(note), flush=True)
    return {(r["task"], r["method"], r["seed"]) for r in read_jsonl(output_dir / "runs.jsonl")}


def spread(values: list[float | None]) -> dict:
    """Mean, standard deviation, min, max and count of the values that are not None."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }
