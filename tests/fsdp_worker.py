"""One rank of the 2-process FSDP2 checks (launched by tests/test_fsdp.py with ``accelerate launch`` and an FSDP2
config; CPU, gloo).

Every case trains a tiny float64 GPT-2 whose blocks and root are ``fully_shard``-ed, each rank on its own half of
the batch, gathers the sharded gradients (``DTensor.full_tensor()``) and compares them with single-process
``patch_model`` gradients on the whole batch, computed here without any process group. No case calls
``hf_hwbp.fsdp.attach``: the patched model connects itself at its first training forward. Each case runs at
k = 0, 1, 2 and L with the package's defaults (exact steps by the model's own backward) and at k = L with the
Highway engine at exact steps too ("engine"; below L the two modes run the same code):

- "raw": ``fully_shard`` by hand, ``patch_model`` before and after sharding, ``reshard_after_forward`` True and
  False, both lifecycles ("per_block", the default, and "keep_gathered"; the default set-up for two steps: the
  second reuses FSDP's unsharded parameters), with what the lifecycle did in the last step (all-gathers, reduces,
  groups gathered at once); gradient accumulation (two micro-batches per rank, the first without gradient sync);
  two forwards before one backward; LoRA; a mixed-precision policy (bf16 parameters, fp32 reduce) against FSDP2
  backprop under the same policy as the yardstick; a block split over units (attention and MLP sharded apart, the
  layer norms in the root's unit);
- "refused": set-ups that cannot run raise ``HighwayBPError`` before any gradient (a missing root ``fully_shard``,
  ``attach`` on an unpatched or an unsharded model);
- "accelerate": ``Accelerator`` with an FSDP2 plugin, the model patched before or after ``prepare`` shards it;
- "trainer" / "callback": ``HighwayTrainer``, and a ``Trainer`` with ``HighwayCallback``, one optimizer step over
  2 accumulated micro-batches per rank, gradients read just before the optimizer step;
- "not_in_effect": a Trainer asked for FSDP on CPU runs DDP, and says so once.

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
import contextlib
import io
import json
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from hf_hwbp import (
    HighwayBPError,
    HighwayCallback,
    HighwayConfig,
    HighwayTrainer,
    HighwayTrainingArguments,
    highway_state,
    is_patched,
    patch_model,
    patching,
)
from hf_hwbp import fsdp as hw_fsdp

ROWS, LENGTH, N_LAYER = 4, 8, 3
# (k, mode): the package's defaults at every k; the Highway engine at exact steps too at k = L (below L both modes
# run the engine)
CASES = [(0, "defaults"), (1, "defaults"), (2, "defaults"), (N_LAYER, "defaults"), (N_LAYER, "engine")]


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


_REFERENCES: dict = {}


def reference(k: int | None, *, use_lora: bool = False, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Single process, whole batch: Highway-BP(k) (None: backprop), trainable parameters only."""
    key = (k, use_lora, dtype)
    if key not in _REFERENCES:
        model = tiny_gpt2(dtype)
        if use_lora:
            model = lora(model)
        if k is not None:
            patch_model(model, k=k)
        model.train()
        ids, labels = tensors(dataset())
        model(input_ids=ids, labels=labels).loss.backward()
        grads = {_name(n): p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
        _REFERENCES[key] = grads
    return _REFERENCES[key]


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


def blocks_of(model):
    return model.transformer.h if hasattr(model, "transformer") else model.base_model.model.transformer.h


def shard(model, reshard_after_forward: bool = True, mp_policy: MixedPrecisionPolicy | None = None, split=False):
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks_of(model):
        if split:  # attention and MLP apart; the layer norms stay in the root's unit
            fully_shard(block.attn, **kwargs)
            fully_shard(block.mlp, **kwargs)
        else:
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


def sharded_highway(k: int, *, patch_first: bool, raf: bool = True, lifecycle: str | None = None, **shard_kwargs):
    use_lora = shard_kwargs.pop("use_lora", False)
    model = tiny_gpt2(shard_kwargs.pop("dtype", torch.float64))
    if use_lora:
        model = lora(model)
    if lifecycle is not None:
        hw_fsdp.set_lifecycle(model, lifecycle)
    if patch_first:
        patch_model(model, k=k)
        shard(model, raf, **shard_kwargs)
    else:
        shard(model, raf, **shard_kwargs)
        patch_model(model, k=k)
    model.train()
    return model


def lifecycle_stats(model) -> dict | None:
    lifecycle = highway_state(model).lifecycle
    stats = getattr(lifecycle, "stats", None)
    return None if stats is None else dict(vars(stats))


def reset_stats(model) -> None:
    stats = getattr(highway_state(model).lifecycle, "stats", None)
    if stats is not None:
        stats.reset()


def raw_case(k: int, mode_name: str, steps: int = 1, **kwargs) -> dict:
    with mode(mode_name):
        model = sharded_highway(k, **kwargs)
        errors = []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            reset_stats(model)
            step(model)
            grads = gathered(model)
            errors.append(rel_error(grads, reference(k)))
    return {
        "rel_error": max(errors),
        "rel_error_vs_exact": rel_error(grads, reference(None)),
        "iterations": highway_state(model).last_iterations,
        "param_type": type(next(model.parameters())).__name__,
        "attached": hw_fsdp.is_attached(model),
        "stats": lifecycle_stats(model),
    }


def raw_part() -> dict:
    results: dict[str, dict] = {}
    for patch_first in (False, True):
        for raf, lifecycle in [(True, "per_block"), (True, "keep_gathered"), (False, "per_block")]:
            for k, mode_name in CASES:
                name = f"patch_first={patch_first},raf={raf},lifecycle={lifecycle},mode={mode_name},k={k}"
                # the default set-up runs two steps (the second reuses FSDP's unsharded parameters)
                steps = 2 if raf and lifecycle == "per_block" else 1
                results[name] = raw_case(k, mode_name, steps, patch_first=patch_first, raf=raf, lifecycle=lifecycle)
    # gradient accumulation: two micro-batches per rank, the first without gradient sync
    for raf in (True, False):
        for lifecycle in hw_fsdp.LIFECYCLES:
            model = sharded_highway(1, patch_first=False, raf=raf, lifecycle=lifecycle)
            step(model, micro_batches=2)
            results[f"accumulation,raf={raf},lifecycle={lifecycle},k=1"] = {
                "rel_error": rel_error(gathered(model), reference(1))
            }
    # two forwards (one row each) before one backward: two records of the stack wait for it
    model = sharded_highway(1, patch_first=False)
    reset_stats(model)
    ids, labels = tensors(my_rows())
    losses = [model(input_ids=ids[r : r + 1], labels=labels[r : r + 1]).loss for r in range(len(ids))]
    (sum(losses) / len(losses)).backward()
    results["two_forwards,k=1"] = {
        "rel_error": rel_error(gathered(model), reference(1)),
        "stats": lifecycle_stats(model),
    }
    # LoRA: only the adapters train; the sharded base weights are frozen
    model = sharded_highway(1, patch_first=False, use_lora=True)
    step(model)
    results["lora,k=1"] = {
        "rel_error": rel_error(gathered(model), reference(1, use_lora=True)),
        "rel_error_vs_exact": rel_error(gathered(model), reference(None, use_lora=True)),
        "trainable": sum(1 for p in model.parameters() if p.requires_grad),
    }
    # mixed precision: bf16 parameters, fp32 reduce; FSDP2 backprop under the same policy is the yardstick
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = sharded_highway(1, patch_first=False, mp_policy=policy, dtype=torch.float32)
    step(model)
    highway_mp = gathered(model)
    baseline = shard(tiny_gpt2(torch.float32), True, policy)
    baseline.train()
    step(baseline)
    results["mixed_precision,k=1"] = {
        "rel_error": rel_error(highway_mp, reference(1)),
        "backprop_rel_error": rel_error(gathered(baseline), reference(None)),
        "grad_dtype": str(next(model.parameters()).grad.dtype),
    }
    # a block split over units: attention and MLP sharded apart, the layer norms in the root's unit
    for k, mode_name in [(1, "defaults"), (N_LAYER, "engine")]:
        results[f"split,mode={mode_name},k={k}"] = raw_case(k, mode_name, patch_first=True, split=True)
    return results


def refused(run) -> dict:
    """Run ``run()``; what it raised, and whether any gradient existed afterwards."""
    try:
        model = run()
    except HighwayBPError as err:
        return {"error": type(err).__name__, "message": str(err), "grads": None}
    return {"error": None, "message": "", "grads": sum(p.grad is not None for p in model.parameters())}


def refused_part() -> dict:
    results = {}
    models = []

    def no_root():
        model = patch_model(tiny_gpt2(), k=1)
        models.append(model)
        for block in model.transformer.h:
            fully_shard(block)
        step(model.train())
        return model

    results["no_root"] = refused(no_root)
    results["no_root"]["grads"] = sum(p.grad is not None for p in models[-1].parameters())

    def unpatched():
        return hw_fsdp.attach(shard(tiny_gpt2()))

    results["attach_unpatched"] = refused(unpatched)

    def unsharded():
        return hw_fsdp.attach(patch_model(tiny_gpt2(), k=1))

    results["attach_unsharded"] = refused(unsharded)
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


def accelerate_part() -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    force_fsdp2_on_cpu()
    results = {}
    for patch_first in (True, False):
        for k, mode_name in CASES:
            with mode(mode_name):
                model = tiny_gpt2()
                if patch_first:
                    patch_model(model, k=k)
                model = accelerator.prepare(model)
                if not patch_first:
                    patch_model(model, k=k)
                model.train()
                reset_stats(model)
                ids, labels = tensors(my_rows())
                accelerator.backward(model(input_ids=ids, labels=labels).loss)
            grads = gathered(model)
            results[f"patch_first={patch_first},mode={mode_name},k={k}"] = {
                "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
                "is_fsdp2": hw_fsdp.is_fsdp2(model),
                "attached": hw_fsdp.is_attached(model),
                "rel_error": rel_error(grads, reference(k)),
                "rel_error_vs_exact": rel_error(grads, reference(None)),
                "iterations": highway_state(model).last_iterations,
                "stats": lifecycle_stats(model),
            }
    return results


class _Grads(TrainerCallback):
    def __init__(self):
        self.grads = None
        self.patched = False
        self.attached = False
        self.stats = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.patched = is_patched(model)
        self.attached = hw_fsdp.is_attached(model)
        self.stats = lifecycle_stats(model)
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


def trainer_parts(out: str) -> dict:
    results: dict[str, dict] = {"trainer": {}, "callback": {}}
    for part in results:
        for k, mode_name in CASES:
            model = tiny_gpt2()
            recorder = _Grads()
            folder = os.path.join(out, f"{part}-{mode_name}-{k}")
            with mode(mode_name):
                if part == "trainer":
                    args = _arguments(HighwayTrainingArguments, folder, hwbp_k=k)
                    trainer = FSDPHighwayTrainer(model=model, args=args, train_dataset=dataset(), callbacks=[recorder])
                else:
                    args = _arguments(TrainingArguments, folder)
                    callbacks = [HighwayCallback(HighwayConfig(k=k)), recorder]
                    trainer = FSDPTrainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
                trainer.train()
            entries = [e for e in trainer.state.log_history if "loss" in e]
            results[part][f"mode={mode_name},k={k}"] = {
                "rel_error": rel_error(recorder.grads, reference(k)),
                "rel_error_vs_exact": rel_error(recorder.grads, reference(None)),
                "patched": recorder.patched,
                "attached": recorder.attached,
                "stats": recorder.stats,
                "is_fsdp2": hw_fsdp.is_fsdp2(trainer.model_wrapped),
                "unpatched_after": not is_patched(model),
                "logged_iterations": [e.get("hwbp_iterations") for e in entries],
            }
    return results


def not_in_effect_part(out: str) -> dict:
    """A Trainer asked for FSDP on CPU (use_cpu): Accelerate runs DDP; the callback says so when the Trainer is
    built, once."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    hf_logging.get_logger("hf_hwbp").addHandler(handler)
    try:
        args = _arguments(TrainingArguments, os.path.join(out, "not_in_effect"), fsdp="full_shard")
        trainer = Trainer(
            model=tiny_gpt2(), args=args, train_dataset=dataset(), callbacks=[HighwayCallback(HighwayConfig(k=1))]
        )
    finally:
        hf_logging.get_logger("hf_hwbp").removeHandler(handler)
    return {"log": stream.getvalue(), "distributed_type": str(trainer.accelerator.distributed_type)}


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
        results = {"not_in_effect": not_in_effect_part(options.out)}  # first: nothing was said yet in this process
        results.update(raw=raw_part())
        results.update(refused=refused_part())
        results.update(accelerate=accelerate_part())
        results.update(trainer_parts(options.out))
    with open(os.path.join(options.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
