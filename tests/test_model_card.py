"""Model cards of Highway-BP runs: tagged hf_hwbp, with k, the schedule, the k each step used and the fidelity."""

from __future__ import annotations

import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from trainer_helpers import N_LAYER, make_args, repetitive_data, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_hwbp import HighwayCallback, HighwayTrainer, HighwayTrainingConfig, add_highway_section


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
        callbacks=[HighwayCallback(HighwayTrainingConfig(k=0, group_size=2))],
    )
    trainer.train()
    assert trainer.model.model_tags == ["hf_hwbp"]  # push_to_hub passes model tags to the card
    path = add_highway_section(trainer)
    text = open(path).read()
    assert "| k (Highway iterations) | 0 |" in text and "| layers per Highway block (group_size) | 2 |" in text
    assert "| Highway blocks | 2 |" in text and "not measured" in text


def test_output_folder_of_a_short_from_scratch_run(tmp_path):
    """An in-memory data set, a model built from its config, a run shorter than fidelity_steps: the card says so."""
    import datasets

    data = datasets.Dataset.from_list(repetitive_data())  # no hub builder: builder_name is None
    args = make_args(tmp_path, max_steps=2, hwbp_k=1, hwbp_fidelity_steps=50)
    trainer = HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "out"
    text = (out / "README.md").read_text()
    assert "This model was trained from scratch on an unknown dataset." in text
    assert "fine-tuned version of []" not in text and "None dataset" not in text
    assert "not measured: the run had 2 optimizer steps, fewer than fidelity_steps = 50" in text
    assert HighwayTrainingConfig.from_pretrained(out) == args.highway_config  # hwbp_config.json beside the model
    # training_args.bin is plain TrainingArguments: it unpickles where hf_hwbp is not installed.
    script = (
        "import sys; sys.modules['hf_hwbp'] = None; import torch; "
        f"a = torch.load({str(out / 'training_args.bin')!r}, weights_only=False); "
        "print(type(a).__name__, a.hwbp_config['k'])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.split() == ["TrainingArguments", "1"], done.stderr


def test_trl_card_gets_the_tag(tmp_path):
    trl = pytest.importorskip("trl")
    import datasets

    from hf_hwbp import add_highway_callback
    from hf_hwbp.examples.data import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["highway backpropagation along the residual path"] * 20, 300)
    data = datasets.Dataset.from_dict({"input_ids": [[(i + j) % 16 for j in range(12)] for i in range(4)]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1, save_strategy="no", bf16=False
    )
    trainer = trl.SFTTrainer(model=tiny_gpt2(), args=args, train_dataset=data, processing_class=tokenizer)
    add_highway_callback(trainer, HighwayTrainingConfig(k=1))
    trainer.train()
    trainer.create_model_card()  # TRL's own card, from its own tag list
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {"hf_hwbp", "trl", "sft"} <= set(card.data.tags)
    # A card written without that list gets the tag from add_highway_section.
    path = tmp_path / "out" / "README.md"
    path.write_text(path.read_text().replace("- hf_hwbp\n", ""))
    add_highway_section(trainer)
    assert (
        "hf_hwbp" in ModelCard.load(path).data.tags and "## Training with Highway backpropagation" in path.read_text()
    )


def test_card_of_a_resumed_run_lists_every_step(tmp_path):
    """A run resumed from a checkpoint: "k used" covers the steps trained before the resume too (the schedule is
    pure), as the mean iterations (from the whole log history) do."""

    def trainer(**settings):
        args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **settings)
        return HighwayTrainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(n=8))

    step_schedule = dict(hwbp_k=0, hwbp_k_schedule="step", hwbp_k_step_every=1)
    trainer(**step_schedule).train()
    resumed = trainer(**step_schedule)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    resumed.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| k used | k=0 at step 1; k=1 at step 2; k=2 at step 3; k=3 at step 4 |" in text
    assert "| Highway iterations per backward (mean) | 1.50 |" in text  # (0 + 1 + 2 + 3) / 4

    # Resumed with other settings: the steps before the resume are not claimed.
    other = trainer(hwbp_k=2)
    other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    other.create_model_card()
    text = (tmp_path / "out" / "README.md").read_text()
    not_claimed = "steps 1-2 not recorded (trained before the resume with other settings); k=2 for steps 3-4"
    assert f"| k used | {not_claimed} |" in text
