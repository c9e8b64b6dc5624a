"""Highway-BP under FSDP2.

One real 2-process run (``accelerate launch`` with an FSDP2 config, CPU, gloo) of tests/fsdp_worker.py checks many
set-ups in one go, none of which calls ``hf_hwbp.fsdp.attach``: raw ``fully_shard`` with both orders of patching
and sharding, ``reshard_after_forward`` True and False, both lifecycles, k = 0, 1, 2 and L with the package's
defaults and k = L with the Highway engine at exact steps; gradient accumulation; LoRA; a bf16 mixed-precision
policy; a block split over units; Accelerate in both orders; ``HighwayTrainer`` and a plain ``Trainer`` with
``HighwayCallback``; the set-ups that are refused. Every case compares the gathered sharded gradients with
single-process ``patch_model`` gradients on the whole batch.

In-process (a one-process gloo group): torch still has every private name of FSDP2 that ``hf_hwbp.fsdp`` reads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

import pytest
import test_ddp
import torch
import torch.distributed as dist
from fsdp_worker import CASES, N_LAYER

from hf_hwbp import fsdp as hw_fsdp

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
WAY_OUT = "fully_shard(model)"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    # test_ddp's launcher (accelerate launch --config_file, fresh port, each rank's JSON) with this file's worker
    with mock.patch.object(test_ddp, "WORKER", Path(__file__).with_name("fsdp_worker.py")):
        return test_ddp.accelerate_launch(tmp_path_factory.mktemp("fsdp"), FSDP2_CONFIG)


def _highway_all_gathers(k: int, mode: str) -> int:
    """All-gathers of one block at a time in a Highway backward of GPT-2 (whose stack input needs a gradient): sweep n
    (n = 0..k-1) runs a fresh VJP of blocks 1..L-n (the blocks above reuse theirs), then one parameter VJP per block.
    None at an exact step run by the model's own backward (FSDP's own backward gathers)."""
    if k >= N_LAYER and mode == "defaults":
        return 0
    return sum(N_LAYER - n for n in range(min(k, N_LAYER))) + N_LAYER


def _check_exact(name: str, r: dict, k: int) -> None:
    assert r["rel_error"] <= FLOAT64, (name, r)
    assert r["iterations"] == k, (name, r)
    if k < N_LAYER:
        assert r["rel_error_vs_exact"] > 1e-4, (name, r)  # Highway-BP(k) ran, not backprop
    else:
        assert r["rel_error_vs_exact"] <= FLOAT64, (name, r)  # k >= L is exact


def test_raw_fully_shard_connects_itself_in_both_orders(results):
    for rank_results in results:
        cases = {n: r for n, r in rank_results["raw"].items() if n.startswith("patch_first")}
        assert len(cases) == 2 * 3 * len(CASES), sorted(cases)
        for name, r in cases.items():
            assert r["param_type"] == "DTensor" and r["attached"], (name, r)  # sharded, connected with no call
            _check_exact(name, r, int(name.rsplit("=", 1)[1]))


def test_per_block_lifecycle_gathers_one_block_at_a_time(results):
    for rank_results in results:
        for name, r in rank_results["raw"].items():
            if not name.startswith("patch_first") or "raf=True,lifecycle=per_block" not in name:
                continue
            k, mode = int(name.rsplit("=", 1)[1]), name.split("mode=")[1].split(",")[0]
            stats = r["stats"]
            expected = _highway_all_gathers(k, mode)
            assert stats["gathers"] + stats["prefetches"] == expected, (name, stats)
            if expected:  # the block whose VJP runs and the one prefetched for the next VJP, never more
                assert stats["peak_groups"] == 2 and stats["reduces"] == N_LAYER, (name, stats)
            else:
                assert stats["peak_groups"] == 0 and stats["reduces"] == 0, (name, stats)


def test_keep_gathered_and_no_reshard_gather_once(results):
    for rank_results in results:
        for name, r in rank_results["raw"].items():
            if not name.startswith("patch_first") or ("lifecycle=per_block" in name and "raf=True" in name):
                continue
            k, mode = int(name.rsplit("=", 1)[1]), name.split("mode=")[1].split(",")[0]
            stats = r["stats"]
            if _highway_all_gathers(k, mode) == 0:
                continue  # FSDP's own backward
            assert stats["reduces"] == N_LAYER, (name, stats)  # each block reduce-scattered at its parameter step
            if "raf=False" in name:  # gathered since the forward: nothing to gather again
                assert stats["gathers"] + stats["prefetches"] == 0, (name, stats)
            else:  # gathered once each (as FSDP's backward), the whole stack at once from the first sweep on
                assert stats["gathers"] + stats["prefetches"] == N_LAYER, (name, stats)
                assert stats["peak_groups"] == (N_LAYER if k > 0 else 2), (name, stats)


def test_accumulation_two_forwards_lora_and_a_split_block(results):
    for rank_results in results:
        raw = rank_results["raw"]
        accumulation = {n: r for n, r in raw.items() if n.startswith("accumulation")}
        assert len(accumulation) == 4 and all(r["rel_error"] <= FLOAT64 for r in accumulation.values()), accumulation
        two = raw["two_forwards,k=1"]  # two records of the stack, one backward: each gathers block by block
        assert two["rel_error"] <= FLOAT64, two
        assert two["stats"]["reduces"] == 2 * N_LAYER and two["stats"]["peak_groups"] == 2, two
        lora = raw["lora,k=1"]
        assert lora["rel_error"] <= FLOAT64 and lora["rel_error_vs_exact"] > 1e-4, lora
        assert lora["trainable"] == 2 * N_LAYER, lora  # lora_A and lora_B of c_attn in every block
        for k, mode in [(1, "defaults"), (N_LAYER, "engine")]:
            split = raw[f"split,mode={mode},k={k}"]
            _check_exact("split", split, k)
            # attention and MLP units are reduced at their block's parameter step; the root's unit (layer norms)
            # stays gathered: the unit of the block at work, the one prefetched, and the root's
            assert split["stats"]["reduces"] == 2 * N_LAYER and split["stats"]["peak_groups"] == 5, split


def test_mixed_precision_is_as_close_as_fsdp_backprop(results):
    for rank_results in results:
        r = rank_results["raw"]["mixed_precision,k=1"]
        # bf16 parameters and activations (8-bit mantissa): FSDP2 backprop under the same policy lands about
        # 1e-2 from the float64 gradient; Highway-BP under it may not land further from its float64 reference
        # (up to rounding noise of the same size).
        assert r["grad_dtype"] == "torch.float32", r  # reduced in fp32 into the fp32 sharded gradient
        assert 0 < r["backprop_rel_error"] < 0.05, r
        assert r["rel_error"] <= 2 * r["backprop_rel_error"] + 1e-3, r


def test_set_ups_that_cannot_run_are_refused_before_any_gradient(results):
    for rank_results in results:
        refused = rank_results["refused"]
        no_root = refused["no_root"]
        assert no_root["error"] == "FSDPHighwayError" and no_root["grads"] == 0, no_root
        assert "is its own root" in no_root["message"] and WAY_OUT in no_root["message"], no_root
        assert refused["attach_unpatched"]["error"] == "HighwayBPError", refused
        assert "patch_model" in refused["attach_unpatched"]["message"], refused
        assert refused["attach_unsharded"]["error"] == "FSDPHighwayError", refused
        assert WAY_OUT in refused["attach_unsharded"]["message"], refused


def test_accelerate_in_both_orders(results):
    for rank_results in results:
        cases = rank_results["accelerate"]
        assert len(cases) == 2 * len(CASES), sorted(cases)
        for name, r in cases.items():
            assert r["fsdp_version"] == 2 and r["is_fsdp2"] and r["attached"], (name, r)
            _check_exact(name, r, int(name.rsplit("=", 1)[1]))


@pytest.mark.parametrize("part", ["trainer", "callback"])
def test_trainers(results, part):
    for rank_results in results:
        cases = rank_results[part]
        assert len(cases) == len(CASES), sorted(cases)
        for name, r in cases.items():
            k = int(name.rsplit("=", 1)[1])
            assert r["is_fsdp2"] and r["patched"] and r["attached"] and r["unpatched_after"], (name, r)
            assert r["rel_error"] <= FLOAT64 and r["logged_iterations"] == [k], (name, r)
            assert (r["rel_error_vs_exact"] > 1e-4) == (k < N_LAYER), (name, r)


def test_fsdp_asked_on_cpu_says_it_runs_ddp(results):
    for rank_results in results:
        r = rank_results["not_in_effect"]
        assert r["distributed_type"] == "DistributedType.MULTI_CPU", r
        assert r["log"].count("FSDP is configured but not in effect") == 1, r
        assert "runs DDP over gloo" in r["log"], r


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


# ----- in process ------------------------------------------------------------------------------------------------
@pytest.fixture
def one_process_group():
    """A gloo process group of one process (FSDP2 runs in it unchanged, without collectives between ranks)."""
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_torch_still_has_the_fsdp2_internals_hf_hwbp_reads(one_process_group):
    from torch.distributed.fsdp import fully_shard
    from trainer_helpers import tiny_gpt2

    model = tiny_gpt2(n_layer=2)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()  # FSDP creates the unsharded parameters
    state = model.transformer.h[0]._get_fsdp_state()
    group = state._fsdp_param_groups[0]
    fsdp_param = group.fsdp_params[0]
    objects = {
        "FSDPModule": model.transformer.h[0],
        "FSDPState": state,
        "FSDPParamGroup": group,
        "FSDPParam": fsdp_param,
        "ParamModuleInfo": fsdp_param._module_info,
        "TrainingState": type(group._training_state),
    }
    assert sorted(objects) == sorted(hw_fsdp.TORCH_PRIVATE_NAMES)
    missing = [
        f"{kind}.{name}"
        for kind, names in hw_fsdp.TORCH_PRIVATE_NAMES.items()
        for name in names
        if not hasattr(objects[kind], name)
    ]
    assert not missing, f"torch {torch.__version__} moved FSDP2 internals that hf_hwbp.fsdp reads: {missing}"


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def _train_step(model):
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_model_connects_once_and_keeps_its_lifecycle_setting(one_process_group):
    from trainer_helpers import tiny_gpt2

    from hf_hwbp import highway_state, patch_model
    from hf_hwbp.sharding import ParameterLifecycle

    plain = patch_model(tiny_gpt2(n_layer=2), k=1)
    _train_step(plain)  # in a process group, but nothing is sharded: the default lifecycle
    assert type(highway_state(plain).lifecycle) is ParameterLifecycle and not hw_fsdp.is_attached(plain)

    model = tiny_gpt2(n_layer=2)
    hw_fsdp.set_lifecycle(model, "keep_gathered")  # before patching and sharding: kept for the model
    model = _sharded(patch_model(model, k=1))
    assert not hw_fsdp.is_attached(model)  # nothing is connected before the first training forward
    _train_step(model)
    lifecycle = highway_state(model).lifecycle
    assert isinstance(lifecycle, hw_fsdp.FSDP2Lifecycle) and lifecycle.lifecycle == "keep_gathered"
    model.zero_grad()
    _train_step(model)
    assert highway_state(model).lifecycle is lifecycle  # the next forwards find it in place
    assert hw_fsdp.attach(model, "per_block") is lifecycle and lifecycle.lifecycle == "per_block"
    with pytest.raises(ValueError, match="lifecycle must be one of"):
        hw_fsdp.set_lifecycle(model, "gathered")


def test_what_cannot_run_under_fsdp2_is_refused_before_any_gradient(one_process_group):
    from trainer_helpers import tiny_gpt2

    from hf_hwbp import HighwayBPError, UnsupportedDistributedSetupError, patch_model

    batched = _sharded(patch_model(tiny_gpt2(n_layer=2), k=1, backend="batched"))
    with pytest.raises(HighwayBPError, match="backend='sequential'"):
        _train_step(batched)
    assert all(p.grad is None for p in batched.parameters())

    flattened = patch_model(tiny_gpt2(n_layer=2), k=1)
    for param in flattened.transformer.h[1].parameters():
        param._fsdp_flattened = True  # what FSDP1 marks the parameters it flattens with
    with pytest.raises(UnsupportedDistributedSetupError, match="FSDP1"):
        _train_step(flattened)
    assert all(p.grad is None for p in flattened.parameters())


def test_unpatching_a_connected_model_leaves_plain_fsdp(one_process_group):
    from trainer_helpers import tiny_gpt2

    from hf_hwbp import patch_model, unpatch_model

    def grads(model):
        return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}

    plain = _sharded(tiny_gpt2(n_layer=2))
    _train_step(plain)
    model = _sharded(patch_model(tiny_gpt2(n_layer=2), k=1))
    _train_step(model)
    assert hw_fsdp.is_attached(model)
    unpatch_model(model)
    model.zero_grad(set_to_none=True)
    _train_step(model)  # FSDP's own backprop, as if never patched; the lifecycle's layer hooks went
    expected = grads(plain)
    assert all(torch.equal(g, expected[n]) for n, g in grads(model).items())
    for layer in model.transformer.h:
        hooks = [*layer._forward_pre_hooks.values(), *layer._forward_hooks.values()]
        assert not any(type(h).__module__ == "hf_hwbp.fsdp" for h in hooks), hooks
