"""Shared pieces of the Trainer tests: tiny random models, data, arguments and recording callbacks."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_hwbp import HighwayTrainingArguments, highway_state, patch_model

N_LAYER = 4


def tiny_gpt2(seed: int = 0, dropout: float = 0.0, n_layer: int = N_LAYER, dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=16,
        n_positions=32,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config).to(dtype)


def tiny_llama(seed: int = 0, n_layer: int = N_LAYER) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layer,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def repetitive_data(n: int = 16, length: int = 16, period: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        ids = [(i + j) % period for j in range(length)]
        # Position 0 is never a causal-LM target; masking it makes the Trainer's token count (num_items_in_batch)
        # agree with the model's own mean whether or not the Trainer knows that the loss shifts labels.
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return rows


def quiet_cpu_settings(output_dir) -> dict:
    """The TrainingArguments every Trainer test shares: CPU, no reports, no progress bar, no checkpoints, a log
    entry per step, batches of 4."""
    return dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=4,
    )


def make_args(tmp_path, **overrides) -> HighwayTrainingArguments:
    settings = dict(
        **quiet_cpu_settings(tmp_path / "out"),
        learning_rate=3e-3,
        max_steps=4,
        seed=0,
    )
    settings.update(overrides)
    return HighwayTrainingArguments(**settings)


def train_entries(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


class StepRecorder(TrainerCallback):
    """Records, after every optimizer step, the Highway settings the model used for it."""

    def __init__(self):
        self.k: dict[int, int] = {}
        self.tol: dict[int, float | None] = {}
        self.group_size: dict[int, int] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        config = highway_state(model).config
        self.k[state.global_step] = config.k
        self.tol[state.global_step] = config.tol
        self.group_size[state.global_step] = config.group_size


class GradRecorder(TrainerCallback):
    """Clones the gradients seen by the optimizer (after clipping) at every optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class LogCapture(TrainerCallback):
    """What the report_to integrations see: every integration is a callback that receives on_log's logs."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference_grads(k: int, data: list[dict]) -> dict[str, torch.Tensor]:
    """Single-process Highway-BP(k) gradient of the mean loss over ``data`` (equal lengths, no padding)."""
    model = tiny_gpt2(dtype=torch.float64)
    patch_model(model, k=k)
    model.train()
    ids = torch.tensor([row["input_ids"] for row in data])
    labels = torch.tensor([row["labels"] for row in data])
    model(input_ids=ids, labels=labels).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}
