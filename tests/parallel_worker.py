"""Multi-process checks of hf_hwbp.parallel, run by tests/test_parallel.py under torchrun (gloo, CPU).

Every rank builds the same float64 model (dropout 0), computes the single-process reference gradients
itself (``hf_hwbp.patch_model`` for Highway-BP, the unpatched model for exact backprop), runs one
layer-parallel step on a second copy and writes, per case, the largest relative error over its stage's
parameters to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import hf_hwbp
from hf_hwbp.parallel import GPipeBaseline, LayerParallelHighway, train_layer_parallel

VOCAB, SEQ, BATCH = 64, 12, 2


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
    return model.double().train()


def batch(padded: bool = False):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    if not padded:
        return ids, ids.clone(), None
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    return ids, labels, mask


def reference(case: dict, ids, labels, mask) -> dict[int, torch.Tensor]:
    """id(parameter of a fresh copy) is useless across copies: key by parameter name."""
    model = build(case["arch"], case["layers"])
    if case["ref"] == "highway":
        hf_hwbp.patch_model(model, case["k"], group_size=case["ref_group"], tol=case.get("tol"))
    model(input_ids=ids, labels=labels, attention_mask=mask).loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def run_case(case: dict) -> dict:
    ids, labels, mask = batch(case.get("padded", False))
    ref = reference(case, ids, labels, mask)
    model = build(case["arch"], case["layers"])
    names = {id(p): n for n, p in model.named_parameters()}
    if case["method"] == "gpipe":
        runner = GPipeBaseline(model, n_microbatches=2)
        runner.step(ids, labels)
    else:
        runner = LayerParallelHighway(
            model,
            k=case.get("k", 0),
            group_size=case.get("group", 1),
            method=case["method"],
            scan=case.get("scan", "chain"),
            tol=case.get("tol"),
            microbatches=case.get("mb", 1),
        )
        runner.step(ids, labels, mask)
    errors, missing = {}, []
    for p in runner.parameters():
        name = names[id(p)]
        if p.grad is None:
            missing.append(name)
            continue
        r = ref[name]
        errors[name] = float((p.grad - r).norm() / r.norm().clamp_min(1e-300))
    worst = max(errors, key=errors.get)
    return {
        "max_rel_err": errors[worst],
        "worst": worst,
        "params": len(errors),
        "missing": missing,
        "iterations": getattr(runner, "last_iterations", None),
        "tolerance": case.get("tolerance", 1e-10),
    }


def cases() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for arch in ("gpt2", "llama"):
        for k in (0, 1, 2):
            out[f"{arch}-k{k}-g1"] = dict(arch=arch, layers=4, k=k, method="highway", ref="highway", ref_group=1)
        out[f"{arch}-k1-g2"] = dict(arch=arch, layers=4, k=1, group=2, method="highway", ref="highway", ref_group=2)
        out[f"{arch}-k4-exact"] = dict(arch=arch, layers=4, k=4, method="highway", ref="exact")
        out[f"{arch}-backprop-exact"] = dict(arch=arch, layers=4, method="backprop", ref="exact")
        out[f"{arch}-stage-k2-exact"] = dict(arch=arch, layers=4, k=2, group="stage", method="highway", ref="exact")
    out["gpt2-k1-stagegroup"] = dict(
        arch="gpt2", layers=4, k=1, group="stage", method="highway", ref="highway", ref_group=2
    )
    out["gpt2-k2-allgather"] = dict(
        arch="gpt2", layers=4, k=2, scan="allgather", method="highway", ref="highway", ref_group=1
    )
    out["gpt2-k4-tol"] = dict(arch="gpt2", layers=4, k=4, tol=0.05, method="highway", ref="highway", ref_group=1)
    out["gpt2-uneven-k2-g1"] = dict(arch="gpt2", layers=5, k=2, method="highway", ref="highway", ref_group=1)
    out["gpt2-uneven-k1-g2"] = dict(arch="gpt2", layers=5, k=1, group=2, method="highway", ref="highway", ref_group=2)
    out["llama-padded-k1-g1"] = dict(
        arch="llama", layers=4, k=1, padded=True, method="highway", ref="highway", ref_group=1
    )
    out["llama-padded-backprop"] = dict(arch="llama", layers=4, padded=True, method="backprop", ref="exact")
    out["gpt2-mb2-k1-g1"] = dict(arch="gpt2", layers=4, k=1, mb=2, method="highway", ref="highway", ref_group=1)
    out["llama-padded-mb2-k2"] = dict(
        arch="llama", layers=4, k=2, mb=2, padded=True, method="highway", ref="highway", ref_group=1
    )
    out["gpt2-mb2-backprop"] = dict(arch="gpt2", layers=4, mb=2, method="backprop", ref="exact")
    out["llama-padded-mb2-backprop"] = dict(arch="llama", layers=4, mb=2, padded=True, method="backprop", ref="exact")
    # HF's causal-LM loss upcasts logits to float32: micro-batch means round differently from the batch mean
    out["gpt2-gpipe-exact"] = dict(arch="gpt2", layers=4, method="gpipe", ref="exact", tolerance=1e-5)
    out["llama-gpipe-exact"] = dict(arch="llama", layers=4, method="gpipe", ref="exact", tolerance=1e-5)
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    selected = cases()
    if args.only:
        selected = {n: c for n, c in selected.items() if n in args.only.split(",")}
    results = {name: run_case(case) for name, case in selected.items()}
    if not args.only:
        results["train"] = train_check()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
