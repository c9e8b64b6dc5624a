"""Per-step Python overhead of the patch: a tiny GPT-2 / Llama (8 layers, hidden 32) where the hooks dominate."""

import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_hwbp

torch.set_num_threads(1)
torch.manual_seed(0)
models = {
    "gpt2": GPT2LMHeadModel(
        GPT2Config(n_layer=8, n_embd=32, n_head=4, vocab_size=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    ),
    "llama": LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=8,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    ),
}
ids = torch.randint(0, 128, (2, 16))


def timed_step(model: torch.nn.Module) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - start


for name, model in models.items():
    model.train()
    samples = {"backprop": [], "k=0": [], "k=1": []}
    for _r in range(60):
        for method in samples:
            if method == "backprop":
                hf_hwbp.unpatch_model(model)
            else:
                hf_hwbp.patch_model(model, k=int(method[2:]))
            timed_step(model)  # after (re)patching
            samples[method].append(statistics.median(timed_step(model) for _ in range(5)))
    med = {m: statistics.median(v) * 1e3 for m, v in samples.items()}
    print(
        f"{sys.argv[1]} {name}: "
        + ", ".join(f"{m} {v:.2f} ms" for m, v in med.items())
        + f"; k=0 - backprop = {med['k=0'] - med['backprop']:.2f} ms"
    )
