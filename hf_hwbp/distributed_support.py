"""Which distributed back-ends Highway-BP supports, decided in one place.

Supported: one process, DDP (``torchrun``, ``accelerate launch`` with ``distributed_type: MULTI_GPU`` or
``MULTI_CPU``; each rank's Highway gradients are all-reduced like ordinary ones), FSDP2 (``fully_shard``, also
``accelerate launch`` with ``distributed_type: FSDP`` and ``fsdp_version: 2``; ``hf_hwbp.fsdp`` gathers one block
at a time and reduce-scatters each block's gradients at its parameter step), DeepSpeed ZeRO stages 0-2 (the weights
stay whole; the Highway gradients reach the parameters through autograd, where the engine's reduction hooks take
them) and the layer-parallel runner ``hf_hwbp.parallel``.

Refused: FSDP1 (flattened parameters that the blocks' forwards do not read directly), DeepSpeed ZeRO-3 (its hooks
on every module wrap the block outputs Highway-BP cuts and count one backward per forward; docs/fsdp.md has what
was measured), DeepSpeed whose ZeRO stage cannot be told, and tensor-parallel ``DTensor`` parameters. Highway-BP
would produce missing or wrong gradients (or stop with a confusing error) there, so it raises before the first step
instead. ``check_distributed_support`` is called by ``HighwayCallback`` when the Trainer is built and again when
training begins, and by ``hf_hwbp.fsdp.connect`` at a patched model's training forwards in a process group; it also
says, once, when the training arguments ask for FSDP that the run does not use (``fsdp_not_in_effect``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn
from transformers.utils import logging

from .errors import HighwayBPError

logger = logging.get_logger(__name__)

_WAYS_OUT = (
    "Ways out: FSDP2 (`accelerate launch` with distributed_type FSDP and fsdp_version: 2, or torch's fully_shard), "
    "data parallelism with DDP (`torchrun`, or `accelerate launch` with distributed_type MULTI_GPU / MULTI_CPU), "
    "DeepSpeed ZeRO stage 1 or 2, layer parallelism with hf_hwbp.parallel, or plain backprop "
    "(use_highway_bp=False / no HighwayCallback)."
)


class UnsupportedDistributedSetupError(HighwayBPError, NotImplementedError):
    """Highway-BP cannot run under this distributed back-end (FSDP1, DeepSpeed ZeRO-3)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _accelerator_state():
    """Accelerate's initialized state, read without constructing ``AcceleratorState`` (which copies the process
    state's distributed type over its own), or None."""
    try:
        from accelerate.state import AcceleratorState, is_initialized
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    if not is_initialized():
        return None
    state = object.__new__(AcceleratorState)
    state.__dict__ = AcceleratorState._shared_state
    return state


def _accelerate_distributed_type() -> tuple[str | None, int | None]:
    """The distributed type of an already initialized Accelerate state and its FSDP version (None, None when there
    is no state)."""
    state = _accelerator_state()
    distributed_type = getattr(state, "distributed_type", None)
    if distributed_type is None:
        return None, None
    plugin = getattr(state, "fsdp_plugin", None)
    version = getattr(plugin, "fsdp_version", None) if plugin is not None else None
    return str(getattr(distributed_type, "value", distributed_type)), version


def _zero_stage(config: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a dict or the path of a JSON file); None when it cannot be told."""
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else None


def _deepspeed_refusal(stage: int | None, where: str) -> str | None:
    if stage is None:
        return f"DeepSpeed with a ZeRO stage it cannot tell ({where})"
    return f"DeepSpeed ZeRO-3 ({where})" if stage >= 3 else None


def _accelerate_zero_stage() -> int | None:
    plugin = getattr(_accelerator_state(), "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return stage if isinstance(stage, int) else None


def _fsdp_config_version(args: Any) -> int:
    """The FSDP version TrainingArguments ask for (transformers defaults to 2 when the config does not say)."""
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2)))


def detect_unsupported_backend(model: nn.Module | None = None, args: Any = None) -> str | None:
    """The name of the unsupported back-end in use ("FSDP1" or "DeepSpeed", with where it was seen), or None.

    Looks at the training arguments (``fsdp``, ``deepspeed``), Accelerate's environment and state, and the model
    (FSDP1 wrappers, flattened parameters, DTensor parameters that no FSDP2 unit owns, ZeRO-3 partitioned
    parameters, a DeepSpeed engine). FSDP2 is supported and never named.
    """
    if args is not None:
        if getattr(args, "deepspeed", None):
            refusal = _deepspeed_refusal(_zero_stage(args.deepspeed), "TrainingArguments.deepspeed")
            if refusal is not None:
                return refusal
        if getattr(args, "fsdp", None) and _fsdp_config_version(args) != 2:
            return "FSDP1 (TrainingArguments.fsdp with fsdp_config version 1)"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        stage = int(stage) if stage.isdigit() else (_zero_stage(config_file) if config_file != "none" else None)
        refusal = _deepspeed_refusal(stage, "ACCELERATE_USE_DEEPSPEED, from `accelerate launch`")
        if refusal is not None:
            return refusal
    if _env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1").strip() != "2":
        return "FSDP1 (ACCELERATE_USE_FSDP with FSDP_VERSION != 2, from `accelerate launch`)"
    distributed_type, version = _accelerate_distributed_type()
    if distributed_type == "DEEPSPEED":
        refusal = _deepspeed_refusal(_accelerate_zero_stage(), "Accelerate distributed_type=DEEPSPEED")
        if refusal is not None:
            return refusal
    if distributed_type == "FSDP" and version != 2:
        return f"FSDP1 (Accelerate distributed_type=FSDP, fsdp_version={version})"
    if model is not None:
        return _detect_in_model(model)
    return None


def _detect_in_model(model: nn.Module) -> str | None:
    from .fsdp import fsdp2_owned

    owned = fsdp2_owned(model)  # ids of the parameters (sharded or not) that FSDP2 units manage
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel":
            return f"FSDP1 (module {name})"
        if name == "DeepSpeedEngine":
            stage = getattr(module, "zero_optimization_stage", None)
            refusal = _deepspeed_refusal(stage() if callable(stage) else None, "DeepSpeedEngine")
            if refusal is not None:
                return refusal
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    for name, param in model.named_parameters():
        if getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False):
            return f"FSDP1 (flattened parameter {name})"
        if isinstance(param, DTensor) and id(param) not in owned:
            return f"tensor parallelism (DTensor parameter {name} that no FSDP2 unit owns)"
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            return f"DeepSpeed ZeRO-3 (partitioned parameter {name})"
    return None


def check_distributed_support(model: nn.Module | None = None, args: Any = None) -> None:
    """Raise ``UnsupportedDistributedSetupError`` if FSDP1 or DeepSpeed ZeRO-3 is in use (see the module docstring);
    warn once when the training arguments ask for FSDP that the run does not use."""
    backend = detect_unsupported_backend(model, args)
    if backend is not None:
        raise UnsupportedDistributedSetupError(
            f"Highway-BP does not support {backend}. Its backward returns each block's parameter gradients itself; "
            "flattened or partitioned parameters would get missing or wrong gradients. " + _WAYS_OUT
        )
    reason = fsdp_not_in_effect(args)
    if reason is not None and reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning(f"Highway-BP: FSDP is configured but not in effect: {reason}")


_WARNED: set[str] = set()


def fsdp_not_in_effect(args: Any = None) -> str | None:
    """Why FSDP, asked for by the training arguments (``fsdp``) or by ``accelerate launch`` (ACCELERATE_USE_FSDP), is
    not what the run uses (None when it is, or when nobody asked for it). Accelerate decides when its state is
    built: it turns FSDP on only for accelerator devices, and a launch of several processes on CPU without
    ``use_cpu`` runs each process alone."""
    asked = bool(getattr(args, "fsdp", None)) or _env_flag("ACCELERATE_USE_FSDP")
    distributed_type, _ = _accelerate_distributed_type()
    if not asked or distributed_type is None or distributed_type == "FSDP":
        return None
    world = os.environ.get("WORLD_SIZE", "1")
    if distributed_type.startswith("MULTI_CPU"):
        return (
            "Accelerate enables FSDP only on accelerator devices; on CPU (use_cpu / --use_cpu, or no GPU) it runs "
            "DDP over gloo instead: every process holds the whole model and trains on its own batch."
        )
    if distributed_type == "NO" and world.isdigit() and int(world) > 1:
        return (
            f"the launcher started {world} processes, but Accelerate runs each alone (distributed_type NO: a CPU "
            "machine without use_cpu / --use_cpu): they do not communicate and write to the same output_dir. "
            "Pass use_cpu=True (DDP over gloo) or run on accelerator devices."
        )
    return f"Accelerate runs distributed_type {distributed_type}, with nothing sharded."


__all__ = ["UnsupportedDistributedSetupError", "check_distributed_support", "detect_unsupported_backend"]
