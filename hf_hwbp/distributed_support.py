"""Which distributed back-ends Highway-BP supports, decided in one place.

Supported: one process, DDP (``torchrun``, ``accelerate launch`` with ``distributed_type: MULTI_GPU`` or
``MULTI_CPU``; each rank's Highway gradients are all-reduced like ordinary ones) and the layer-parallel runner
``hf_hwbp.parallel``.

Refused: FSDP (FSDP1 and FSDP2, also through Accelerate) and DeepSpeed (every ZeRO stage). The patched backward
collects each block's parameters from ``layer.parameters()`` when a training forward starts and hands their
gradients back to autograd itself. Under FSDP those are flattened or sharded (DTensor) parameters that the block's
forward does not use directly, and ZeRO-3 partitions them; under DeepSpeed ZeRO-1/2 the engine owns gradient
reduction through its own hooks. In every case Highway-BP would produce missing or wrong gradients, so it raises
before the first step instead. ``check_distributed_support`` is called by ``HighwayCallback`` when the Trainer is
built and again when training begins; ``patch_model``'s path can call it with the model alone.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

_WAYS_OUT = (
    "Ways out: data parallelism with DDP (`torchrun`, or `accelerate launch` with distributed_type MULTI_GPU / "
    "MULTI_CPU), layer parallelism with hf_hwbp.parallel, or plain backprop (use_highway_bp=False / no "
    "HighwayCallback)."
)


class UnsupportedDistributedSetupError(NotImplementedError):
    """Highway-BP cannot run under this distributed back-end (FSDP or DeepSpeed)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _accelerate_distributed_type() -> str | None:
    """The distributed type of an already initialized Accelerate state (None when there is none)."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    if not AcceleratorState._shared_state:
        return None
    distributed_type = getattr(AcceleratorState(), "distributed_type", None)
    return None if distributed_type is None else str(getattr(distributed_type, "value", distributed_type))


def detect_unsupported_backend(model: nn.Module | None = None, args: Any = None) -> str | None:
    """The name of the unsupported back-end in use ("FSDP" or "DeepSpeed", with where it was seen), or None.

    Looks at the training arguments (``fsdp``, ``deepspeed``), Accelerate's environment and state, and the model
    (FSDP wrappers, flattened or DTensor parameters, ZeRO-3 partitioned parameters, a DeepSpeed engine).
    """
    if args is not None:
        if getattr(args, "deepspeed", None):
            return "DeepSpeed (TrainingArguments.deepspeed)"
        if getattr(args, "fsdp", None):
            return "FSDP (TrainingArguments.fsdp)"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed (ACCELERATE_USE_DEEPSPEED, from `accelerate launch`)"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP (ACCELERATE_USE_FSDP, from `accelerate launch`)"
    distributed_type = _accelerate_distributed_type()
    if distributed_type in ("DEEPSPEED", "FSDP"):
        name = "DeepSpeed" if distributed_type == "DEEPSPEED" else "FSDP"
        return f"{name} (Accelerate distributed_type={distributed_type})"
    if model is not None:
        return _detect_in_model(model)
    return None


def _detect_in_model(model: nn.Module) -> str | None:
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):  # FSDP1 wrapper, FSDP2's FSDPModule
            return f"FSDP (module {name})"
        if name == "DeepSpeedEngine":
            return "DeepSpeed (DeepSpeedEngine)"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # noqa: N806
    for name, param in model.named_parameters():
        if getattr(param, "_is_flat_param", False) or type(param).__name__ == "FlatParameter":
            return f"FSDP (flattened parameter {name})"
        if isinstance(param, DTensor):
            return f"FSDP or tensor parallelism (DTensor parameter {name})"
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):
            return f"DeepSpeed ZeRO-3 (partitioned parameter {name})"
    return None


def check_distributed_support(model: nn.Module | None = None, args: Any = None) -> None:
    """Raise ``UnsupportedDistributedSetupError`` if FSDP or DeepSpeed is in use (see the module docstring)."""
    backend = detect_unsupported_backend(model, args)
    if backend is None:
        return
    raise UnsupportedDistributedSetupError(
        f"Highway-BP does not support {backend}. Its backward gathers each block's parameters from "
        "layer.parameters() at forward time and returns their gradients itself; sharded, flattened or partitioned "
        "parameters would get missing or wrong gradients. " + _WAYS_OUT
    )


__all__ = ["UnsupportedDistributedSetupError", "check_distributed_support", "detect_unsupported_backend"]
