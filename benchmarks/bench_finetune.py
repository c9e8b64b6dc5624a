"""Fine-tuning, the way the package is used: a backprop-pretrained model fine-tuned with backprop and Highway-BP.

1. Pretraining (rebuilt on demand, never committed): a small GPT-2 and a small Llama trained with backprop on the
   embedded corpus (the Python reference manual, ``hf_hwbp.examples.data``), saved under ``--checkpoint_dir``
   (default ``outputs/checkpoints``, gitignored). A checkpoint whose settings match is reused.
2. Fine-tuning on a second text shipped with Python: the docstrings of the standard library's top-level modules
   (``Lib/*.py``, read with ``ast``), split by file into train / validation, tokenized with the pretraining
   tokenizer. Every method starts from the same checkpoint and sees the same batches (per seed); ``full``
   trains every parameter, ``lora`` trains PEFT LoRA adapters (seeded init) on attention and MLP.

Each run records the validation loss curve on the docstrings and, every ``--monitor_every`` steps, the per-group
fidelity of the Highway gradient against the exact one on that step's batch. Runs append to
``<output_dir>/runs.jsonl`` (``--resume`` skips finished ones); the summary (paired gaps per seed, fidelity) is
``summary.md`` / ``summary.json`` / ``loss_curves.png`` / ``gaps.png``, as in benchmarks/bench_training.py.

    python -m benchmarks.bench_finetune --models gpt2 llama --modes full lora --seeds 0 1 2 --resume \\
        --output_dir results/quality/finetune
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
from pathlib import Path

import torch

from benchmarks._bench_common import append_jsonl, batch_order, build_model, loss_of, start_runs, warmup_cosine
from benchmarks.bench_training import SMOKE, TASK_DEFAULTS, Task, interleaved_timing, summarize, train_one

FINETUNE_DEFAULTS = dict(batch_size=8, steps=150, warmup=15, wd=0.0, eval_every=25)
LEARNING_RATES = {"full": 3e-4, "lora": 2e-3}
LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


# ----- data --------------------------------------------------------------------------------------------------
def stdlib_docstring_documents(max_files: int | None = None) -> dict[str, str]:
    """{module file name: its docstrings joined}, for the standard library's top-level modules (sorted)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    documents = {}
    for path in sorted(lib.glob("*.py"))[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(d for d in docs if d)
        if text:
            documents[path.name] = text
    return documents


def finetune_data(tokenizer, block_size: int, val_fraction: float = 0.1, max_files: int | None = None):
    """(train blocks, validation blocks) of the stdlib docstrings, split by file name (deterministic)."""
    from hf_hwbp.examples.data import chunk_stream, tokenize_to_stream

    train, val = [], []
    for name, text in stdlib_docstring_documents(max_files).items():
        digest = hashlib.sha256(("finetune" + name).encode()).digest()
        (val if digest[0] / 256 < val_fraction else train).append(text)
    if not val:  # tiny selections (tests)
        val.append(train.pop())
    return chunk_stream(tokenize_to_stream(tokenizer, train), block_size), chunk_stream(
        tokenize_to_stream(tokenizer, val), block_size
    )


# ----- pretraining -------------------------------------------------------------------------------------------
def pretrain(model_name: str, hp: dict, train: torch.Tensor, val: torch.Tensor, vocab: int, path: Path, log=print):
    """Train ``model_name`` with backprop on the corpus (seed 0) and save its state dict to ``path``."""
    model = build_model(
        model_name, hp["depth"], hidden=hp["hidden"], heads=hp["heads"], vocab_size=vocab, block_size=hp["block_size"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["wd"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, hp["steps"], hp["warmup"]))
    for step, idx in enumerate(batch_order(len(train), hp["batch_size"], hp["steps"], seed=999), start=1):
        loss = loss_of(model, (train[idx], train[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 250 == 0:
            log(f"[pretrain {model_name}] step {step} train loss {loss.item():.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class FinetuneTask(Task):
    """A Task whose model is the pretrained checkpoint (plus seeded LoRA adapters) and whose data is the docstrings."""

    def __init__(self, name: str, model_name: str, mode: str, hp: dict, state_dict, train, val, vocab: int):
        self.name, self.hp, self.kind = name, hp, model_name
        self.mode, self.state_dict, self.vocab = mode, state_dict, vocab
        self.train_x, self.train_y, self.val_x, self.val_y = train, train, val, val

    def model(self, seed: int):
        hp = self.hp
        model = build_model(
            self.kind, hp["depth"], hidden=hp["hidden"], heads=hp["heads"], vocab_size=self.vocab,
            block_size=hp["block_size"], seed=seed,
        )  # fmt: skip
        model.load_state_dict(self.state_dict)
        if self.mode == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)
            config = LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS[self.kind],
                fan_in_fan_out=self.kind == "gpt2",  # GPT-2's Conv1D stores weights transposed
            )  # fmt: skip
            model = get_peft_model(model, config)
        return model.train()


def checkpoint_path(checkpoint_dir: Path, model_name: str, hp: dict) -> Path:
    key = hashlib.sha256(json.dumps({"model": model_name, **hp}, sort_keys=True).encode()).hexdigest()[:12]
    return checkpoint_dir / f"pretrained_{model_name}_{key}.pt"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--methods", nargs="+", default=["backprop", "k0", "k1", "k2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--pretrain_steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 150)")
    parser.add_argument("--monitor_every", type=int, default=25)
    parser.add_argument("--timing_rounds", type=int, default=0, help="interleaved timing rounds (0: none)")
    parser.add_argument("--timing_steps", type=int, default=5, help="steps per method per timing round")
    parser.add_argument("--timing_only", action="store_true", help="only the interleaved timing (no training runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("outputs/checkpoints"))
    parser.add_argument("--output_dir", type=Path, default=Path("results/quality/finetune"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--summarize_only", action="store_true")
    parser.add_argument("--background", action="store_true", help="register the PID in /tmp/hwbp_background.pids")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        return summarize(args.output_dir)
    from hf_hwbp.examples.data import reference_manual_lm_data

    done = start_runs(args.output_dir, args.threads, "bench_finetune.py", argv, args.background)
    for model_name in args.models:
        pre_hp = dict(TASK_DEFAULTS[model_name], steps=args.pretrain_steps)
        if args.smoke:
            pre_hp.update(SMOKE, steps=args.pretrain_steps)
        tokenizer, corpus_train, corpus_val = reference_manual_lm_data(block_size=pre_hp["block_size"])
        if args.smoke:
            corpus_train = corpus_train[:64]
        path = checkpoint_path(args.checkpoint_dir, model_name, pre_hp)
        if not path.exists():
            model = pretrain(model_name, pre_hp, corpus_train, corpus_val, len(tokenizer), path)
            corpus = Task(model_name, pre_hp, smoke=args.smoke)
            append_jsonl(
                args.output_dir / "pretrain.jsonl",
                {"model": model_name, "hparams": pre_hp, "checkpoint": path.name, **corpus.evaluate(model)},
            )
        state_dict = torch.load(path)
        train, val = finetune_data(tokenizer, pre_hp["block_size"], max_files=12 if args.smoke else None)
        if args.smoke:
            train, val = train[:64], val[:16]
        for mode in args.modes:
            hp = {**pre_hp, **FINETUNE_DEFAULTS, "lr": LEARNING_RATES[mode], "mode": mode}
            if args.smoke:
                hp.update(steps=6, eval_every=3, warmup=2)
            if args.steps is not None:
                hp["steps"] = args.steps
            task = FinetuneTask(f"{model_name}_{mode}", model_name, mode, hp, state_dict, train, val, len(tokenizer))
            for seed in [] if args.timing_only else args.seeds:
                for method in args.methods:
                    if args.resume and (task.name, method, seed) in done:
                        continue
                    record = train_one(task, method, seed, log=lambda s: None, monitor_every=args.monitor_every)
                    append_jsonl(args.output_dir / "runs.jsonl", record)
                    print(f"DONE {task.name} {method} seed {seed}: val loss {record['final_val_loss']:.4f}", flush=True)
            if args.timing_rounds > 0:
                for row in interleaved_timing(task, args.methods, args.timing_rounds, args.timing_steps):
                    append_jsonl(args.output_dir / "timing.jsonl", row)
    summary = summarize(args.output_dir)
    print((args.output_dir / "summary.md").read_text(), flush=True)
    return summary


if __name__ == "__main__":
    main()
