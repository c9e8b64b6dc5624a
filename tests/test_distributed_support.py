"""FSDP1 and DeepSpeed ZeRO-3 (or an unknown ZeRO stage) are refused before any training step, with a message
naming the back-end and the ways out; FSDP2 and ZeRO-1/2 are not (their 2-process runs are in tests/test_fsdp.py).

The real FSDP1 refusal under `accelerate launch` is in tests/test_ddp.py; DeepSpeed is not installed here, so its
markers (TrainingArguments.deepspeed, ACCELERATE_USE_DEEPSPEED, ZeRO-3 partitioned parameters) are set by hand.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from trainer_helpers import repetitive_data, tiny_gpt2
from transformers import Trainer, TrainingArguments

from hf_hwbp import HighwayCallback, UnsupportedDistributedSetupError, check_distributed_support
from hf_hwbp.distributed_support import detect_unsupported_backend

WAYS_OUT = ("FSDP2", "DDP", "hf_hwbp.parallel", "use_highway_bp=False")


def _assert_clear(err: pytest.ExceptionInfo, backend: str) -> None:
    message = str(err.value)
    assert f"does not support {backend}" in message, message
    assert all(way in message for way in WAYS_OUT), message


def test_single_process_and_ddp_models_are_supported():
    assert detect_unsupported_backend(tiny_gpt2(), SimpleNamespace(fsdp=[], deepspeed=None)) is None
    check_distributed_support(tiny_gpt2())


@pytest.mark.parametrize(
    "args, backend",
    [
        (SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 1}, deepspeed=None), "FSDP1"),
        (SimpleNamespace(fsdp=[], deepspeed="ds_config.json"), "DeepSpeed"),
        (SimpleNamespace(fsdp=True, deepspeed={"zero_optimization": {"stage": 3}}), "DeepSpeed ZeRO-3"),
    ],
)
def test_training_arguments(args, backend):
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        check_distributed_support(None, args)
    _assert_clear(err, backend)


def test_deepspeed_zero_1_and_2_are_supported(monkeypatch):
    for stage in (0, 1, 2):
        args = SimpleNamespace(fsdp=[], deepspeed={"zero_optimization": {"stage": stage}})
        assert detect_unsupported_backend(None, args) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert detect_unsupported_backend(tiny_gpt2()) is None
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert detect_unsupported_backend(tiny_gpt2()).startswith("DeepSpeed ZeRO-3")


def test_fsdp2_is_supported():
    assert (
        detect_unsupported_backend(None, SimpleNamespace(fsdp=["full_shard"], fsdp_config={}, deepspeed=None)) is None
    )
    args = SimpleNamespace(fsdp=["full_shard"], fsdp_config={"version": 2}, deepspeed=None)
    assert detect_unsupported_backend(None, args) is None


def test_fsdp1_from_accelerate_launch_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for distributed_type FSDP
    monkeypatch.setenv("FSDP_VERSION", "1")  # and for fsdp_version 1 (its default)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        Trainer(model=tiny_gpt2(), args=args, train_dataset=repetitive_data(), callbacks=[HighwayCallback()])
    _assert_clear(err, "FSDP1")
    assert "accelerate launch" in str(err.value)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert detect_unsupported_backend(tiny_gpt2()) is None


def test_deepspeed_from_accelerate_launch(monkeypatch):
    # With ACCELERATE_USE_DEEPSPEED set, TrainingArguments itself needs the deepspeed package (not installed here).
    # Without a ZeRO stage (nor a config file that says it), Highway-BP cannot tell that the weights stay whole.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        check_distributed_support(tiny_gpt2())
    _assert_clear(err, "DeepSpeed")


def test_partitioned_and_sharded_parameters():
    model = tiny_gpt2()
    model.transformer.h[1].mlp.c_fc.weight.ds_id = 7  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        check_distributed_support(model)
    _assert_clear(err, "DeepSpeed ZeRO-3")
    assert "transformer.h.1.mlp.c_fc.weight" in str(err.value)

    model = tiny_gpt2()
    flat = torch.nn.Parameter(torch.zeros(3))
    flat._is_flat_param = True  # FSDP1's FlatParameter marker
    model.transformer.h[0].register_parameter("flat_param", flat)
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        check_distributed_support(model)
    _assert_clear(err, "FSDP1")


def test_fsdp1_original_parameters_are_refused():
    model = tiny_gpt2()
    model.transformer.h[0].attn.c_attn.weight._fsdp_flattened = True  # FSDP1 (also with use_orig_params=True)
    with pytest.raises(UnsupportedDistributedSetupError) as err:
        check_distributed_support(model)
    _assert_clear(err, "FSDP1")


@pytest.mark.parametrize(
    "distributed_type, why",
    [
        ("MULTI_CPU", "runs DDP over gloo instead"),
        ("NO", "with nothing sharded"),
    ],
)
def test_fsdp_configured_but_not_in_effect_is_said_once(monkeypatch, caplog, distributed_type, why):
    from hf_hwbp import distributed_support

    monkeypatch.setattr(distributed_support, "_WARNED", set())
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(distributed_support, "_accelerate_distributed_type", lambda: (distributed_type, None))
    asked = SimpleNamespace(fsdp=True, fsdp_config={}, deepspeed=None)
    with caplog.at_level("WARNING"):
        check_distributed_support(tiny_gpt2(), asked)
        check_distributed_support(tiny_gpt2(), asked)  # the callback checks when built and when training begins
        check_distributed_support(tiny_gpt2(), SimpleNamespace(fsdp=False, deepspeed=None))  # nobody asked
    said = [r.getMessage() for r in caplog.records if "FSDP is configured but not in effect" in r.getMessage()]
    assert len(said) == 1 and why in said[0], said


def test_fsdp_not_in_effect_names_the_reason():
    from hf_hwbp.distributed_support import fsdp_not_in_effect

    asked = SimpleNamespace(fsdp=True)
    with mock.patch("hf_hwbp.distributed_support._accelerate_distributed_type", return_value=("FSDP", 2)):
        assert fsdp_not_in_effect(asked) is None
    with mock.patch("hf_hwbp.distributed_support._accelerate_distributed_type", return_value=("NO", None)):
        with mock.patch.dict("os.environ", {"WORLD_SIZE": "2"}):
            reason = fsdp_not_in_effect(asked)
    assert "started 2 processes" in reason and "use_cpu" in reason, reason
