"""Highway-BP under FSDP2: one real 2-process run (``accelerate launch`` with an FSDP2 config, CPU, gloo) of
tests/fsdp_worker.py, which checks many set-ups in one go (raw ``fully_shard`` with both orders of patching and
sharding, ``reshard_after_forward`` True and False, k = 0, 1, 2 and k = L; gradient accumulation; LoRA; a bf16
mixed-precision policy; Accelerate; ``HighwayTrainer``; a plain ``Trainer`` with ``HighwayCallback``). Every case
compares the gathered sharded gradients with single-process ``patch_model`` gradients on the whole batch.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import test_ddp
from fsdp_worker import N_LAYER

K = 1
FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""
FLOAT64 = 1e-10  # float64, the same operations on two half batches, reduce-scattered: rounding only


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    # test_ddp's launcher (accelerate launch --config_file, fresh port, each rank's JSON) with this file's worker
    with mock.patch.object(test_ddp, "WORKER", Path(__file__).with_name("fsdp_worker.py")):
        return test_ddp.accelerate_launch(tmp_path_factory.mktemp("fsdp"), FSDP2_CONFIG)


def test_raw_fully_shard_matches_single_process(results):
    for rank_results in results:
        cases = {name: r for name, r in rank_results["raw"].items() if name.startswith("patch_first")}
        assert len(cases) == 16, sorted(cases)
        for name, r in cases.items():
            assert r["param_type"] == "DTensor", (name, r)  # the model really was sharded
            assert r["rel_error"] <= FLOAT64, (name, r)
            k = int(name.rsplit("=", 1)[1])
            assert r["iterations"] == k, (name, r)
            if k < N_LAYER:
                assert r["rel_error_vs_exact"] > 1e-4, (name, r)  # Highway-BP(k) ran, not backprop
            else:
                assert r["rel_error_vs_exact"] <= FLOAT64, (name, r)  # k >= L is exact


def test_accumulation_and_lora(results):
    for rank_results in results:
        raw = rank_results["raw"]
        assert raw["accumulation,k=1"]["rel_error"] <= FLOAT64, raw["accumulation,k=1"]
        lora = raw["lora,k=1"]
        assert lora["rel_error"] <= FLOAT64 and lora["rel_error_vs_exact"] > 1e-4, lora
        assert lora["trainable"] == 2 * N_LAYER, lora  # lora_A and lora_B of c_attn in every block


def test_mixed_precision_is_as_close_as_fsdp_backprop(results):
    for rank_results in results:
        r = rank_results["raw"]["mixed_precision,k=1"]
        # bf16 parameters and activations (8-bit mantissa): FSDP2 backprop under the same policy lands about
        # 1e-2 from the float64 gradient; Highway-BP under it may not land further from its float64 reference
        # (up to rounding noise of the same size).
        assert r["grad_dtype"] == "torch.float32", r  # reduced in fp32 into the fp32 sharded gradient
        assert 0 < r["backprop_rel_error"] < 0.05, r
        assert r["rel_error"] <= 2 * r["backprop_rel_error"] + 1e-3, r


@pytest.mark.parametrize("part", ["accelerate", "trainer", "callback"])
def test_accelerate_and_trainers(results, part):
    for rank_results in results:
        r = rank_results[part]
        assert r["is_fsdp2"], r
        assert r["rel_error"] <= FLOAT64 and r["rel_error_vs_exact"] > 1e-4, r
    if part == "accelerate":
        assert all(r["accelerate"]["fsdp_version"] == 2 and r["accelerate"]["iterations"] == K for r in results)
    else:
        for rank_results in results:
            r = rank_results[part]
            assert r["patched"] and r["attached"] and r["unpatched_after"] and r["logged_iterations"] == [K], r


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed package")
def test_deepspeed_zero_1_and_2_match_single_process_and_zero_3_is_refused(tmp_path):
    with mock.patch.object(test_ddp, "WORKER", Path(__file__).with_name("fsdp_worker.py")):
        results = test_ddp.accelerate_launch(tmp_path, test_ddp.DDP_CONFIG, "--mode", "deepspeed")
    for rank_results in results:
        for stage in (1, 2):
            for k in (1, N_LAYER):
                r = rank_results[f"zero{stage},k={k}"]
                # float32 (DeepSpeed's CPU path), two half batches reduced: rounding of float32 only
                assert r["rel_error"] <= 1e-6 and r["iterations"] == k, (stage, k, r)
                assert (r["rel_error_vs_exact"] > 1e-4) == (k < N_LAYER), (stage, k, r)
        refusal = rank_results["zero3"]
        assert refusal["error"] == "UnsupportedDistributedSetupError", refusal
        assert "does not support DeepSpeed ZeRO-3" in refusal["message"], refusal
