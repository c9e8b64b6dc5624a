"""The GPipe baseline: ``torch.distributed.pipelining``'s ScheduleGPipe over the same stages, with micro-batches.

All micro-batches run forward through the pipeline, then all run backward (the stages overlap on different
micro-batches). The loss of each micro-batch is the model's mean loss and the schedule divides the summed
gradients by the number of micro-batches, so without ignored labels the gradient equals the full batch's.
Causal masks only (no ``attention_mask``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import Comm
from .runner import TiedGrads, check_world, tie_group
from .stages import Stage, build_stage


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


class GPipeBaseline:
    """Pipeline backprop with micro-batches, scheduled by ``torch.distributed.pipelining.ScheduleGPipe``.

    Same placement and same calling convention as :class:`LayerParallelHighway` (``step`` on every rank with
    the same batch; gradients in ``.grad``; the loss on the last rank). Expects zeroed gradients before each
    step (the schedule rescales whatever ``.grad`` holds). Bytes sent inside torch's schedule are not counted:
    :meth:`activation_bytes` computes them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_microbatches: int = 2,
        num_stages: int | None = None,
        process_group: dist.ProcessGroup | None = None,
    ):
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        world_size = dist.get_world_size(process_group)
        num_stages = check_world(num_stages, world_size)
        self.stage = build_stage(model, dist.get_rank(process_group), num_stages, group_size="stage")
        self.n_microbatches = n_microbatches
        self.comm = Comm(process_group)
        self._tie = tie_group(self.stage, process_group)
        pipe_stage = PipelineStage(
            _StageModule(self.stage), self.stage.index, num_stages, self.stage.device, group=process_group
        )
        self.schedule = ScheduleGPipe(pipe_stage, n_microbatches, loss_fn=self.stage.loss)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.stage.parameters() if p.requires_grad]

    def activation_bytes(self, input_ids: Tensor) -> int:
        """Activation payload this rank sends per step inside the schedule (computed, not counted): the
        micro-batch outputs up and their input gradients down. The tied-gradient all_reduce is counted in
        ``comm.bytes_sent``."""
        stage = self.stage
        act = input_ids.numel() * stage.config.hidden_size * torch.empty((), dtype=stage.dtype).element_size()
        return act * ((not stage.is_last) + (not stage.is_first))

    def step(self, input_ids: Tensor, labels: Tensor | None = None) -> Tensor | None:
        if labels is None:
            labels = input_ids
        stage = self.stage
        input_ids, labels = input_ids.to(stage.device), labels.to(stage.device)
        losses: list[Tensor] = []
        with TiedGrads(stage, self.comm, self._tie):
            if stage.is_first and stage.is_last:
                self.schedule.step(input_ids, target=labels, losses=losses)
            elif stage.is_first:
                self.schedule.step(input_ids)
            elif stage.is_last:
                self.schedule.step(target=labels, losses=losses)
            else:
                self.schedule.step()
        return torch.stack([loss.detach() for loss in losses]).mean() if losses else None
