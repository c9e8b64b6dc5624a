"""The Highway-BP section of a model card: how the model was trained (k, schedule, measured gradient fidelity).

``HighwayTrainer.create_model_card`` (called by ``push_to_hub`` and by the example scripts) writes the Trainer's own
card with the ``hf_hwbp`` tag and appends this section. With another Trainer (TRL's, ...) call
``add_highway_section(trainer)`` after the Trainer wrote its card.
"""

from __future__ import annotations

import os
from typing import Any

from .callback import MODEL_TAG, HighwayCallback
from .training_config import HighwayTrainingConfig

SECTION_START = "<!-- hf_hwbp: start -->"
SECTION_END = "<!-- hf_hwbp: end -->"
FIDELITY_KEY = "hwbp_fidelity/cosine"


def _k_history_text(k_history: list[tuple[int, int]], last_step: int | None) -> str:
    if not k_history:
        return "-"
    parts = []
    if k_history[0][0] > 1:  # a resumed run whose earlier steps the callback could not account for
        parts.append(f"steps 1-{k_history[0][0] - 1} not recorded (trained before the resume with other settings)")
    for i, (start, k) in enumerate(k_history):
        end = k_history[i + 1][0] - 1 if i + 1 < len(k_history) else last_step
        parts.append(f"k={k} for steps {start}-{end}" if end is not None and end != start else f"k={k} at step {start}")
    return "; ".join(parts)


def highway_model_card_section(
    config: HighwayTrainingConfig,
    log_history: list[dict[str, Any]],
    *,
    k_history: list[tuple[int, int]] | None = None,
    num_blocks: int | None = None,
) -> str:
    """Markdown: the Highway settings, the k each step used, mean iterations and measured gradient fidelity."""
    from . import __version__

    iterations = [e["hwbp_iterations"] for e in log_history if "hwbp_iterations" in e]
    fidelity = [(e.get("step"), e[FIDELITY_KEY]) for e in log_history if FIDELITY_KEY in e]
    last_step = max((e["step"] for e in log_history if "step" in e), default=None)
    k_text = "auto (up to the number of Highway blocks, adaptive stop)" if config.k == "auto" else str(config.k)
    rows = [
        ("k (Highway iterations)", k_text),
        ("k schedule", config.describe_schedule()),
        ("k used", _k_history_text(k_history or [], last_step)),
        ("adaptive stop (tol)", "off" if config.tol is None else f"{config.tol:g}"),
        ("layers per Highway block (group_size)", str(config.group_size)),
    ]
    if num_blocks is not None:
        rows.append(("Highway blocks", str(num_blocks)))
    rows.append(
        (
            "Highway iterations per backward (mean)",
            f"{sum(iterations) / len(iterations):.2f}" if iterations else "not logged",
        )
    )
    if fidelity:
        cosines = [c for _, c in fidelity]
        step, last = fidelity[-1]
        fidelity_text = (
            f"cosine {last:.6f} at step {step}; mean {sum(cosines) / len(cosines):.6f} over {len(cosines)} "
            "measurement(s)"
        )
    elif config.fidelity_steps and last_step is not None and last_step < config.fidelity_steps:
        fidelity_text = (
            f"not measured: the run had {last_step} optimizer steps, fewer than fidelity_steps = "
            f"{config.fidelity_steps} (it is measured every fidelity_steps steps)"
        )
    elif config.fidelity_steps:
        fidelity_text = "not measured (fidelity is measured by HighwayTrainer; this card comes from another Trainer)"
    else:
        fidelity_text = "not measured (HighwayTrainingConfig.fidelity_steps = 0)"
    rows.append(("gradient fidelity (Highway vs exact gradient, all trainable parameters)", fidelity_text))
    lines = [
        SECTION_START,
        "## Training with Highway backpropagation",
        "",
        "This model was trained with **Highway-BP** (Fagnou et al., *Accelerated Training through Iterative Gradient "
        "Propagation Along the Residual Path*, ICLR 2025): every block of the residual stack got the gradient of the "
        f"paths that cross at most k blocks, computed by `hf_hwbp` {__version__}. Inference is the model's own "
        "forward: nothing of Highway-BP is needed to use it.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "Settings (`hf_hwbp.HighwayTrainingConfig`):",
        "",
        "```json",
        config.to_json_string().rstrip(),
        "```",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def with_tag(text: str, tag: str = MODEL_TAG) -> str:
    """The model card ``text`` with ``tag`` in its YAML front matter's ``tags`` (added where missing): TRL's trainers
    write their card from their own tag list, not from the model's tags."""
    if not text.startswith("---\n") or "\n---" not in text[3:]:
        return f"---\ntags:\n- {tag}\n---\n\n{text}"
    end = text.index("\n---", 3)
    head, rest = text[4:end], text[end:]
    lines = head.split("\n")
    if f"- {tag}" in lines or f"  - {tag}" in lines:
        return text
    if "tags:" in lines:
        i = lines.index("tags:")
        indent = "  " if i + 1 < len(lines) and lines[i + 1].startswith("  - ") else ""
        lines.insert(i + 1, f"{indent}- {tag}")
    else:
        lines += ["tags:", f"- {tag}"]
    return "---\n" + "\n".join(lines) + rest


def write_section(readme_path: str, section: str) -> None:
    """Append ``section`` to the model card at ``readme_path`` (replacing an earlier Highway section); make sure the
    card carries the ``hf_hwbp`` tag."""
    text = ""
    if os.path.exists(readme_path):
        with open(readme_path, encoding="utf-8") as f:
            text = f.read()
    text = with_tag(text)
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(text)


def find_highway_callback(trainer) -> HighwayCallback | None:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, HighwayCallback)), None)


def add_highway_section(trainer, output_dir: str | None = None) -> str | None:
    """Add the Highway section to ``output_dir/README.md`` (the Trainer's card; written first if missing).

    Returns the card's path, or None on processes other than the main one or when the run did not use Highway-BP.
    """
    if not trainer.is_world_process_zero():
        return None
    callback = find_highway_callback(trainer)
    if callback is None or not callback.enabled or callback.config is None:
        return None
    output_dir = output_dir or trainer.args.output_dir
    readme = os.path.join(output_dir, "README.md")
    if not os.path.exists(readme):
        trainer.create_model_card(tags=[MODEL_TAG])
    section = highway_model_card_section(
        callback.config,
        trainer.state.log_history,
        k_history=callback.k_history,
        num_blocks=callback.num_blocks,
    )
    write_section(readme, section)
    return readme


__all__ = ["add_highway_section", "highway_model_card_section", "with_tag", "write_section"]
