"""train_layer_parallel: a plain training loop over layer-parallel stages, for scripts launched by torchrun."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .runner import LayerParallelHighway


def init_distributed(device: torch.device | str | None = None) -> torch.device:
    """Initialize the default process group from torchrun's environment if needed; return this rank's device.

    Backend: NCCL when ``device`` is CUDA (default: CUDA when available), gloo otherwise.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError(
                "train_layer_parallel runs one stage per process: launch it with "
                "`torchrun --nproc_per_node <stages> script.py ...` (or initialize torch.distributed yourself)."
            )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _unpack(batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None), None
    return batch, None, None


def _clip_grad_norm(runner: LayerParallelHighway, max_norm: float) -> float:
    """Clip the global gradient norm over all stages (a tied parameter counted once)."""
    params = [p for p in runner.parameters() if p.grad is not None]
    tied = {id(p) for p in runner.stage.tied} if runner.stage.is_last else set()
    sq = torch.zeros(1, dtype=torch.float64, device=runner.stage.device)
    for p in params:
        if id(p) not in tied:
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq, group=runner.comm.group)
    total = float(sq.sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.mul_(scale)
    return total


def train_layer_parallel(
    model_config_or_model,
    batches: Iterable,
    *,
    k: int = 2,
    group_size: int | str = 1,
    steps: int,
    lr: float,
    method: str = "highway",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    lr_lambda: Callable[[int], float] | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    scan: str = "chain",
    tol: float | None = None,
    microbatches: int = 1,
    log_every: int = 0,
    process_group: dist.ProcessGroup | None = None,
    sync_model: bool = False,
) -> list[float]:
    """Train a causal LM with one pipeline stage per process; return the per-step training losses.

    Run it on every rank (``torchrun --nproc_per_node S``); the process group is initialized from torchrun's
    environment when needed (gloo on CPU, NCCL on CUDA). Each rank holds one stage (see
    :class:`LayerParallelHighway`) and an AdamW optimizer over its parameters.

    Args:
        model_config_or_model: a GPT-2 / Llama ``PretrainedConfig`` (the model is built with ``seed`` on every
            rank) or a model that is identical on every rank (same seed or checkpoint).
        batches: an iterable giving the same batches on every rank (e.g. a DataLoader with a seeded generator,
            no DistributedSampler: the stages split the model, not the data): dicts with ``input_ids`` (and
            optionally ``labels``, ``attention_mask``), ``(input_ids, labels)`` tuples or bare ``input_ids``.
        k, group_size, method, scan, tol, microbatches: see :class:`LayerParallelHighway`
            (``method="backprop"`` trains with ordinary pipeline backprop).
        steps: optimizer steps (fewer if ``batches`` runs out).
        lr, weight_decay: AdamW settings. ``lr_lambda``: optional multiplier of ``lr`` per step (LambdaLR).
        max_grad_norm: optional clipping of the global gradient norm (over all stages).
        dtype, device: where and in which precision to train (default: the model's dtype, CUDA if available).
        log_every: print the loss from the last rank every this many steps (0: never).
        process_group: the group whose ranks are the stages (default: the world).
        sync_model: when a model is passed, copy every stage's trained weights into it on every rank at the end
            (so the caller can evaluate, generate or ``save_pretrained`` the whole trained model).

    Returns:
        The loss of every step, on every rank (sent from the last rank once, at the end).
    """
    device = init_distributed(device)
    if isinstance(model_config_or_model, nn.Module):
        model = model_config_or_model
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config_or_model)
    model.to(device=device, dtype=dtype).train()
    runner = LayerParallelHighway(
        model,
        k=k,
        group_size=group_size,
        method=method,
        scan=scan,
        tol=tol,
        microbatches=microbatches,
        process_group=process_group,
    )
    full_model = model if sync_model else None
    del model  # this function keeps only its stage (the caller may still hold the full model)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    losses: list[float] = []
    for step, batch in zip(range(steps), batches):
        input_ids, labels, attention_mask = _unpack(batch)
        runner.zero_grad()
        loss = runner.step(input_ids, labels, attention_mask)
        if max_grad_norm is not None:
            _clip_grad_norm(runner, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss) if loss is not None else float("nan"))
        if log_every and runner.is_last and (step + 1) % log_every == 0:
            print(f"[layer-parallel {method} k={k}] step {step + 1}: loss {losses[-1]:.4f}", flush=True)
    if full_model is not None:
        gather_trained_weights(full_model, runner, process_group)
    result = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.broadcast(result, group=process_group, group_src=runner.stage.num_stages - 1)
    return result.tolist()


def gather_trained_weights(model: nn.Module, runner: LayerParallelHighway, group: dist.ProcessGroup | None) -> None:
    """Copy each stage's parameters (held by its own rank) into ``model`` on every rank."""
    own = {id(p) for p in runner.parameters()}
    mine = {name: p.detach().cpu() for name, p in model.named_parameters() if id(p) in own}
    gathered: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    merged: dict[str, Tensor] = {}
    for part in gathered:
        merged.update(part)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in merged:
                p.copy_(merged[name].to(p.device))
