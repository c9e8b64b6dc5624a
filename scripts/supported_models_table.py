#!/usr/bin/env python
"""docs/models.md, the supported-models table, generated from the tested zoo (tests/tiny_models.py).

Each row is a model that tests/test_zoo.py builds from a tiny config and patches without ``layers=``:
``ZOO`` entries are checked exact at k = L against autograd and at k = 1, 2 against the independent reference;
``REFUSED`` entries must be refused before any gradient exists, with a message naming a way out (the message shown
is the one the library raises now). Entries the library does not run right yet (``ZOO_PENDING``,
``REFUSAL_PENDING``, tested as strict expected failures) are listed as "other", with the reason.

    python scripts/supported_models_table.py            # print docs/models.md
    python scripts/supported_models_table.py --write    # write it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "models.md"

HEADER = """# Supported models

`patch_model(model, k)` finds a model's residual stack(s) from its structure (docs/algorithm.md: each block maps the
hidden state to one of the same shape and is called once per forward, in order). The table lists every model
that the test suite (`tests/test_zoo.py`) builds from a tiny random configuration (3 layers per stack, hidden size
16 to 32, float64 where the model's kernels allow it, train mode, dropout as shipped) and patches without
`layers=`:

- **exact**: the gradients at k = L equal ordinary backprop's, and at k = 1, 2 those of an independent
  implementation of the definition (`tests/reference.py`);
- **refused**: Highway-BP raises `hf_hwbp.HighwayBPError` before any gradient exists, with the message shown;
  train such a model with ordinary backprop (do not patch it), or pass the stack yourself with `layers=`;
- **other**: the library does not handle the model right yet (the reason is given); do not patch it.

Other model types work too when discovery finds their stack; `patch_model` logs what it found, and
`hf_hwbp.highway_state(model).stacks` shows it. A wider survey, the same checks outside the test suite, over every
model type of the installed transformers (`python tests/zoo_survey.py --all`; 328 of the 344 types its tiny configs
could build are exact, none wrong: `results/zoo/`). Regenerate this page with
`python scripts/supported_models_table.py --write`.
"""


def _zoo():
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    return tiny_models


def _stacks(model) -> str:
    from hf_hwbp.discovery import find_stacks

    try:
        stacks = find_stacks(model)
    except Exception:  # noqa: BLE001 - a refusal at discovery: no stack to show
        return "none"
    return ", ".join(f"`{s.path}` ({len(s)} x {type(s.layers[0]).__name__})" for s in stacks)


def _refusal(entry) -> str:
    """The first line of what the library raises on this entry now (before any gradient), or what else happens."""
    import hf_hwbp

    model, batch = entry.build(), entry.batch()
    try:
        hf_hwbp.patch_model(model, k=1)
        entry.loss(model, batch).backward()
    except hf_hwbp.HighwayBPError as error:
        return str(error).strip().splitlines()[0]
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return "no error"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table() -> str:
    zoo = _zoo()
    rows = []
    for name, entry in sorted(zoo.ZOO.items()):
        stacks = _stacks(entry.build())
        dtype = str(entry.dtype).replace("torch.", "")
        if name in zoo.ZOO_PENDING:
            result = f"other: {zoo.ZOO_PENDING[name]}"
        else:
            result = "exact"
        rows.append((entry.model_type, name, entry.model_class, stacks, dtype, result))
    for name, entry in sorted(zoo.REFUSED.items()):
        stacks = _stacks(entry.build())
        dtype = str(entry.dtype).replace("torch.", "")
        if name in zoo.REFUSAL_PENDING:
            result = f"other: {zoo.REFUSAL_PENDING[name]}"
        else:
            result = f"refused: {_refusal(entry)}"
        rows.append((entry.model_type, name, entry.model_class, stacks, dtype, result))
    rows.sort()
    counts = {kind: sum(r[-1].startswith(kind) for r in rows) for kind in ("exact", "refused", "other")}
    lines = [
        f"{len(rows)} tested set-ups of {len({r[0] for r in rows})} model types: {counts['exact']} exact, "
        f"{counts['refused']} refused with a message, {counts['other']} other.",
        "",
        "| `config.model_type` | set-up | class | stack(s) found | dtype | result |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| `{t}` | {n} | {c} | {_cell(s)} | {d} | {_cell(r)} |" for t, n, c, s, d, r in rows]
    return "\n".join(lines)


def document() -> str:
    return f"{HEADER}\n{table()}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    text = document()
    if args.write:
        DOC.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
