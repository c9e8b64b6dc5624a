"""Learning quality of ``HighwayGRU`` / ``HighwayLSTM`` (Highway-BP through time) against backprop through time.

Tasks (both offline):
  digits  scikit-learn's digits, 8x8 upsampled to 16x16, read pixel by pixel (T = 256, one input per step); a
          linear head on the last state classifies: the label depends on pixels read up to 256 steps earlier.
  charlm  character-level language model on the Python reference manual shipped with Python
          (``pydoc_data.topics``), sequences of T = 256 characters, a loss on every step's output.

Methods: ``backprop`` (``torch.nn.GRU``) and ``k<N>`` (``HighwayGRU`` with N iterations); with ``--cell lstm``
``torch.nn.LSTM`` and ``HighwayLSTM``. For every (task, seed) all
methods start from the same weights and see the same batches in the same order. Every finished run is appended to
``<output_dir>/runs.jsonl`` (``--resume`` skips finished runs); the validation metric is recorded every
``eval_every`` steps, so the step at which a method reaches backprop's final metric can be read off.

Step times come from a separate timing mode (``--timing_rounds N``): the methods' training steps on the same
model and batch shape, round-robin, medians; run it with no other timing job on the machine. The
summary converts "steps to reach backprop's final metric" into time with those step times.

Examples:
    python -m benchmarks.bench_rnn_quality --tasks digits --seeds 0 1 2 --output_dir results/rnn/quality
    python -m benchmarks.bench_rnn_quality --tasks digits charlm --timing_rounds 7 --output_dir results/rnn/quality
    python -m benchmarks.bench_rnn_quality --summarize_only --output_dir results/rnn/quality
    python -m benchmarks.bench_rnn_quality --cell lstm --methods backprop k1 k2 --output_dir results/rnn/lstm/quality
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._bench_common import append_jsonl, batch_order, digits_data, machine_note, read_jsonl, set_threads
from hf_hwbp.rnn import HighwayGRU, HighwayLSTM

TASKS = ("digits", "charlm")


@dataclass
class QualityArguments:
    tasks: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": "digits and/or charlm"})
    cell: str = field(default="gru", metadata={"help": "gru (nn.GRU / HighwayGRU) or lstm (nn.LSTM / HighwayLSTM)"})
    methods: list[str] = field(
        default_factory=lambda: ["backprop", "k0", "k1", "k2"], metadata={"help": "backprop and k<N>"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = field(default="results/rnn/quality")
    threads: int = field(default=1)
    hidden_size: int = field(default=0, metadata={"help": "0: the task's default (digits 64, charlm 128)"})
    max_steps: int = field(default=0, metadata={"help": "0: the task's default (digits 1500, charlm 1000)"})
    batch_size: int = field(default=32)
    learning_rate: float = field(default=0.0, metadata={"help": "0: the task's default"})
    eval_every: int = field(default=50)
    resume: bool = field(default=False)
    timing_rounds: int = field(default=0, metadata={"help": "> 0: measure step times instead of training"})
    summarize_only: bool = field(default=False)


@dataclass
class TaskSpec:
    name: str
    hidden_size: int
    steps: int
    learning_rate: float
    higher_is_better: bool  # the validation metric: accuracy (digits) or loss in bits per character (charlm)
    metric_name: str


TASK_SPECS = {
    "digits": TaskSpec("digits", 64, 1500, 2e-3, True, "val accuracy (%)"),
    "charlm": TaskSpec("charlm", 128, 1000, 2e-3, False, "val bits/char"),
}


# ----- data ----------------------------------------------------------------------------------------------------
def load_task_data(task: str, seq_len: int = 256):
    """(train inputs, train targets, val inputs, val targets, vocab size or None)."""
    if task == "digits":
        x_train, y_train, x_val, y_val = digits_data(image_size=16)
        as_sequence = lambda x: x.reshape(x.shape[0], -1, 1)  # noqa: E731 - [N, 256, 1], row by row
        return as_sequence(x_train), y_train, as_sequence(x_val), y_val, None
    from hf_hwbp.examples.data import reference_manual_documents, split_documents

    train_docs, val_docs = split_documents(reference_manual_documents())
    train_text, val_text = "\n".join(train_docs), "\n".join(val_docs)
    chars = sorted(set(train_text))
    index = {c: i + 1 for i, c in enumerate(chars)}  # 0: a character unseen in training

    def blocks(text: str) -> torch.Tensor:
        ids = torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)
        count = (len(ids) - 1) // seq_len
        return ids[: count * seq_len + 1], count

    train_ids, n_train = blocks(train_text)
    val_ids, n_val = blocks(val_text)
    x_train = train_ids[:-1].view(n_train, seq_len)
    y_train = train_ids[1:].view(n_train, seq_len)
    n_val = min(n_val, 128)  # a fixed validation set of 128 x 256 characters
    x_val = val_ids[: n_val * seq_len].view(n_val, seq_len)
    y_val = val_ids[1 : n_val * seq_len + 1].view(n_val, seq_len)
    return x_train, y_train, x_val, y_val, len(chars) + 1


# ----- model ---------------------------------------------------------------------------------------------------
class RecurrentModel(nn.Module):
    """Embedding or scalar input -> one GRU or LSTM layer (batch first) -> head on every step (charlm) or the last
    (digits)."""

    def __init__(self, task: str, hidden_size: int, vocab_size: int | None, cell: str = "gru"):
        super().__init__()
        self.task = task
        if vocab_size is None:
            self.embed, input_size, out = None, 1, 10
        else:
            self.embed, input_size, out = nn.Embedding(vocab_size, 64), 64, vocab_size
        self.cell = cell
        self.rnn: nn.RNNBase = (nn.LSTM if cell == "lstm" else nn.GRU)(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, out)

    def use_highway(self, k: int) -> None:
        if self.cell == "lstm":
            self.rnn = HighwayLSTM.from_lstm(self.rnn, k=k)
        else:
            self.rnn = HighwayGRU.from_gru(self.rnn, k=k)

    def loss_and_logits(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = inputs if self.embed is None else self.embed(inputs)
        outputs, last = self.rnn(x)
        if self.cell == "lstm":
            last = last[0]  # (h_n, c_n): the head reads h_n
        if self.task == "digits":
            logits = self.head(last[-1])
            return F.cross_entropy(logits, targets), logits
        logits = self.head(outputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), logits


def build(
    task: str, spec: TaskSpec, method: str, seed: int, vocab_size: int | None, cell: str = "gru"
) -> RecurrentModel:
    torch.manual_seed(seed)
    model = RecurrentModel(task, spec.hidden_size, vocab_size, cell).float()  # whatever the default dtype is
    if method != "backprop":
        model.use_highway(int(method[1:]))
    return model


@torch.no_grad()
def evaluate(model: RecurrentModel, x_val, y_val, task: str, batch_size: int = 128) -> float:
    model.eval()
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(x_val), batch_size):
        loss, logits = model.loss_and_logits(x_val[i : i + batch_size], y_val[i : i + batch_size])
        n = len(x_val[i : i + batch_size])
        total, count = total + loss.item() * n, count + n
        if task == "digits":
            correct += (logits.argmax(-1) == y_val[i : i + batch_size]).sum().item()
    model.train()
    return 100.0 * correct / count if task == "digits" else total / count / math.log(2)


def lr_at(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_one(task: str, spec: TaskSpec, method: str, seed: int, data, args: QualityArguments) -> dict:
    x_train, y_train, x_val, y_val, vocab = data
    model = build(task, spec, method, seed, vocab, args.cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, spec.steps))
    curve, losses = [], []
    start = time.perf_counter()
    for step, idx in enumerate(batch_order(len(x_train), args.batch_size, spec.steps, seed), start=1):
        loss, _ = model.loss_and_logits(x_train[idx], y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == spec.steps:
            metric = evaluate(model, x_val, y_val, task)
            curve.append({"step": step, "val": metric, "train_loss": statistics.fmean(losses[-args.eval_every :])})
            print(f"[{task} {method} seed {seed}] step {step}: {spec.metric_name} {metric:.3f}", flush=True)
            if not math.isfinite(metric):
                break
    return {
        "task": task,
        "cell": args.cell,
        "method": method,
        "seed": seed,
        "hidden_size": spec.hidden_size,
        "steps": spec.steps,
        "batch_size": args.batch_size,
        "learning_rate": spec.learning_rate,
        "final_val": curve[-1]["val"],
        "curve": curve,
        "wall_s_loaded": time.perf_counter() - start,
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
    }


# ----- timing --------------------------------------------------------------------------------------------------
def time_steps(task: str, spec: TaskSpec, data, args: QualityArguments) -> dict:
    """Median training-step time of every method on this task's model and batch shape, interleaved."""
    x_train, y_train, _, _, vocab = data
    models = {m: build(task, spec, m, 0, vocab, args.cell) for m in args.methods}
    idx = torch.arange(args.batch_size)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for round_index in range(args.timing_rounds + 1):
        for method, model in models.items():
            begin = time.perf_counter()
            loss, _ = model.loss_and_logits(x_train[idx], y_train[idx])
            model.zero_grad(set_to_none=True)
            loss.backward()
            if round_index > 0:  # round 0 warms up
                times[method].append(time.perf_counter() - begin)
    return {
        "task": task,
        "cell": args.cell,
        "hidden_size": spec.hidden_size,
        "batch_size": args.batch_size,
        "median_step_s": {m: statistics.median(v) for m, v in times.items()},
        "rounds": args.timing_rounds,
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "machine": machine_note(args.threads),
    }


# ----- summary -------------------------------------------------------------------------------------------------
def reached_at(curve: list[dict], target: float, higher_is_better: bool) -> int | None:
    for point in curve:
        if (point["val"] >= target) if higher_is_better else (point["val"] <= target):
            return point["step"]
    return None


def summarize(out: Path) -> dict:
    runs = read_jsonl(out / "runs.jsonl")
    timing = {t["task"]: t for t in read_jsonl(out / "timing.jsonl")}  # the last timing run per task wins
    lines = []
    summary = {}
    for task in TASKS:
        task_runs = [r for r in runs if r["task"] == task]
        if not task_runs:
            continue
        spec = TASK_SPECS[task]
        backprop = {r["seed"]: r for r in task_runs if r["method"] == "backprop"}
        methods = sorted({r["method"] for r in task_runs}, key=lambda m: (m != "backprop", m))
        step_s = timing.get(task, {}).get("median_step_s", {})
        lines += [
            f"### {task}: {spec.metric_name}, mean over seeds (per seed in brackets)",
            "",
            "| method | final metric | gap to backprop | steps to backprop's final (per seed) "
            "| step time (s) | time to backprop's final vs backprop |",
            "|---|---|---:|---|---:|---:|",
        ]
        for method in methods:
            rows = sorted((r for r in task_runs if r["method"] == method), key=lambda r: r["seed"])
            finals = [r["final_val"] for r in rows]
            gaps = [r["final_val"] - backprop[r["seed"]]["final_val"] for r in rows if r["seed"] in backprop]
            reach = [
                reached_at(r["curve"], backprop[r["seed"]]["final_val"], spec.higher_is_better)
                for r in rows
                if r["seed"] in backprop
            ]
            t_method, t_bp = step_s.get(method), step_s.get("backprop")
            ratio = "n/a"
            if t_method and t_bp and reach and all(s is not None for s in reach):
                # backprop's own time: the first evaluation at which it reached its final metric
                bp_steps = [
                    reached_at(backprop[r["seed"]]["curve"], backprop[r["seed"]]["final_val"], spec.higher_is_better)
                    for r in rows
                    if r["seed"] in backprop
                ]
                ratio = f"{statistics.fmean(s * t_method for s in reach) / statistics.fmean(bp_steps) / t_bp:.2f}x"
            elif reach and any(s is None for s in reach):
                ratio = "not reached" + (" (some seeds)" if any(s is not None for s in reach) else "")
            summary.setdefault(task, {})[method] = {
                "final": finals,
                "gap": gaps,
                "steps_to_backprop_final": reach,
                "step_s": t_method,
            }
            per_seed = ", ".join(f"{v:.2f}" for v in finals)
            step_time = "n/a" if t_method is None else f"{t_method:.4f}"
            gap = f"{statistics.fmean(gaps):+.2f}" if gaps else "n/a"
            if gaps and not spec.higher_is_better:  # a loss: the relative gap too
                relative = [
                    (r["final_val"] / backprop[r["seed"]]["final_val"] - 1) * 100 for r in rows if r["seed"] in backprop
                ]
                gap += f" ({statistics.fmean(relative):+.1f} %)"
            lines.append(
                f"| {method} | {statistics.fmean(finals):.2f} ({per_seed}) | {gap} | "
                f"{', '.join(str(s) for s in reach)} | {step_time} | {ratio} |"
            )
        lines.append("")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Train (or time) what the arguments ask for; return the summary of everything in ``output_dir``."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(args=argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        summary = summarize(out)
        print((out / "summary.md").read_text())
        return summary
    if args.cell not in ("gru", "lstm"):
        raise ValueError(f"--cell must be gru or lstm, got {args.cell!r}.")
    set_threads(args.threads)
    for task in args.tasks:
        if task not in TASK_SPECS:
            raise ValueError(f"Unknown task {task!r}: choose from {', '.join(TASKS)}.")
        base = TASK_SPECS[task]
        spec = TaskSpec(
            task,
            args.hidden_size or base.hidden_size,
            args.max_steps or base.steps,
            args.learning_rate or base.learning_rate,
            base.higher_is_better,
            base.metric_name,
        )
        data = load_task_data(task)
        if args.timing_rounds > 0:
            record = time_steps(task, spec, data, args)
            append_jsonl(out / "timing.jsonl", record)
            print(json.dumps(record["median_step_s"]), flush=True)
            continue
        done = {(r["task"], r["method"], r["seed"]) for r in read_jsonl(out / "runs.jsonl")} if args.resume else set()
        for seed in args.seeds:
            for method in args.methods:
                if (task, method, seed) in done:
                    continue
                record = train_one(task, spec, method, seed, data, args)
                record["machine"] = machine_note(args.threads)
                append_jsonl(out / "runs.jsonl", record)
    summary = summarize(out)
    print((out / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    main()
