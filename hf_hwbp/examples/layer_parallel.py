"""``--layer_parallel`` of run_clm_hwbp.py: a thin call into ``hf_hwbp.parallel.train_layer_parallel``.

It trains outside the Trainer (one pipeline stage per process under ``torchrun``), then evaluates the gathered
model and saves it on rank 0 like the Trainer would (model, tokenizer, ``all_results.json``).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from transformers import default_data_collator, set_seed


def run_layer_parallel(model, tokenizer, training_args, train_dataset, eval_dataset) -> dict[str, float]:
    """Train ``model`` layer-parallel with the Trainer arguments that apply; evaluate and save on rank 0."""
    import torch.distributed as dist

    from ..parallel import train_layer_parallel

    highway = training_args.use_highway_bp
    config = training_args.highway_config
    if highway and not isinstance(config.k, int):
        raise ValueError("--layer_parallel needs an integer --hwbp_k (not 'auto').")
    if train_dataset is None:
        raise ValueError("--layer_parallel trains: it needs --do_train and a train dataset.")
    steps = training_args.max_steps
    if steps <= 0:
        steps = math.ceil(
            len(train_dataset) / training_args.per_device_train_batch_size * training_args.num_train_epochs
        )
    set_seed(training_args.seed)
    generator = torch.Generator().manual_seed(training_args.seed)  # the same batches on every rank
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=training_args.per_device_train_batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=default_data_collator,
        drop_last=True,
    )

    def batches():
        while True:
            yield from loader

    warmup = training_args.get_warmup_steps(steps)

    def lr_lambda(step: int) -> float:  # linear warmup, then cosine decay to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    start = time.perf_counter()
    losses = train_layer_parallel(
        model,
        batches(),
        k=config.k if highway else 0,
        group_size=config.group_size,
        steps=steps,
        lr=training_args.learning_rate,
        method="highway" if highway else "backprop",
        weight_decay=training_args.weight_decay,
        max_grad_norm=training_args.max_grad_norm or None,
        lr_lambda=lr_lambda,
        seed=training_args.seed,
        log_every=training_args.logging_steps if training_args.logging_steps >= 1 else 0,
        sync_model=True,
        device="cpu" if training_args.use_cpu or not torch.cuda.is_available() else None,
    )
    seconds = time.perf_counter() - start
    metrics = {
        "train_loss": float(np.mean(losses[-max(1, len(losses) // 10) :])),
        "train_steps": len(losses),
        "seconds_per_step": seconds / max(1, len(losses)),
        "stages": dist.get_world_size(),
    }
    if eval_dataset is not None:
        model.eval()
        eval_loader = torch.utils.data.DataLoader(
            eval_dataset, batch_size=training_args.per_device_eval_batch_size, collate_fn=default_data_collator
        )
        device = next(model.parameters()).device
        with torch.no_grad():
            eval_losses = [model(**{k: v.to(device) for k, v in b.items()}).loss.item() for b in eval_loader]
        metrics["eval_loss"] = float(np.mean(eval_losses))
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
    if dist.get_rank() == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        model.save_pretrained(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as f:
            json.dump({**metrics, "train_losses": losses}, f, indent=2)
        method = f"highway k={config.k}" if highway else "backprop"
        print(
            f"[layer-parallel {method}, {metrics['stages']} stages] "
            + (
                f"validation loss {metrics['eval_loss']:.4f}, perplexity {metrics['perplexity']:.2f}, "
                if "eval_loss" in metrics
                else ""
            )
            + f"{metrics['seconds_per_step']:.3f} s/step"
        )
    return metrics


__all__ = ["run_layer_parallel"]
