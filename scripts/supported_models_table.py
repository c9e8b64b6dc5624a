#!/usr/bin/env python
"""The README's supported-models table, generated from the tested zoo (``ZOO`` in tests/tiny_models.py).

Each row is an architecture that tests/test_zoo.py builds from a tiny config, patches without ``layers=``, and
checks exact at k >= L against autograd and at k = 1, 2 against the independent reference. The stack paths are
what discovery finds on that class.

    python scripts/supported_models_table.py            # print the table
    python scripts/supported_models_table.py --write    # put it in README.md, between the zoo-table markers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def table() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from tiny_models import ZOO

    from hf_hwbp.discovery import find_stacks

    lines = [
        "| `config.model_type` | class tested | stack(s) found | tested in |",
        "|---|---|---|---|",
    ]
    for _, entry in sorted(ZOO.items()):
        stacks = find_stacks(entry.build())
        found = ", ".join(f"`{s.path}` ({len(s)} x {type(s.layers[0]).__name__})" for s in stacks)
        dtype = str(entry.dtype).replace("torch.", "")
        lines.append(f"| `{entry.model_type}` | {entry.model_class} | {found} | {dtype} |")
    return "\n".join(lines)


def with_table(readme: str, generated: str) -> str:
    """README text with the block between the markers replaced by ``generated``."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise SystemExit(f"README.md has no {START} ... {END} block to fill.")
    return f"{head}{START}\n{generated}\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    generated = table()
    if args.write:
        readme = ROOT / "README.md"
        readme.write_text(with_table(readme.read_text(), generated))
    else:
        print(generated)


if __name__ == "__main__":
    main()
