"""Run the planner's N-process measurement (``hf_hwbp.planner.worker``) from the user's process.

The model (unpatched) and the example batch are saved to a temporary folder; ``torch.distributed.run`` starts N
workers on this machine (gloo on CPU with the threads shared out, NCCL with one GPU per rank); rank 0's progress
lines drive a tqdm bar. A failed run raises ``RuntimeError`` with the end of the workers' output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..parallel.arch import get_module, recipe_for
from ..parallel.graph import BACKPROP_SCHEDULES
from ..parallel.simulate import runnable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_parallel_runs(model: nn.Module, processes: int, microbatches: list[int], ks: list[int]) -> int:
    """How many methods the workers time at S = N (pipeline backprop, torch's schedules, Highway-BP per k)."""
    recipe = recipe_for(model)
    num_layers = len(get_module(model, recipe.layers))
    torch_schedules = BACKPROP_SCHEDULES if recipe.labels_from_input else ()
    return sum(1 + len(ks) + sum(runnable(s, processes, m, num_layers) for s in torch_schedules) for m in microbatches)


def run_workers(
    model: nn.Module,
    batch: dict,
    *,
    processes: int,
    ks: list[int],
    microbatches: list[int],
    map_microbatches: list[int],
    layer_parallel: bool,
    message_bytes: int,
    rounds: int,
    warmup: int = 2,
    threads: int,
    progress: bool = True,
    timeout: float | None = None,
) -> dict:
    """Launch the workers and return rank 0's results (see ``hf_hwbp.planner.worker``)."""
    device = next(model.parameters()).device
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise ValueError(
            f"--processes {processes} on GPUs needs one GPU per process; this machine has {torch.cuda.device_count()}."
        )
    with tempfile.TemporaryDirectory(prefix="hf_hwbp_plan_") as tmp:
        tmp = Path(tmp)
        torch.save(model, tmp / "model.pt")
        torch.save({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, tmp / "batch.pt")
        spec = {
            "model": str(tmp / "model.pt"),
            "batch": str(tmp / "batch.pt"),
            "out": str(tmp / "result.json"),
            "device": device.type,
            "threads": threads,
            "ks": ks,
            "microbatches": microbatches,
            "map_microbatches": map_microbatches,
            "layer_parallel": layer_parallel,
            "layer_parallel_runs": layer_parallel_runs(model, processes, microbatches, ks) if layer_parallel else 0,
            "message_bytes": message_bytes,
            "rounds": rounds,
            "warmup": warmup,
            "calib_reps": 3,
            "round_calib_reps": 1,
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "hf_hwbp.planner.worker",
            str(tmp / "spec.json"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        log = deque(maxlen=60)
        with open(tmp / "stderr.txt", "w+") as stderr:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            bar = tqdm(desc=f"{processes} processes", unit="step", disable=not progress, leave=False)
            for line in proc.stdout:
                if line.startswith("PLAN-TOTAL "):
                    bar.total = int(line.split()[1])
                    bar.refresh()
                elif line.startswith("PLAN-TICK"):
                    bar.update()
                else:
                    log.append(line.rstrip())
            code = proc.wait(timeout)
            bar.close()
            stderr.seek(0)
            errors = stderr.read().strip().splitlines()[-40:]
        if code != 0 or not (tmp / "result.json").is_file():
            tail = "\n".join([*log, *errors][-40:])
            raise RuntimeError(f"The {processes}-process measurement failed (exit code {code}):\n{tail}")
        return json.loads((tmp / "result.json").read_text())


__all__ = ["layer_parallel_runs", "run_workers"]
