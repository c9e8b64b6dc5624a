"""One rank of the 2-process DDP parity check (launched by tests/test_ddp.py with ``accelerate launch``).

Every part runs Highway-BP(k) for one step on a tiny float64 GPT-2 (dropout 0) under DDP with the gloo backend on
CPU, through Accelerate:

- "accelerate": ``Accelerator(cpu=True)``, the model patched with ``patch_model`` and then ``accelerator.prepare``-d
  (DDP), one forward on this rank's half of the batch, ``accelerator.backward``;
- "trainer": ``HighwayTrainer``, one optimizer step with SGD over 2 accumulated micro-batches per rank (the first
  under DDP's ``no_sync``) and a fidelity measurement, the gradients read by a callback just before the optimizer
  step. Its HighwayCallback patches the unwrapped model when training begins, after Accelerate wrapped it in DDP;
- "callback": the same step with a plain ``transformers.Trainer`` given ``callbacks=[HighwayCallback(config)]``.

Each part runs at k = 1 and k = L with the package's defaults (an exact step, k = L, runs the model's own backward)
and at k = L with the Highway engine at exact steps too ("engine"; below L both modes run the engine; the raw
Accelerate part also at k = 0 and 2). For each part the rank compares its gradients with (a) the other rank's and
(b) single-process Highway-BP(k) on the concatenated batch, computed here without any process group, and writes
``rank{r}.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_hwbp import (
    HighwayCallback,
    HighwayConfig,
    HighwayTrainer,
    HighwayTrainingArguments,
    UnsupportedDistributedSetupError,
    highway_state,
    is_patched,
    patch_model,
    patching,
    unwrap_model,
)

ROWS, LENGTH, N_LAYER = 4, 12, 4


@contextlib.contextmanager
def mode(name: str):
    """Patches made inside run exact steps (k >= L) by the model's own backward ("defaults", the package's default)
    or by the Highway engine ("engine")."""
    previous = patching.EXACT_STEPS_BY_AUTOGRAD
    patching.EXACT_STEPS_BY_AUTOGRAD = name == "defaults"
    try:
        yield
    finally:
        patching.EXACT_STEPS_BY_AUTOGRAD = previous


def cases(ks: tuple[int, ...]) -> list[tuple[int, str]]:
    """(k, mode) for each k with the defaults, and k = L with the engine at exact steps too."""
    return [(k, "defaults") for k in ks] + [(N_LAYER, "engine")]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16, n_positions=32, n_embd=24, n_layer=N_LAYER, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config).double()


def dataset() -> list[dict]:
    rows = []
    for i in range(ROWS):
        ids = [(3 * i + j * (i + 1)) % 16 for j in range(LENGTH)]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})  # position 0 is never a causal-LM target
    return rows


def tensors(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])


def reference_grads(k: int | None) -> dict[str, torch.Tensor]:
    """Single process, whole batch: Highway-BP(k) (k=None: exact backprop)."""
    model = tiny_gpt2()
    if k is not None:
        patch_model(model, k=k)
    model.train()
    ids, labels = tensors(dataset())
    model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in sorted(grads)])


def compare(grads: dict[str, torch.Tensor], k: int) -> dict:
    mine = flat(grads)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    highway, exact = flat(reference_grads(k)), flat(reference_grads(None))
    return {
        "max_abs_diff_between_ranks": max((g - mine).abs().max().item() for g in gathered),
        "rel_error_vs_single_process": ((mine - highway).norm() / highway.norm()).item(),
        "rel_error_vs_exact": ((mine - exact).norm() / exact.norm()).item(),
        "grad_norm": mine.norm().item(),
    }


def accelerate_part(k: int) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = patch_model(tiny_gpt2(), k=k)
    wrapped = accelerator.prepare(model)
    ids, labels = tensors(dataset()[rank * ROWS // world : (rank + 1) * ROWS // world])
    wrapped.train()
    loss = wrapped(input_ids=ids, labels=labels).loss
    accelerator.backward(loss)
    result = compare({n: p.grad for n, p in model.named_parameters()}, k)
    result["engine_ran"] = highway_state(model).recorded_forwards > 0
    result.update(
        distributed_type=str(accelerator.distributed_type),
        multi_cpu=accelerator.distributed_type == DistributedType.MULTI_CPU,
        backend=dist.get_backend(),
        wrapped_is_ddp=isinstance(wrapped, DistributedDataParallel),
        patched_inner=is_patched(wrapped) and unwrap_model(wrapped) is model,
        iterations=highway_state(model).last_iterations,
    )
    return result


class _Grads(TrainerCallback):
    """Gradients just before the optimizer step; whether the model was patched while training."""

    def __init__(self):
        self.grads = None
        self.patched_during_training = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.patched_during_training = is_patched(model)  # the HighwayCallback runs before this one

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _step_arguments(arguments_class, out: str, **extra):
    return arguments_class(
        output_dir=out,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        max_steps=1,
        per_device_train_batch_size=ROWS // 4,
        gradient_accumulation_steps=2,  # the first micro-batch runs under DDP's no_sync
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        **extra,
    )


def _trained(trainer, model, recorder, k: int) -> dict:
    trainer.train()
    wrapped = trainer.model_wrapped
    result = compare(recorder.grads, k)
    entries = [e for e in trainer.state.log_history if "loss" in e]
    result.update(
        patched_during_training=recorder.patched_during_training,
        unpatched_after=not is_patched(model),
        wrapped_is_ddp=isinstance(wrapped, DistributedDataParallel),
        wrapped_inner_is_model=unwrap_model(wrapped) is model and trainer.model is model,
        logged_k=[e.get("hwbp_k") for e in entries],
        logged_iterations=[e.get("hwbp_iterations") for e in entries],
        fidelity_cosine=[e.get("hwbp_fidelity/cosine") for e in entries],
        world_size=trainer.args.world_size,
    )
    return result


def trainer_part(k: int, out: str) -> dict:
    model = tiny_gpt2()
    recorder = _Grads()
    # fidelity: measured on the unwrapped model, it must not disturb DDP or the gradients
    args = _step_arguments(HighwayTrainingArguments, os.path.join(out, "trainer"), hwbp_k=k, hwbp_fidelity_steps=1)
    trainer = HighwayTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[recorder])
    return _trained(trainer, model, recorder, k)


def callback_part(k: int, out: str) -> dict:
    model = tiny_gpt2()
    recorder = _Grads()
    args = _step_arguments(TrainingArguments, os.path.join(out, "callback"))
    callbacks = [HighwayCallback(HighwayConfig(k=k)), recorder]
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    return _trained(trainer, model, recorder, k)


def refusal_part(k: int, out: str) -> dict:
    """Under FSDP from `accelerate launch` (refused): the error raised when the Trainer is built."""
    args = _step_arguments(TrainingArguments, os.path.join(out, "refused"))
    try:
        Trainer(model=tiny_gpt2(), args=args, train_dataset=dataset(), callbacks=[HighwayCallback(HighwayConfig(k=k))])
    except UnsupportedDistributedSetupError as err:
        return {"error": type(err).__name__, "message": str(err)}
    return {"error": None, "message": ""}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--mode", choices=["parity", "refusal"], default="parity")
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.mode == "refusal":
        with open(os.path.join(options.out, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(refusal_part(options.k, options.out), f)
        return 0
    results: dict[str, dict] = {"accelerate": {}, "trainer": {}, "callback": {}}
    for k, mode_name in cases((0, options.k, 2, N_LAYER)):
        with mode(mode_name):
            results["accelerate"][f"mode={mode_name},k={k}"] = accelerate_part(k)
    for k, mode_name in cases((options.k, N_LAYER)):
        with mode(mode_name):
            folder = os.path.join(options.out, f"{mode_name}-{k}")
            results["trainer"][f"mode={mode_name},k={k}"] = trainer_part(k, folder)
            results["callback"][f"mode={mode_name},k={k}"] = callback_part(k, folder)
    rank = dist.get_rank()
    with open(os.path.join(options.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
