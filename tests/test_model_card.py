"""Model cards of Highway-BP runs: tagged hf_hwbp, with k, the schedule, the k each step used and the fidelity."""

from __future__ import annotations

from huggingface_hub import ModelCard
from trainer_helpers import N_LAYER, make_args, repetitive_data, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_hwbp import HighwayCallback, HighwayConfig, add_highway_section
from hf_hwbp.trainer import HighwayTrainer


def test_highway_trainer_card(tmp_path):
    args = make_args(
        tmp_path, max_steps=4, hwbp_k=1, hwbp_k_schedule="exact_last", hwbp_exact_last_steps=1, hwbp_fidelity_steps=2
    )
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data())
    trainer.train()
    trainer.create_model_card(model_name="tiny-highway", tags="test")
    path = tmp_path / "out" / "README.md"
    card = ModelCard.load(path)
    assert {"hf_hwbp", "test"} <= set(card.data.tags)
    text = path.read_text()
    assert "Highway-BP" in text and "| k (Highway iterations) | 1 |" in text
    assert "exact_last: k = 1, exact backprop for the last 1 optimizer steps" in text
    assert f"k=1 for steps 1-3; k={N_LAYER} at step 4" in text  # what the schedule really did
    fidelity = [e["hwbp_fidelity/cosine"] for e in trainer.state.log_history if "hwbp_fidelity/cosine" in e]
    assert len(fidelity) == 2 and f"cosine {fidelity[-1]:.6f} at step 4" in text
    assert '"k_schedule": "exact_last"' in text  # the settings as JSON
    # Writing the card again replaces the section instead of appending a second one.
    trainer.create_model_card()
    assert path.read_text().count("## Training with Highway backpropagation") == 1


def test_any_trainer_card(tmp_path):
    args = TrainingArguments(  # plain arguments: the settings are the callback's
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2, save_strategy="no"
    )
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=repetitive_data(),
        callbacks=[HighwayCallback(HighwayConfig(k=0, group_size=2))],
    )
    trainer.train()
    assert trainer.model.model_tags == ["hf_hwbp"]  # push_to_hub passes model tags to the card
    path = add_highway_section(trainer)
    text = open(path).read()
    assert "| k (Highway iterations) | 0 |" in text and "| layers per Highway block (group_size) | 2 |" in text
    assert "| Highway blocks | 2 |" in text and "not measured" in text
