"""One rank of the LayerParallelTrainer runs (launched by tests/test_layer_parallel_trainer.py with torchrun).

Every part trains a tiny float64 model (dropout 0) with ``LayerParallelTrainer`` (``layer_parallel=True``) on 2 ranks
(gloo, CPU), from the settings in ``tests/test_layer_parallel_trainer.py`` (``PARTS``; the test runs the same
settings single-process, without ``layer_parallel``, as the reference), and writes into ``--out``:

- ``<part>/rank<r>.json``: this rank's ``log_history``, its stage's parameter names, the train metrics;
- ``<part>/final``: ``trainer.save_model()`` (every rank calls it; the main process writes the gathered model);
- for the "gpt2" part, a second run resumed from ``checkpoint-2`` of the first: ``<part>/resumed`` and its logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_layer_parallel_trainer import PARTS, make_trainer  # noqa: E402


def run_part(name: str, out: Path) -> None:
    folder = out / name
    trainer = make_trainer(name, folder / "run", layer_parallel=True)  # its Accelerator joins the process group
    rank = dist.get_rank()
    own = {id(p) for p in trainer.layer_parallel_training().runner.parameters()}
    result = trainer.train()
    trainer.save_model(str(folder / "final"))
    record = {
        "log_history": trainer.state.log_history,
        "stage_params": [n for n, p in trainer.model.named_parameters() if id(p) in own],
        "metrics": result.metrics,
        "eval": trainer.evaluate() if "eval" in PARTS[name] else None,
    }
    if PARTS[name].get("resume"):
        resumed = make_trainer(name, folder / "resumed_run", layer_parallel=True)
        resumed.train(resume_from_checkpoint=str(folder / "run" / "checkpoint-2"))
        resumed.save_model(str(folder / "resumed"))
        record["resumed_log_history"] = resumed.state.log_history
    (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.parts.split(","):
        print(f"[rank {os.environ.get('RANK')}] part {name}", flush=True)  # torchrun shows it when a part fails
        run_part(name, Path(args.out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
