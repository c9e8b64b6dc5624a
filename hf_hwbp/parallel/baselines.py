"""Backprop baselines from ``torch.distributed.pipelining``: the schedules pipeline users run, on our stages.

``TorchPipeline(model, schedule=..., n_microbatches=M)`` wraps the same GPT-2 / Llama stages that
:class:`~hf_hwbp.parallel.LayerParallelHighway` trains, scheduled by one of torch's schedules:

================  ============================  =====================  ==================================
``schedule``      torch class                   stages per rank        needs
================  ============================  =====================  ==================================
``gpipe``         ``ScheduleGPipe``             1                      any M
``1f1b``          ``Schedule1F1B``              1                      M >= S
``interleaved``   ``ScheduleInterleaved1F1B``   2 (loop: s, s + S)     any M
``zb``            ``ScheduleInterleavedZeroBubble``  2 (loop)          any M (ZB1P with split weights)
``zbv``           ``ScheduleZBVZeroBubble``     2 (V: s, 2S - 1 - s)   any M (zero bubble, V shape)
``dualpipev``     ``ScheduleDualPipeV``         2 (V)                  M >= 2S
================  ============================  =====================  ==================================

Multi-stage schedules cut the stack into 2S virtual stages (every rank holds two). The loss of a micro-batch
is the model's mean loss divided by M (``scale_grads=False``: a parameter shared by two stages of one rank,
such as GPT-2's tied embedding in a V schedule, would otherwise be rescaled twice), so without ignored labels
the gradients equal the whole batch's. Causal masks only (no ``attention_mask``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import Comm
from .stages import Stage, build_stage
from .tied import TiedGrads, check_world, tie_group

SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, None),
    "1f1b": ("Schedule1F1B", 1, None),
    "interleaved": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zb": ("ScheduleInterleavedZeroBubble", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}
SCHEDULE_LABELS = {name: "torch " + cls.removeprefix("Schedule") for name, (cls, _, _) in SCHEDULES.items()}


def schedule_requirement(schedule: str, n_microbatches: int, num_ranks: int) -> str | None:
    """Why torch's ``schedule`` cannot run M = ``n_microbatches`` on ``num_ranks`` ranks (None: it can)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    if schedule == "1f1b" and n_microbatches < num_ranks:
        return f"Schedule1F1B needs M >= S ({num_ranks})"
    if schedule == "dualpipev" and n_microbatches < 2 * num_ranks:
        return f"ScheduleDualPipeV needs M >= 2S ({2 * num_ranks})"
    return None


def virtual_stage_ranks(schedule: str, num_ranks: int) -> list[int]:
    """The rank of every (virtual) stage, as torch places them."""
    _, per_rank, style = SCHEDULES[schedule]
    if per_rank == 1:
        return list(range(num_ranks))
    if style == "loop":
        return [s % num_ranks for s in range(2 * num_ranks)]
    return [s if s < num_ranks else 2 * num_ranks - 1 - s for s in range(2 * num_ranks)]


class _StageModule(nn.Module):
    """A stage as the single-tensor module ``PipelineStage`` wants: ids or h in, h or logits out."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        stage = self.stage
        h = stage.embed(x) if stage.is_first else x
        h = stage.run_layers(h, range(len(stage.layers)), stage.layer_kwargs(h))
        return stage.logits(h) if stage.is_last else h


class TorchPipeline:
    """Pipeline backprop scheduled by ``torch.distributed.pipelining`` over this project's stages.

    Same calling convention as :class:`~hf_hwbp.parallel.LayerParallelHighway`: every rank builds the same
    model and calls :meth:`step` with the same batch; gradients land in ``.grad`` of :meth:`parameters` (added
    to what is there); the loss comes back on the rank that holds the last stage.

    Args:
        model: a GPT2LMHeadModel or LlamaForCausalLM, identical on every rank.
        schedule: a key of ``SCHEDULES``.
        n_microbatches: M, the micro-batches the batch is split into along dim 0.
        process_group: the ranks of the pipeline (default: the world).

    Raises:
        ValueError: unknown schedule, or one that cannot run this M on this many ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        schedule: str = "gpipe",
        n_microbatches: int = 2,
        num_stages: int | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        import torch.distributed.pipelining as pipelining

        num_ranks = check_world(num_stages, dist.get_world_size(process_group))
        reason = schedule_requirement(schedule, n_microbatches, num_ranks)
        if reason is not None:
            raise ValueError(f"Cannot run schedule={schedule!r} with {n_microbatches} micro-batches: {reason}.")
        class_name, per_rank, _ = SCHEDULES[schedule]
        rank = dist.get_rank(process_group)
        placement = virtual_stage_ranks(schedule, num_ranks)
        num_virtual = len(placement)
        self.stages = [
            build_stage(model, s, num_virtual, group_size="stage") for s in range(num_virtual) if placement[s] == rank
        ]
        self.schedule_name = schedule
        self.n_microbatches = n_microbatches
        self.comm = Comm(process_group)
        # the tied gradient crosses ranks only if the first and the last stage live on different ranks
        self._tied = [p for s in self.stages for p in s.tied]
        self._tie = tie_group(self.stages[0].has_tied, (placement[0], placement[-1]), process_group)
        pipe_stages = [
            pipelining.PipelineStage(_StageModule(s), s.index, num_virtual, s.device, group=process_group)
            for s in self.stages
        ]
        loss_fn = self._loss
        cls = getattr(pipelining, class_name)
        if per_rank == 1:
            self.schedule = cls(pipe_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = cls(pipe_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.holds_first = placement[0] == rank
        self.holds_last = placement[-1] == rank

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.stages[-1 if self.stages[-1].is_last else 0].loss(logits, labels) / self.n_microbatches

    @property
    def stage(self) -> Stage:
        """The first of this rank's stages (for placement metadata)."""
        return self.stages[0]

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for stage in self.stages:
            for p in stage.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def activation_bytes(self, input_ids: Tensor) -> int:
        """Activation payload this rank sends per step inside the schedule (computed, not counted): every stage
        boundary whose two sides live on different ranks carries the activations up and their gradients down."""
        placement = virtual_stage_ranks(self.schedule_name, self.comm.world_size)
        stage = self.stages[0]
        act = input_ids.numel() * stage.config.hidden_size * torch.empty((), dtype=stage.dtype).element_size()
        rank = self.comm.rank
        crossings = sum(
            (placement[s] == rank) + (placement[s + 1] == rank)
            for s in range(len(placement) - 1)
            if placement[s] != placement[s + 1]
        )
        return act * crossings

    def step(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor | None:
        if labels is None:
            labels = input_ids
        device = self.stages[0].device
        input_ids, labels = input_ids.to(device), labels.to(device)
        losses: list[Tensor] = []
        kwargs = {}
        if self.holds_last:
            kwargs.update(target=labels, losses=losses)
        args = (input_ids,) if self.holds_first else ()
        with TiedGrads(self._tied, self.comm, self._tie):
            self.schedule.step(*args, **kwargs)
        return torch.stack([loss.detach() for loss in losses]).sum() if losses else None


class GPipeBaseline(TorchPipeline):
    """``TorchPipeline(model, schedule="gpipe")`` (kept for existing callers)."""

    def __init__(self, model: nn.Module, *, n_microbatches: int = 2, **kwargs):
        super().__init__(model, schedule="gpipe", n_microbatches=n_microbatches, **kwargs)
