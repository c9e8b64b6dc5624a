"""LayerParallelHighway: one pipeline stage per process, trained with layer-parallel Highway-BP(k) or backprop."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import HighwayConfig
from .comm import Comm
from .schedule import backprop_backward, highway_backward, stage_forward
from .stages import Stage, build_stage

METHODS = ("highway", "backprop")


def check_world(num_stages: int | None, world_size: int) -> int:
    """The number of stages: ``num_stages`` if it matches the process group's size (None: that size)."""
    if num_stages is None:
        return world_size
    if num_stages != world_size:
        raise ValueError(
            f"Layer-parallel training runs one stage per process: {num_stages} stages were requested but the "
            f"process group has {world_size} processes. Launch with `torchrun --nproc_per_node {num_stages}` or "
            f"request num_stages={world_size}."
        )
    return num_stages


def tie_group(stage: Stage, group: dist.ProcessGroup | None) -> tuple[bool, dist.ProcessGroup | None]:
    """Whether gradients are tied between stages, and the group of the first and last stages that sums them.

    Every rank must call this (``new_group`` is collective). With two stages that group is ``group`` itself
    (None: the world).
    """
    if not stage.has_tied:
        return False, None
    if stage.num_stages == 2:
        return True, group
    ranks = [0, stage.num_stages - 1]
    if group is not None:
        ranks = [dist.get_global_rank(group, r) for r in ranks]
    return True, dist.new_group(ranks)


class TiedGrads:
    """Sums the gradient of parameters split between the first and last stage (e.g. GPT-2's tied embedding).

    Use ``with TiedGrads(stage, comm, tie_group(stage, group)):`` around one backward: it sets the tied gradients aside,
    lets the backward produce this stage's part alone, sums the parts of both stages and adds back what
    was there before (so gradient accumulation keeps working).
    """

    def __init__(self, stage: Stage, comm: Comm, tie: tuple[bool, dist.ProcessGroup | None]):
        tied, group = tie
        self.params = stage.tied if tied else []
        self.comm, self.group = comm, group
        self.saved: list[Tensor | None] = []

    def __enter__(self):
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            return False
        for p, before in zip(self.params, self.saved):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            self.comm.all_reduce_sum(grad, self.group)
            p.grad = grad if before is None else before + grad
        return False


class LayerParallelHighway:
    """Trains one pipeline stage of a causal LM per process, with layer-parallel Highway-BP(k) or backprop.

    Launch one process per stage (``torchrun --nproc_per_node S``) and initialize ``torch.distributed``
    first (gloo on CPU, NCCL on GPU). Every process builds the same full model (same seed or checkpoint) and
    wraps it; each keeps only its stage: the embeddings and the first layers on rank 0, the next layers on
    rank 1, ..., the final norm, LM head and loss on rank S - 1. Call :meth:`step` on every rank with the same
    batch; it leaves this stage's gradients in ``.grad`` of :meth:`parameters` (tied parameters, such as
    GPT-2's ``lm_head.weight`` = ``wte.weight``, are summed between the first and last stage) and returns
    the loss on the last rank. Step your optimizer over :meth:`parameters` on every rank.

    Args:
        model: a GPT2LMHeadModel or LlamaForCausalLM (dropout as you like; in train mode).
        k: Highway iterations (int >= 0); clamped to the number of blocks, where it is exact backprop.
        group_size: layers per Highway block, as in ``patch_model`` (blocks never straddle stages), or
            ``"stage"``: each stage is one block (exact backprop inside a stage).
        method: ``"highway"`` (layer-parallel Highway-BP) or ``"backprop"`` (ordinary pipeline backprop
            with the same placement, the baseline).
        num_stages: the stages requested; must equal the process group's size (default: that size).
        scan: how the per-stage sums reach the stages below: ``"chain"`` (S - 1 sends) or ``"allgather"``.
        tol: optional adaptive stop, as in ``HighwayConfig`` (one extra all_reduce of two scalars per iteration).
        blocks_per_stage: optional explicit count of Highway blocks per stage.
        microbatches: M >= 1 slices of the batch in the forward, so that the stages overlap on different
            slices (the head, the loss and the Highway backward still see the whole batch; with
            ``method="backprop"`` the backward also goes slice by slice: the GPipe schedule). Gradients are
            the same for every M.
        process_group: the group whose ranks are the stages (default: the world).

    Raises:
        ValueError: the group size differs from ``num_stages``, there are more stages than Highway blocks,
            or the model/method is not supported.
        RuntimeError: ``torch.distributed`` is not initialized.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        k: int = 2,
        group_size: int | str = 1,
        method: str = "highway",
        num_stages: int | None = None,
        scan: str = "chain",
        tol: float | None = None,
        blocks_per_stage=None,
        microbatches: int = 1,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "LayerParallelHighway needs torch.distributed: launch with torchrun and call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first."
            )
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
        if scan not in ("chain", "allgather"):
            raise ValueError(f"scan must be 'chain' or 'allgather', got {scan!r}.")
        self._config = HighwayConfig(k=k, tol=tol)  # validates k and tol
        world_size = dist.get_world_size(process_group)
        num_stages = check_world(num_stages, world_size)
        self.stage = build_stage(
            model,
            dist.get_rank(process_group),
            num_stages,
            group_size=group_size,
            blocks_per_stage=blocks_per_stage,
        )
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}.")
        self.method = method
        self.scan = scan
        self.microbatches = microbatches
        self.comm = Comm(process_group)
        self._tie = tie_group(self.stage, process_group)
        self.last_iterations: int | None = None

    # ----- settings ------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._config.k

    @k.setter
    def k(self, value: int) -> None:
        """Change k between steps (same value on every rank)."""
        self._config = self._config.updated(k=value)

    @property
    def rank(self) -> int:
        return self.stage.index

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    @property
    def num_blocks(self) -> int:
        return self.stage.layout.num_blocks

    def parameters(self) -> list[nn.Parameter]:
        """This stage's trainable parameters (give them to the optimizer)."""
        return [p for p in self.stage.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.stage.parameters():
            p.grad = None

    # ----- one step ------------------------------------------------------------------------------------
    def step(
        self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor | None:
        """Forward and backward of one batch on this stage; returns the (detached) loss on the last stage.

        Every rank passes the same batch (the first stage reads ``input_ids``, the last ``labels``, every
        stage the shapes and ``attention_mask``). ``labels`` defaults to ``input_ids`` (shifted inside the
        loss, as in transformers).
        """
        if labels is None:
            labels = input_ids
        stage = self.stage
        device = stage.device
        input_ids = input_ids.to(device)
        labels = labels.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        segments = stage.blocks if self.method == "highway" else [range(len(stage.layers))]
        try:
            with TiedGrads(stage, self.comm, self._tie):
                record = stage_forward(stage, self.comm, input_ids, labels, attention_mask, segments, self.microbatches)
                if self.method == "highway":
                    self.last_iterations = highway_backward(
                        stage, self.comm, record, k=self._config.k, scan=self.scan, tol=self._config.tol
                    )
                else:
                    backprop_backward(stage, self.comm, record)
        finally:
            self.comm.wait()
        return record.loss.detach() if record.loss is not None else None
