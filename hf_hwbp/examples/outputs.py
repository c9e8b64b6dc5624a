"""What an example script prints last: where its outputs are, in one line."""

from __future__ import annotations

import os


def outputs_line(output_dir: str, comparison_dir: str | None = None) -> str:
    """One line naming the folder with the model, its card and its metrics (and the comparison's, if any)."""
    files = [
        name
        for name in ("README.md", "all_results.json", "hwbp_config.json")
        if os.path.isfile(os.path.join(output_dir, name))
    ]
    line = f"Done: the model, its card and metrics are in {output_dir} ({', '.join(files)})"
    if comparison_dir is not None:
        line += f"; the comparison with backprop in {comparison_dir} (comparison.md, loss_curves.png)"
    return line + "."


__all__ = ["outputs_line"]
