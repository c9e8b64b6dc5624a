"""Real 2-process runs through ``accelerate launch --config_file`` (CPU, gloo) of tests/ddp_worker.py.

- DDP (``distributed_type: MULTI_GPU``; on a CPU-only machine the worker's ``use_cpu=True`` makes Accelerate use
  MULTI_CPU with gloo): each rank's gradients after a Highway step equal single-process Highway-BP gradients on the
  concatenated batch, through raw Accelerate, ``HighwayTrainer`` and a plain ``Trainer`` with ``HighwayCallback``,
  with the package's defaults (k = L: the model's own backward) and with the Highway engine at exact steps.
- FSDP1 (``distributed_type: FSDP``, ``fsdp_version: 1``): Highway-BP refuses it when the Trainer is built, with a
  message that names FSDP1 and the ways out (FSDP2 runs: tests/test_fsdp.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_worker import N_LAYER

WORKER = Path(__file__).with_name("ddp_worker.py")
K = 1
PARTS = ["accelerate", "trainer", "callback"]

DDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
rdzv_backend: static
same_network: true
"""
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(out: Path, config: str, *worker_args: str) -> list[dict]:
    """Run the worker on 2 processes with `accelerate launch --config_file`; return each rank's JSON."""
    config_file = out / "accelerate_config.yaml"
    config_file.write_text(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for name in [n for n in env if n.startswith("ACCELERATE_")]:  # only the config file decides
        env.pop(name)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        str(_free_port()),
        str(WORKER),
        "--out",
        str(out),
        "--k",
        str(K),
        *worker_args,
    ]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"The 2-process run timed out.\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")
    assert proc.returncode == 0, (
        f"worker failed (rc {proc.returncode}).\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    return accelerate_launch(tmp_path_factory.mktemp("ddp"), DDP_CONFIG)


@pytest.mark.parametrize("part", PARTS)
def test_ddp_gradients_match_single_process(ddp_results, part):
    for rank, results in enumerate(ddp_results):
        assert len(results[part]) == (5 if part == "accelerate" else 3), sorted(results[part])
        for name, r in results[part].items():
            k, engine = int(name.rsplit("=", 1)[1]), "mode=engine" in name
            assert r["wrapped_is_ddp"], (rank, name, r)
            assert r["max_abs_diff_between_ranks"] == 0.0, (rank, name, r)  # DDP all-reduced the Highway gradients
            # float64, the same operations in another order (two half batches, all-reduce): rounding only
            assert r["rel_error_vs_single_process"] <= 1e-10, (rank, name, r)
            # Highway-BP(k) really ran below L (not the exact gradient); exact at k = L
            assert (r["rel_error_vs_exact"] > 1e-4) == (k < N_LAYER), (rank, name, r)
            if part == "accelerate":  # at k = L the defaults run the model's own backward, the engine records
                assert r["engine_ran"] == (k < N_LAYER or engine), (rank, name, r)


def test_accelerate_ran_multi_cpu_gloo(ddp_results):
    for results in ddp_results:
        for name, r in results["accelerate"].items():
            assert r["multi_cpu"] and r["backend"] == "gloo", (name, r)
            assert r["iterations"] == int(name.rsplit("=", 1)[1]) and r["patched_inner"], (name, r)


@pytest.mark.parametrize("part", ["trainer", "callback"])
def test_trainers_patch_inside_ddp_and_log(ddp_results, part):
    for results in ddp_results:
        for name, r in results[part].items():
            k = int(name.rsplit("=", 1)[1])
            assert r["patched_during_training"] and r["unpatched_after"] and r["wrapped_inner_is_model"], r
            assert r["world_size"] == 2 and r["logged_k"] == [k] and r["logged_iterations"] == [k], r
    for name in ddp_results[0][part]:
        fidelity = [results[part][name]["fidelity_cosine"][0] for results in ddp_results]
        if part == "trainer":  # HighwayTrainer measures fidelity; the callback alone cannot
            assert all(0.5 < c <= 1 + 1e-9 for c in fidelity), (name, fidelity)
        else:
            assert fidelity == [None, None], name


def test_fsdp_is_refused_with_a_clear_message(tmp_path):
    for result in accelerate_launch(tmp_path, FSDP_CONFIG, "--mode", "refusal"):
        assert result["error"] == "UnsupportedDistributedSetupError", result
        message = result["message"]
        assert "does not support FSDP1" in message and "accelerate launch" in message, message
        assert "DDP" in message and "hf_hwbp.parallel" in message and "use_highway_bp=False" in message, message
