"""One rank of the 2-process FSDP2 parity checks (launched by tests/test_fsdp.py with ``accelerate launch`` and an
FSDP2 config; CPU, gloo).

Every case runs Highway-BP(k) on a tiny GPT-2 whose blocks and root are ``fully_shard``-ed, each rank on its own
half of the batch, gathers the sharded gradients (``DTensor.full_tensor()``) and compares them with single-process
``patch_model`` gradients on the whole batch, computed here without any process group:

- "raw": ``fully_shard`` by hand, float64, k = 0, 1, 2 and k = L (exact), ``reshard_after_forward`` True and False,
  ``patch_model`` before and after sharding, two steps each (the second reuses FSDP's unsharded parameters);
  gradient accumulation (two micro-batches per rank, the first without gradient sync); LoRA; a mixed-precision
  policy (bf16 parameters, fp32 reduce) against FSDP2 backprop under the same policy as the yardstick;
- "accelerate": ``Accelerator`` with an FSDP2 plugin, the model patched before ``prepare`` shards it;
- "trainer" / "callback": ``HighwayTrainer``, and a ``Trainer`` with ``HighwayCallback``, one optimizer step over
  2 accumulated micro-batches per rank, gradients read just before the optimizer step.

Accelerate turns FSDP on only for accelerator devices (on CPU it falls back to MULTI_CPU, i.e. DDP), so the worker
switches an initialized CPU state to FSDP with the plugin the launch config describes (``force_fsdp2_on_cpu``):
Accelerate's own FSDP2 code (``fsdp2_prepare_model``, the Trainer's FSDP handling) then runs on gloo.

With ``--mode deepspeed`` (launched as a DDP job; needs the ``deepspeed`` package) it runs DeepSpeed ZeRO-1 and
ZeRO-2 instead (``deepspeed.initialize``, float32: DeepSpeed's CPU path), k = 1 and k = L, against the same
single-process reference, and checks that ZeRO-3 is refused.

Writes ``rank{r}.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_hwbp import (
    HighwayCallback,
    HighwayConfig,
    HighwayTrainer,
    HighwayTrainingArguments,
    highway_state,
    is_patched,
    patch_model,
)
from hf_hwbp import fsdp as hw_fsdp

ROWS, LENGTH, N_LAYER = 4, 8, 3


def tiny_gpt2(dtype=torch.float64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=16, n_positions=16, n_embd=16, n_layer=N_LAYER, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config).to(dtype)


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0))
    for name, param in model.named_parameters():  # LoRA's B starts at 0: make its gradient path non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def dataset() -> list[dict]:
    rows = []
    for i in range(ROWS):
        ids = [(3 * i + j * (i + 1)) % 16 for j in range(LENGTH)]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def tensors(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([r["input_ids"] for r in rows]), torch.tensor([r["labels"] for r in rows])


def my_rows() -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    return dataset()[rank * ROWS // world : (rank + 1) * ROWS // world]


def reference(k: int | None, *, use_lora: bool = False, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Single process, whole batch: Highway-BP(k) (None: backprop), trainable parameters only."""
    model = tiny_gpt2(dtype)
    if use_lora:
        model = lora(model)
    if k is not None:
        patch_model(model, k=k)
    model.train()
    ids, labels = tensors(dataset())
    model(input_ids=ids, labels=labels).loss.backward()
    return {_name(n): p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def _name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


def gathered(model) -> dict[str, torch.Tensor]:
    """Full gradients of the trainable parameters (a collective: every rank calls it in the same order)."""
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        grad = param.grad
        if grad is None:
            grad = torch.zeros(param.shape, dtype=torch.float64)
        elif hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        out[_name(name)] = grad.detach().double()
    return out


def rel_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert sorted(grads) == sorted(ref), (sorted(grads), sorted(ref))
    mine = torch.cat([grads[n].reshape(-1) for n in sorted(ref)])
    theirs = torch.cat([ref[n].reshape(-1) for n in sorted(ref)])
    return ((mine - theirs).norm() / theirs.norm()).item()


def shard(model, reshard_after_forward: bool, mp_policy: MixedPrecisionPolicy | None = None):
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.transformer.h if hasattr(model, "transformer") else model.base_model.model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def step(model, micro_batches: int = 1) -> None:
    rows = my_rows()
    size = len(rows) // micro_batches
    for m in range(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(m == micro_batches - 1)
        ids, labels = tensors(rows[m * size : (m + 1) * size])
        (model(input_ids=ids, labels=labels).loss / micro_batches).backward()


def sharded_highway(k: int, *, patch_first: bool, raf: bool, use_lora: bool = False, mp=None, dtype=torch.float64):
    model = tiny_gpt2(dtype)
    if use_lora:
        model = lora(model)
    if patch_first:
        patch_model(model, k=k)
        shard(model, raf, mp)
    else:
        shard(model, raf, mp)
        patch_model(model, k=k)
    hw_fsdp.attach(model)
    model.train()
    return model


def raw_part() -> dict:
    results: dict[str, dict] = {}
    refs = {k: reference(k) for k in (0, 1, 2, N_LAYER)}
    exact = reference(None)
    for patch_first in (False, True):
        for raf in (True, False):
            for k in (0, 1, 2, N_LAYER):
                model = sharded_highway(k, patch_first=patch_first, raf=raf)
                errors = []
                for _ in range(2):
                    model.zero_grad(set_to_none=True)
                    step(model)
                    grads = gathered(model)
                    errors.append(rel_error(grads, refs[k]))
                results[f"patch_first={patch_first},raf={raf},k={k}"] = {
                    "rel_error": max(errors),
                    "rel_error_vs_exact": rel_error(grads, exact),
                    "iterations": highway_state(model).last_iterations,
                    "param_type": type(next(model.parameters())).__name__,
                }
    # gradient accumulation: two micro-batches per rank, the first without gradient sync
    model = sharded_highway(1, patch_first=False, raf=True)
    step(model, micro_batches=2)
    results["accumulation,k=1"] = {"rel_error": rel_error(gathered(model), refs[1])}
    # LoRA: only the adapters train; the sharded base weights are frozen
    model = sharded_highway(1, patch_first=False, raf=True, use_lora=True)
    step(model)
    lora_ref = reference(1, use_lora=True)
    results["lora,k=1"] = {
        "rel_error": rel_error(gathered(model), lora_ref),
        "rel_error_vs_exact": rel_error(gathered(model), reference(None, use_lora=True)),
        "trainable": sum(1 for p in model.parameters() if p.requires_grad),
    }
    # mixed precision: bf16 parameters, fp32 reduce; FSDP2 backprop under the same policy is the yardstick
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = sharded_highway(1, patch_first=False, raf=True, mp=policy, dtype=torch.float32)
    step(model)
    highway_mp = gathered(model)
    baseline = shard(tiny_gpt2(torch.float32), True, policy)
    baseline.train()
    step(baseline)
    backprop_mp = gathered(baseline)
    results["mixed_precision,k=1"] = {
        "rel_error": rel_error(highway_mp, refs[1]),
        "backprop_rel_error": rel_error(backprop_mp, exact),
        "grad_dtype": str(next(model.parameters()).grad.dtype),
    }
    return results


def force_fsdp2_on_cpu() -> None:
    """Make the initialized (MULTI_CPU) Accelerate state an FSDP2 one, with the launch config's settings."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )


class _OnCPU:
    """Trainer mixin: the Trainer's Accelerator runs FSDP2 on CPU (see ``force_fsdp2_on_cpu``)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        force_fsdp2_on_cpu()
        self.is_fsdp_enabled = True

    def train(self, *args, **kwargs):
        force_fsdp2_on_cpu()  # building the Trainer re-created the state (TrainingArguments' device set-up)
        return super().train(*args, **kwargs)


class FSDPTrainer(_OnCPU, Trainer):
    pass


class FSDPHighwayTrainer(_OnCPU, HighwayTrainer):
    pass


def accelerate_part(k: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    force_fsdp2_on_cpu()
    model = patch_model(tiny_gpt2(), k=k)  # patched before Accelerate shards it
    model = accelerator.prepare(model)
    hw_fsdp.attach(model)
    model.train()
    ids, labels = tensors(my_rows())
    accelerator.backward(model(input_ids=ids, labels=labels).loss)
    grads = gathered(model)
    return {
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
        "is_fsdp2": hw_fsdp.is_fsdp2(model),
        "rel_error": rel_error(grads, reference(k)),
        "rel_error_vs_exact": rel_error(grads, reference(None)),
        "iterations": highway_state(model).last_iterations,
    }


class _Grads(TrainerCallback):
    def __init__(self):
        self.grads = None
        self.patched = False
        self.attached = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.patched = is_patched(model)
        self.attached = hw_fsdp.is_attached(model)
        self.grads = gathered(model)


def _arguments(arguments_class, out: str, **extra):
    return arguments_class(
        output_dir=out,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        max_steps=1,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=0.1,
        max_grad_norm=0.0,
        **extra,
    )


def trainer_parts(k: int, out: str) -> dict:
    results = {}
    for part in ("trainer", "callback"):
        model = tiny_gpt2()
        recorder = _Grads()
        if part == "trainer":
            args = _arguments(HighwayTrainingArguments, os.path.join(out, part), hwbp_k=k)
            trainer = FSDPHighwayTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[recorder])
        else:
            args = _arguments(TrainingArguments, os.path.join(out, part))
            callbacks = [HighwayCallback(HighwayConfig(k=k)), recorder]
            trainer = FSDPTrainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
        trainer.train()
        entries = [e for e in trainer.state.log_history if "loss" in e]
        results[part] = {
            "rel_error": rel_error(recorder.grads, reference(k)),
            "rel_error_vs_exact": rel_error(recorder.grads, reference(None)),
            "patched": recorder.patched,
            "attached": recorder.attached,
            "is_fsdp2": hw_fsdp.is_fsdp2(trainer.model_wrapped),
            "unpatched_after": not is_patched(model),
            "logged_iterations": [e.get("hwbp_iterations") for e in entries],
        }
    return results


def deepspeed_part() -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from hf_hwbp import UnsupportedDistributedSetupError, check_distributed_support

    results = {}
    for stage in (1, 2, 3):
        for k in (1, N_LAYER) if stage < 3 else (1,):
            model = patch_model(tiny_gpt2(torch.float32), k=k)
            config = {
                "train_micro_batch_size_per_gpu": ROWS // 2,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage},
                "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                "zero_allow_untested_optimizer": True,
            }
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            if stage == 3:
                try:
                    check_distributed_support(engine)
                except UnsupportedDistributedSetupError as err:
                    results["zero3"] = {"error": type(err).__name__, "message": str(err)}
                else:
                    results["zero3"] = {"error": None, "message": ""}
                continue
            check_distributed_support(engine)  # ZeRO-1/2: supported
            engine.train()
            ids, labels = tensors(my_rows())
            engine.backward(engine(input_ids=ids, labels=labels).loss)
            grads = {_name(n): safe_get_full_grad(p).double() for n, p in engine.module.named_parameters()}
            results[f"zero{stage},k={k}"] = {
                "rel_error": rel_error(grads, reference(k, dtype=torch.float32)),
                "rel_error_vs_exact": rel_error(grads, reference(None, dtype=torch.float32)),
                "iterations": highway_state(engine.module).last_iterations,
            }
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--mode", choices=["fsdp", "deepspeed"], default="fsdp")
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        results = deepspeed_part()
    else:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        results = {"raw": raw_part(), "accelerate": accelerate_part(options.k)}
        results.update(trainer_parts(options.k, options.out))
    with open(os.path.join(options.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
