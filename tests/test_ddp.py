"""DDP parity: a real 2-process run (torch.distributed.run, gloo, CPU) of tests/ddp_worker.py.

Accelerate's own launcher starts several CPU processes only through mpirun, so torch.distributed.run launches the
two ranks; inside them Accelerate (directly, and through HighwayTrainer) sets up the process group and DDP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
K = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        "--out",
        str(out),
        "--k",
        str(K),
    ]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"The 2-process run timed out.\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    assert proc.returncode == 0, (
        f"DDP worker failed (rc {proc.returncode}).\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("part", ["accelerate", "trainer"])
def test_ddp_gradients_match_single_process(ddp_results, part):
    for rank, results in enumerate(ddp_results):
        r = results[part]
        assert r["wrapped_is_ddp"], (rank, r)
        assert r["patched_inner"], (rank, r)
        assert r["iterations"] == K, (rank, r)
        assert r["max_abs_diff_between_ranks"] == 0.0, (rank, r)  # DDP all-reduced the Highway gradients
        assert r["rel_error_vs_single_process"] <= 1e-10, (rank, r)
        assert r["rel_error_vs_exact"] > 1e-4, (rank, r)  # Highway-BP(1) really ran: not the exact gradient


def test_accelerate_ran_multi_cpu_gloo(ddp_results):
    for results in ddp_results:
        assert results["accelerate"]["multi_cpu"] and results["accelerate"]["backend"] == "gloo", results


def test_trainer_patched_before_wrapping(ddp_results):
    for results in ddp_results:
        r = results["trainer"]
        assert r["patched_before_wrap"], r
        assert r["world_size"] == 2 and r["logged_k"] == [K] and r["logged_iterations"] == [K], r
        assert 0.5 < r["fidelity_cosine"][0] <= 1 + 1e-9, r
