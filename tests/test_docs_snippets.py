"""Every code block of README.md and docs/*.md, run as written.

- ``python`` blocks run in order, page by page, in one namespace per page (as a reader runs them top to bottom);
- ``bash`` commands are checked without running what takes minutes: an example script's or a benchmark's flags are
  parsed by that script's own parser (the scripts' checks of flag combinations included, except the launch check of
  a command that a launcher, ``torchrun`` or ``accelerate launch``, starts with several processes);
- ``yaml`` blocks (Accelerate config files) load as Accelerate reads a config file.

Nothing is skipped silently: a block that cannot run here is in ``NOT_RUN`` below with the reason, and every entry
there must still match a block (a stale entry fails). A command that is not run is in ``NOT_RUN_COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ROOT / "scripts"

NOT_RUN: dict[tuple[str, str], str] = {
    # (page, a line of the block): why it does not run in this test
    ("docs/layer_parallel.md", "HighwayTrainingArguments(output_dir="): (
        "one pipeline stage per process: needs torchrun --nproc_per_node >= 2 (tests/test_layer_parallel_trainer.py "
        "runs this path)"
    ),
    ("docs/layer_parallel.md", "runner = LayerParallelHighway(model"): (
        "one pipeline stage per process: needs torchrun (tests/test_parallel.py runs the runner)"
    ),
    ("docs/fsdp.md", "fully_shard(block)"): "FSDP2 needs a process group: torchrun (tests/test_fsdp.py runs it)",
    ("docs/recurrent.md", "gru = HighwayGRU(input_size"): (
        "reads names the page defines only in prose (input_size, existing_nn_gru, x, loss)"
    ),
}

NOT_RUN_COMMANDS: dict[str, str] = {
    # a command's start: why it is not run
    "pip install": "installs packages",
    "python -m pytest": "the test suite itself",
    "ruff ": "the linter (the suite's lint step)",
    "torchrun --nproc_per_node 4 train.py": "your own training script",
    "accelerate launch --config_file fsdp2.yaml scripts/run_clm_hwbp.py ...": "'...' stands for your flags",
}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence
    language: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, current, start, language = [], None, 0, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and current is None:
            current, start, language = [], number, fence.group(1)
        elif line.startswith("```") and current is not None:
            blocks.append(Block(str(path.relative_to(ROOT)), start, language, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def not_run_reason(block: Block) -> str | None:
    reasons = [reason for (page, line), reason in NOT_RUN.items() if page == block.page and line in block.text]
    return reasons[0] if reasons else None


def test_every_not_run_entry_names_one_block():
    for page, line in NOT_RUN:
        matches = [b for b in ALL_BLOCKS if b.page == page and line in b.text]
        assert len(matches) == 1, f"NOT_RUN entry ({page!r}, {line!r}) matches {len(matches)} blocks: update it"
    languages = {b.language for b in ALL_BLOCKS}
    assert languages <= {"python", "bash", "yaml", "text"}, "a block language this test does not know (text: output)"


# ----- python --------------------------------------------------------------------------------------------------------
PYTHON_PAGES = sorted({b.page for b in ALL_BLOCKS if b.language == "python"})


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the snippets write ("out", ...) lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = types.ModuleType(f"docs_{Path(page).stem}")  # a real module: what the page defines pickles (a Trainer
    monkeypatch.setitem(sys.modules, module.__name__, module)  # saves its arguments' class with torch.save)
    namespace = module.__dict__
    ran = 0
    for block in (b for b in ALL_BLOCKS if b.page == page and b.language == "python"):
        if not_run_reason(block) is not None:
            continue
        code = compile(block.text, f"{block} (python block)", "exec")
        exec(code, namespace)  # noqa: S102 - the documentation's own code
        ran += 1
    assert ran or all(not_run_reason(b) for b in ALL_BLOCKS if b.page == page and b.language == "python")


# ----- yaml (Accelerate config files) --------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "yaml"], ids=str)
def test_accelerate_config_files_load(block, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / "config.yaml"
    path.write_text(block.text)
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type is not None


# ----- bash ----------------------------------------------------------------------------------------------------------
def commands(block: Block) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, ``a && b`` split."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


BASH_COMMANDS = [(block, command) for block in ALL_BLOCKS if block.language == "bash" for command in commands(block)]


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only():
    """``argparse.ArgumentParser.parse_args`` (a benchmark's main) or ``HfArgumentParser.parse_args_into_dataclasses``
    (the planner's) parses, then stops the program right there."""
    from transformers import HfArgumentParser

    original = argparse.ArgumentParser.parse_args
    original_hf = HfArgumentParser.parse_args_into_dataclasses

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    def parse_args_into_dataclasses(self, *args, **kwargs):
        raise _Parsed(original_hf(self, *args, **kwargs))

    argparse.ArgumentParser.parse_args = parse_args
    HfArgumentParser.parse_args_into_dataclasses = parse_args_into_dataclasses
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original
        HfArgumentParser.parse_args_into_dataclasses = original_hf


def check_script_flags(script: str, args: list[str], launched: bool) -> None:
    sys.path.insert(0, str(SCRIPTS))
    try:
        module = importlib.import_module(Path(script).stem)
    finally:
        sys.path.remove(str(SCRIPTS))
    if launched:  # started with several processes: everything but the launch check
        from hf_hwbp.examples import parse_args_with_defaults

        parse_args_with_defaults(module.ARGUMENT_TYPES, args, module.script_defaults, prog=Path(script).name)
    else:
        module.parse_args(args)


def check_module_flags(name: str, args: list[str], monkeypatch) -> None:
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [name, *args])
    with parse_only(), pytest.raises(_Parsed):
        module.main()


@pytest.mark.parametrize("block, command", BASH_COMMANDS, ids=[f"{b}:{c[:60]}" for b, c in BASH_COMMANDS])
def test_commands_parse(block, command, monkeypatch, tmp_path):
    reason = next((why for start, why in NOT_RUN_COMMANDS.items() if command.startswith(start)), None)
    if reason is not None:
        return  # listed in NOT_RUN_COMMANDS, with its reason
    monkeypatch.chdir(ROOT)
    words = shlex.split(command)
    launched = words[0] in ("torchrun", "accelerate")
    if words[0] == "torchrun":
        words = words[1:]
        while words and words[0].startswith("--"):  # torchrun's own flags
            words = words[2:] if "=" not in words[0] else words[1:]
        words = ["python", *words]
    elif words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words and words[0].startswith("--"):
            words = words[2:]
        words = ["python", *words]
    assert words[0] == "python", f"{block}: a command this test does not know: {command!r} (add it to NOT_RUN_COMMANDS)"
    if words[1] == "-m":
        check_module_flags(words[2], words[3:], monkeypatch)
    else:
        assert words[1].startswith("scripts/"), command
        check_script_flags(words[1], words[2:], launched)


# ----- numbers the docs state that the code or the generated pages decide -------------------------------------------
def test_the_readme_counts_the_tested_models_as_docs_models_does():
    pattern = r"^(\d+ tested set-ups of \d+ model types: \d+ exact, \d+ refused with a message)"
    summary = re.search(pattern, (ROOT / "docs" / "models.md").read_text(), re.M)
    assert summary, "docs/models.md lost its summary line"
    assert summary.group(1) in " ".join((ROOT / "README.md").read_text().split())


def test_the_docs_give_auto_its_default_tolerance():
    from hf_hwbp.training_config import AUTO_DEFAULT_TOL

    readme = " ".join((ROOT / "README.md").read_text().split())
    trainer = " ".join((ROOT / "docs" / "trainer.md").read_text().split())
    assert f"adaptive stop at its default tol, {AUTO_DEFAULT_TOL:g}" in readme
    assert f"at its default tol, {AUTO_DEFAULT_TOL:g}, it ran" in readme
    assert f"adaptive stop at `tol` (default {AUTO_DEFAULT_TOL:g}," in trainer
