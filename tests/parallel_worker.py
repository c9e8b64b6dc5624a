"""Multi-process checks of hf_hwbp.parallel, run by tests/test_parallel.py under torchrun (gloo, CPU).

Every rank builds the same float64 model (dropout 0), computes the single-process reference gradients
itself (``hf_hwbp.patch_model`` for Highway-BP, the unpatched model for exact backprop), runs one
layer-parallel step on a second copy and writes, per case, the largest relative error over its stage's
parameters to ``<out>/rank<r>.json``.

With M micro-batches the reference is the single-process model run on the same M slices, each loss being the
slice's token sum over the batch's token count (``num_items_in_batch``, gradient accumulation as the Trainer
does it): the same math as the whole batch, and the same float32 rounding inside transformers' loss. The
distance to the whole-batch reference is recorded too (``whole_batch_rel_err``: float32 loss rounding only).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import hf_hwbp
from hf_hwbp.parallel import LayerParallelHighway, TorchPipeline, train_layer_parallel
from hf_hwbp.parallel.simulate import split_batch

VOCAB, SEQ, BATCH = 64, 12, 4
DEVICE = torch.device("cpu")  # --device cuda: every rank on the one GPU (gloo through host memory: a correctness
# check only; NCCL refuses two ranks on one device)


def build(arch: str, layers: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "gpt2":  # tied lm_head / wte: exercises the tied-gradient exchange
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0
        )
        config.attn_pdrop = 0.0
        model = tf.GPT2LMHeadModel(config)
    else:
        config = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        model = tf.LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.double().train().to(DEVICE)


def batch(padded: bool = False):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    ids = ids.to(DEVICE)
    if not padded:
        return ids, ids.clone(), None
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding on the second and the last row
    mask[-1, -7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, labels, mask


def reference(case: dict, ids, labels, mask, microbatches: int = 1) -> dict[str, torch.Tensor]:
    """Gradients by parameter name (ids of a fresh copy's parameters mean nothing across copies)."""
    model = build(case["arch"], case["layers"])
    if case["ref"] == "highway":
        hf_hwbp.patch_model(model, case["k"], group_size=case["ref_group"], tol=case.get("tol"))
    if microbatches == 1:
        model(input_ids=ids, labels=labels, attention_mask=mask).loss.backward()
    else:
        items = int((labels[:, 1:] != -100).sum())
        start = 0
        for size in split_batch(ids.shape[0], microbatches):
            part = slice(start, start + size)
            start += size
            m = mask[part] if mask is not None else None
            model(input_ids=ids[part], labels=labels[part], attention_mask=m, num_items_in_batch=items).loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _max_rel_err(params, names, ref) -> tuple[dict[str, float], list[str]]:
    errors, missing = {}, []
    for p in params:
        name = names[id(p)]
        if p.grad is None:
            missing.append(name)
            continue
        r = ref[name]
        errors[name] = float((p.grad - r).norm() / r.norm().clamp_min(1e-300))
    return errors, missing


def run_case(case: dict) -> dict:
    ids, labels, mask = batch(case.get("padded", False))
    mb = case.get("mb", 1)
    torch_schedule = case["method"] in ("gpipe", "1f1b", "zbv")
    ref = reference(case, ids, labels, mask, 1 if torch_schedule else mb)
    model = build(case["arch"], case["layers"])
    names = {id(p): n for n, p in model.named_parameters()}
    if torch_schedule:
        runner = TorchPipeline(model, schedule=case["method"], n_microbatches=mb)
        runner.step(ids, labels)
    else:
        runner = LayerParallelHighway(
            model,
            k=case.get("k", 0),
            group_size=case.get("group", 1),
            method=case["method"],
            tol=case.get("tol"),
            microbatches=mb,
            backprop_order=case.get("order", "gpipe"),
        )
        runner.step(ids, labels, mask)
    errors, missing = _max_rel_err(runner.parameters(), names, ref)
    worst = max(errors, key=errors.get)
    whole = None
    if mb > 1 and not torch_schedule:
        whole_errors, _ = _max_rel_err(runner.parameters(), names, reference(case, ids, labels, mask))
        whole = max(whole_errors.values())
    return {
        "max_rel_err": errors[worst],
        "worst": worst,
        "params": len(errors),
        "missing": missing,
        "iterations": getattr(runner, "last_iterations", None),
        "tolerance": case.get("tolerance", 1e-10),
        "whole_batch_rel_err": whole,
    }


def cases() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for arch in ("gpt2", "llama"):
        for mb in (1, 2, 4):
            for k in (0, 1, 2) if arch == "gpt2" or mb != 2 else (1,):  # Llama at M = 2: k = 1 (and k = L below)
                out[f"{arch}-k{k}-g1-mb{mb}"] = dict(
                    arch=arch, layers=4, k=k, mb=mb, method="highway", ref="highway", ref_group=1
                )
            out[f"{arch}-k4-exact-mb{mb}"] = dict(arch=arch, layers=4, k=4, mb=mb, method="highway", ref="exact")
        out[f"{arch}-k1-g2"] = dict(arch=arch, layers=4, k=1, group=2, method="highway", ref="highway", ref_group=2)
        out[f"{arch}-backprop-exact"] = dict(arch=arch, layers=4, method="backprop", ref="exact")
        out[f"{arch}-stage-k2-exact"] = dict(arch=arch, layers=4, k=2, group="stage", method="highway", ref="exact")
    out["gpt2-k1-stagegroup-mb2"] = dict(
        arch="gpt2", layers=4, k=1, mb=2, group="stage", method="highway", ref="highway", ref_group=2
    )
    out["gpt2-k4-tol"] = dict(arch="gpt2", layers=4, k=4, tol=0.05, method="highway", ref="highway", ref_group=1)
    out["gpt2-uneven-k2-g1-mb2"] = dict(arch="gpt2", layers=5, k=2, mb=2, method="highway", ref="highway", ref_group=1)
    out["gpt2-uneven-k1-g2"] = dict(arch="gpt2", layers=5, k=1, group=2, method="highway", ref="highway", ref_group=2)
    out["llama-padded-k1-g1-mb2"] = dict(
        arch="llama", layers=4, k=1, mb=2, padded=True, method="highway", ref="highway", ref_group=1
    )
    out["llama-padded-k2-mb4"] = dict(
        arch="llama", layers=4, k=2, mb=4, padded=True, method="highway", ref="highway", ref_group=1
    )
    out["llama-padded-backprop-mb2"] = dict(arch="llama", layers=4, mb=2, padded=True, method="backprop", ref="exact")
    out["gpt2-backprop-1f1b-mb4"] = dict(arch="gpt2", layers=4, mb=4, order="1f1b", method="backprop", ref="exact")
    # torch's schedules average per-micro-batch mean losses (equal micro-batches, no padding): the whole batch's
    # gradient up to the float32 rounding inside transformers' loss
    for schedule in ("gpipe", "1f1b", "zbv"):
        out[f"gpt2-torch-{schedule}"] = dict(arch="gpt2", layers=4, mb=2, method=schedule, ref="exact", tolerance=1e-5)
    out["llama-torch-zbv"] = dict(arch="llama", layers=4, mb=2, method="zbv", ref="exact", tolerance=1e-5)
    return out


def train_check() -> dict:
    """train_layer_parallel's losses against a single-process loop over the patched model (3 AdamW steps)."""
    data = [batch()[0] for _ in range(3)]
    data = [torch.roll(d, shifts=i, dims=1) for i, d in enumerate(data)]
    losses = train_layer_parallel(build("gpt2", 4), data, k=1, steps=3, lr=1e-2, max_grad_norm=1.0)
    model = hf_hwbp.patch_model(build("gpt2", 4), 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ref = []
    for ids in data:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ref.append(float(loss))
    return {"losses": losses, "reference": ref}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: every rank on the one GPU (gloo)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    selected = cases()
    if args.only:
        selected = {n: c for n, c in selected.items() if n in args.only.split(",")}
    if DEVICE.type == "cuda":  # torch's schedules send CUDA tensors point to point, which gloo cannot
        selected = {n: c for n, c in selected.items() if c["method"] in ("highway", "backprop")}
    results = {}
    for name, case in selected.items():
        print(f"[rank {rank}] case {name}", flush=True)  # torchrun shows it when a case fails
        results[name] = run_case(case)
    if not args.only and DEVICE.type == "cpu":
        results["train"] = train_check()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
