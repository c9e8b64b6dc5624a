"""Count junit XMLs of the suite per family and mode: ``python -m tests.transformers_suite.summarize run.xml...``
(``.xml.gz`` too).

Prints a Markdown table (passed / failed / xfailed, i.e. documented refusals or k = 1 differences / skipped) and the
failures with their first message line. pytest writes an expected failure as a ``skipped`` element of type
``pytest.xfail``; a strict one that passed (XPASS(strict)) as a ``failure``.
"""

from __future__ import annotations

import argparse
import gzip
import xml.etree.ElementTree as ET
from collections import defaultdict

from .modes import MODES


def summarize(paths: list[str]) -> str:
    """The table and the failures of the runs in ``paths``; a test in several files counts as in the last one (a
    re-run of some families after a first run of all)."""
    cases: dict[tuple[str, str], ET.Element] = {}
    for path in paths:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:  # results/ keeps them gzipped
            root = ET.parse(f).getroot()
        for case in root.iter("testcase"):
            cases[(case.get("classname", "").rsplit(".", 1)[-1], case.get("name"))] = case
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    failures: list[str] = []
    for (cls, name), case in cases.items():
        family, _, mode = cls.rpartition("_")
        if mode not in MODES:
            continue
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
                first = (child.get("message") or "").strip().splitlines()[:1]
                failures.append(f"- `{cls}::{name}`: {first[0][:200] if first else child.tag}")
            elif child.tag == "skipped" and status != "failed":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        counts[(family, mode)][status] += 1
    lines = [
        "| family | mode | passed | failed | xfailed (documented) | skipped |",
        "|---|---|---|---|---|---|",
    ]
    for (family, mode), c in sorted(counts.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        lines.append(f"| {family} | {mode} | {c['passed']} | {c['failed']} | {c['xfailed']} | {c['skipped']} |")
    if failures:
        lines += ["", "Failures:", "", *failures]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("junit_xml", nargs="+")
    print(summarize(parser.parse_args().junit_xml))


if __name__ == "__main__":
    main()
