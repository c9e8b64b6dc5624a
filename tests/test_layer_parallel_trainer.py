"""LayerParallelTrainer: real 2-process torchrun runs (gloo, CPU) against single-process HighwayTrainer runs.

tests/lp_trainer_worker.py trains each part of ``PARTS`` with ``layer_parallel=True`` on 2 ranks; this file trains
the same settings in this process without ``layer_parallel`` (``HighwayTrainer`` with the patched model, or plain
backprop) and compares: the trained weights (through ``save_pretrained`` / ``from_pretrained``), every logged loss,
grad_norm and hwbp_k, the evaluation loss, and a run resumed from a checkpoint. float64 models (dropout 0): the
layer-parallel Highway gradients equal the single-process ones to ~1e-13 relative (tests/test_parallel.py), so after
a few AdamW steps the weights agree to far below the 1e-9 used here; bf16 runs are compared loosely.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    ViTConfig,
    ViTForImageClassification,
)

from hf_hwbp import (
    HighwayBPError,
    HighwayCallback,
    HighwayTrainer,
    HighwayTrainingArguments,
    LayerParallelTrainer,
    UnsupportedModelError,
    UnsupportedTrainingSetupError,
)

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from trainer_helpers import quiet_cpu_settings, tiny_gpt2, tiny_llama  # noqa: E402

ROWS, LENGTH = 24, 16


def lm_rows(n: int = ROWS, padded: bool = False, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        ids = [(3 * i + j * (i % 5 + 1)) % 16 for j in range(LENGTH)]
        labels = [-100] + ids[1:]  # position 0 is never a causal-LM target
        mask = [1] * LENGTH
        if padded and i % 3 == 1:  # right padding on every third row
            mask[-5:] = [0] * 5
            labels[-5:] = [-100] * 5
        row = {"input_ids": ids, "labels": labels}
        if padded:
            row["attention_mask"] = mask
        rows.append(row)
    return rows


def image_rows(n: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 16, 16, generator=g, dtype=torch.float64), "labels": int(i % 5)}
        for i in range(n)
    ]


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
    )
    return ViTForImageClassification(config).double()


# name -> model, data and the arguments both runs share
PARTS: dict[str, dict] = {
    "gpt2": dict(
        model=lambda: tiny_gpt2(dtype=torch.float64),
        train=lambda: lm_rows(),
        eval=lambda: lm_rows(8, offset=100),
        args=dict(
            hwbp_k=1,
            hwbp_k_schedule="step",
            hwbp_k_step_every=2,
            layer_parallel_microbatches=2,
            gradient_accumulation_steps=2,
            max_grad_norm=0.5,
            weight_decay=0.1,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            warmup_steps=1,
        ),
        resume=True,
    ),
    "llama": dict(
        model=lambda: tiny_llama().double(),
        train=lambda: lm_rows(12, padded=True),
        args=dict(hwbp_k=2, layer_parallel_microbatches=2, max_grad_norm=1.0, max_steps=3),
    ),
    "vit": dict(
        model=tiny_vit,
        train=lambda: image_rows(),
        args=dict(hwbp_k=1, layer_parallel_microbatches=2, max_steps=2, remove_unused_columns=False),
    ),
    "backprop": dict(
        model=lambda: tiny_gpt2(dtype=torch.float64),
        train=lambda: lm_rows(8),
        args=dict(use_highway_bp=False, layer_parallel_microbatches=2, max_steps=2),
    ),
    "bf16": dict(
        model=lambda: tiny_gpt2(),
        train=lambda: lm_rows(8),
        args=dict(hwbp_k=1, bf16=True, max_steps=2),
    ),
}


def make_trainer(name: str, output_dir: Path, *, layer_parallel: bool) -> HighwayTrainer:
    """``LayerParallelTrainer`` (under torchrun) or the single-process ``HighwayTrainer``, with the part's settings."""
    part = PARTS[name]
    settings = dict(
        **quiet_cpu_settings(output_dir),
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        layer_parallel=layer_parallel,
    )
    settings.update(part["args"])
    if not layer_parallel:
        settings.pop("layer_parallel_microbatches", None)
    args = HighwayTrainingArguments(**settings)
    trainer_class = LayerParallelTrainer if layer_parallel else HighwayTrainer
    return trainer_class(
        model=part["model"](),
        args=args,
        train_dataset=part["train"](),
        eval_dataset=part["eval"]() if "eval" in part else None,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def layer_parallel_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lp_trainer")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(TESTS / "lp_trainer_worker.py"),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=TESTS.parent)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """The single-process runs of every part: their trainers after training (and the eval metrics)."""
    out = tmp_path_factory.mktemp("reference")
    runs = {}
    for name in PARTS:
        trainer = make_trainer(name, out / name, layer_parallel=False)
        trainer.train()
        runs[name] = (trainer, trainer.evaluate() if PARTS[name].get("eval") else None)
    return runs


def _records(runs: Path, name: str) -> list[dict]:
    return [json.loads((runs / name / f"rank{r}.json").read_text()) for r in range(2)]


def _entries(history: list[dict], key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in history if key in e and "train_runtime" not in e}


def _max_rel_weight_error(model, reference) -> tuple[float, str]:
    """The largest ||a - b|| / ||b|| over the parameters. ViT's attention key bias (``k_proj.bias``) has an exactly
    zero gradient (softmax ignores it) and starts at zero, so AdamW moves it by rounding noise only (~1e-11):
    relative to itself that noise is O(1), so it is compared absolutely."""
    want = dict(reference.named_parameters())
    worst = (0.0, "")
    for name, p in model.named_parameters():
        r = want[name].detach()
        scale = 1.0 if name.endswith("k_proj.bias") else r.norm().clamp_min(1e-300)
        err = float((p.detach().to(r.dtype) - r).norm() / scale)
        worst = max(worst, (err, name))
    return worst


def _load(folder: Path, like):
    return type(like).from_pretrained(folder, dtype=next(like.parameters()).dtype)


# ----- weights, logs, evaluation, checkpoints ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "backprop"])
def test_trained_weights_equal_single_process_training(layer_parallel_runs, references, name):
    reference, _ = references[name]
    trained = _load(layer_parallel_runs / name / "final", reference.model)
    err, worst = _max_rel_weight_error(trained, reference.model)
    assert err <= 1e-9, f"{name}: {worst} differs by {err:.2e} relative"
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, PARTS[name]["model"]().state_dict()[n])]
    assert len(changed) == len(list(trained.parameters()))  # every stage's weights were trained and gathered


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "backprop"])
def test_every_rank_logs_the_single_process_losses(layer_parallel_runs, references, name):
    reference, _ = references[name]
    for record in _records(layer_parallel_runs, name):
        # transformers computes the LM loss in float32 (logits.float()), and micro-batches sum it in another order
        for key, rel in (("loss", 1e-6), ("grad_norm", 1e-9), ("hwbp_k", 0)):
            if key == "hwbp_k" and name == "backprop":
                continue
            got, want = _entries(record["log_history"], key), _entries(reference.state.log_history, key)
            assert sorted(got) == sorted(want) and len(got) == reference.state.global_step, key
            assert got == pytest.approx(want, rel=rel, abs=0), key
        if name == "backprop":
            assert not _entries(record["log_history"], "hwbp_k")


def test_schedule_and_clipping_were_exercised(references):
    history = references["gpt2"][0].state.log_history
    assert sorted(set(_entries(history, "hwbp_k").values())) == [1, 2]  # the step schedule raised k
    assert max(_entries(history, "grad_norm").values()) > 0.5  # max_grad_norm=0.5 clipped


def test_evaluation_runs_on_the_gathered_model(layer_parallel_runs, references):
    _, want = references["gpt2"]
    for record in _records(layer_parallel_runs, "gpt2"):
        assert record["eval"]["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
        during = _entries(record["log_history"], "eval_loss")
        assert sorted(during) == [2, 4]


def test_stages_split_the_model(layer_parallel_runs):
    first, last = (set(r["stage_params"]) for r in _records(layer_parallel_runs, "gpt2"))
    everything = {n for n, _ in tiny_gpt2().named_parameters()}
    assert first | last == everything and first & last == {"transformer.wte.weight"}  # tied to lm_head


def test_resume_continues_the_run(layer_parallel_runs):
    folder = layer_parallel_runs / "gpt2"
    assert {"optimizer_stage0-of-2.pt", "optimizer_stage1-of-2.pt"} <= set(os.listdir(folder / "run" / "checkpoint-2"))
    full = _load(folder / "final", tiny_gpt2(dtype=torch.float64))
    resumed = _load(folder / "resumed", full)
    err, worst = _max_rel_weight_error(resumed, full)
    assert err <= 1e-12, f"{worst} differs by {err:.2e} relative after resuming"
    for record in _records(layer_parallel_runs, "gpt2"):
        uninterrupted = _entries(record["log_history"], "loss")
        resumed_history = _entries(record["resumed_log_history"], "loss")
        assert sorted(resumed_history) == [1, 2, 3, 4]  # steps 1-2 come from the checkpoint's trainer state
        assert resumed_history == pytest.approx(uninterrupted, rel=1e-12, abs=0)


def test_bf16_trains_close_to_single_process_bf16(layer_parallel_runs, references):
    reference, _ = references["bf16"]
    want = _entries(reference.state.log_history, "loss")
    for record in _records(layer_parallel_runs, "bf16"):
        got = _entries(record["log_history"], "loss")
        assert sorted(got) == sorted(want)
        assert got == pytest.approx(want, rel=2e-2)  # bf16 rounding in different places


# ----- refusals (in this process: no torchrun needed) ----------------------------------------------------------------
def _lp_args(tmp_path, **overrides) -> HighwayTrainingArguments:
    settings = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, layer_parallel=True, hwbp_k=1)
    settings.update(overrides)
    return HighwayTrainingArguments(**settings)


def test_unsupported_models_are_refused(tmp_path):
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=16))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LayerParallelTrainer(model=model, args=_lp_args(tmp_path))
    with pytest.raises(UnsupportedModelError, match="no stage recipe for model_type='bert'"):
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
        LayerParallelTrainer(model=BertForMaskedLM(config), args=_lp_args(tmp_path))


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(UnsupportedTrainingSetupError, match="layer_parallel_microbatches=1"):
        _lp_args(tmp_path, hwbp_k="auto", layer_parallel_microbatches=2)
    with pytest.raises(UnsupportedTrainingSetupError, match="hwbp_fidelity_steps"):
        _lp_args(tmp_path, hwbp_fidelity_steps=2)
    with pytest.raises(UnsupportedTrainingSetupError, match="does not support fp16"):
        _lp_args(tmp_path, fp16=True)
    with pytest.raises(ValueError, match="layer_parallel_microbatches must be"):
        _lp_args(tmp_path, layer_parallel_microbatches=0)
    with pytest.raises(UnsupportedTrainingSetupError, match="custom loss"):
        LayerParallelTrainer(model=tiny_gpt2(), args=_lp_args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(UnsupportedTrainingSetupError, match="label_smoothing_factor"):
        LayerParallelTrainer(model=tiny_gpt2(), args=_lp_args(tmp_path, label_smoothing_factor=0.1))
    optimizer = torch.optim.SGD(tiny_gpt2().parameters(), lr=0.1)
    with pytest.raises(UnsupportedTrainingSetupError, match="optimizer_cls_and_kwargs"):
        LayerParallelTrainer(model=tiny_gpt2(), args=_lp_args(tmp_path), optimizers=(optimizer, None))
    # Arguments without the flag are checked the same way: the class is what asks for layer-parallel training.
    plain = HighwayTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, hwbp_fidelity_steps=2)
    with pytest.raises(UnsupportedTrainingSetupError, match="hwbp_fidelity_steps"):
        LayerParallelTrainer(model=tiny_gpt2(), args=plain)


def test_layer_parallel_needs_one_process_per_stage(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(HighwayBPError, match="torchrun --nproc_per_node"):
        LayerParallelTrainer(model=tiny_gpt2(), args=_lp_args(tmp_path))


def test_other_trainers_refuse_layer_parallel_arguments(tmp_path):
    for build in (
        lambda: Trainer(model=tiny_gpt2(), args=_lp_args(tmp_path), callbacks=[HighwayCallback()]),
        lambda: HighwayTrainer(model=tiny_gpt2(), args=_lp_args(tmp_path)),
    ):
        with pytest.raises(UnsupportedTrainingSetupError, match="run by hf_hwbp.LayerParallelTrainer"):
            build()


def test_saved_model_loads_with_auto_class(layer_parallel_runs):
    model = AutoModelForCausalLM.from_pretrained(layer_parallel_runs / "gpt2" / "final")
    assert model.config.n_layer == 4
