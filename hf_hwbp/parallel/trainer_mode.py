"""The layer-parallel mode of ``LayerParallelTrainer``: what a Trainer step becomes when each rank holds one stage.

``hf_hwbp.LayerParallelTrainer``, launched with one process per stage (``torchrun --nproc_per_node S`` or
``accelerate launch --num_processes S``), delegates here:

- the model is not wrapped in DDP (``LayerParallelModel`` tells the Trainer it is already wrapped): every rank keeps
  the whole model, trains its stage's parameters with its own optimizer, and the stages exchange activations and
  Highway sums through ``LayerParallelHighway``;
- every rank gets the same batches (the data is not sharded: the stages split the model, not the data), checked at
  every step by one all-reduce of a checksum;
- a training step is ``runner.step`` under the Trainer's autocast; the loss is broadcast from the last stage so that
  every rank logs it; ``num_items_in_batch`` is counted on the batch itself (no gather: every rank has it);
- gradient clipping and the logged ``grad_norm`` use the norm over all stages (one all-reduce; a tied parameter
  counted once);
- before evaluation, prediction and saving, every stage's trained weights are broadcast into the whole model on every
  rank (``sync_model``): evaluation then runs data-parallel with the Trainer's own loop, and the main process saves
  one ``save_pretrained`` model. Optimizer states stay per stage (``optimizer_stage{r}-of-{S}.pt`` in a checkpoint);
  a run resumes with the same number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import HighwayBPError
from ..training_config import UnsupportedTrainingSetupError
from .comm import in_place_collective
from .runner import LayerParallelHighway
from .stages import build_stage

OPTIMIZER_FILE = "optimizer_stage{rank}-of-{stages}.pt"


class LayerParallelModel(nn.Module):
    """The whole model and the runner that trains this rank's stage of it.

    ``LayerParallelTrainer`` hands it to the Trainer as the wrapped model, so that Accelerate leaves the model unwrapped
    (no DDP: each rank trains a different part). Calling it runs the whole model's ordinary forward.
    """

    def __init__(self, module: nn.Module, runner: LayerParallelHighway):
        super().__init__()
        self.module = module
        self.runner = runner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class LayerParallelTraining:
    """This rank's runner and the pieces of a Trainer step around it (see the module docstring).

    Args:
        model: the whole model, the same on every rank (same seed or checkpoint), on this rank's device.
        k, tol, group_size: the Highway settings the runner starts with (``HighwayCallback`` sets k and tol per step).
        use_highway: False trains with pipeline backprop over the same stages.
        microbatches: as in ``LayerParallelHighway``.

    Raises:
        HighwayBPError: ``torch.distributed`` is not initialized (the script was not launched with one process per
            stage).
        UnsupportedModelError: the model cannot be cut into stages (see ``hf_hwbp.parallel.arch``).
        ValueError: there are more processes than Highway blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        k: int,
        group_size: int,
        use_highway: bool,
        microbatches: int = 1,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise HighwayBPError(
                "layer_parallel trains one pipeline stage per process: launch the script with "
                "`torchrun --nproc_per_node <stages> ...` or `accelerate launch --num_processes <stages> ...`."
            )
        self.model = model
        self.runner = LayerParallelHighway(
            model,
            k=k,
            group_size=group_size,
            method="highway" if use_highway else "backprop",
            microbatches=microbatches,
        )
        stage = self.runner.stage
        self.recipe = stage.recipe
        self.device = stage.device
        self.num_stages = stage.num_stages
        self._owner = self._owners(model, group_size)
        self._synced = True

    @staticmethod
    def _owners(model: nn.Module, group_size: int) -> list[tuple[int, nn.Parameter]]:
        """``(stage, parameter)`` for every parameter of the model that a stage trains, in the model's order (a
        parameter held by two stages, GPT-2's tied embedding, belongs to the first)."""
        world = dist.get_world_size()
        held = [{id(p) for p in build_stage(model, s, world, group_size=group_size).parameters()} for s in range(world)]
        owners = []
        for p in model.parameters():
            stage = next((s for s, ids in enumerate(held) if id(p) in ids), None)
            if stage is not None:
                owners.append((stage, p))
        return owners

    # ----- what the optimizer sees --------------------------------------------------------------------------------
    @property
    def stage(self) -> nn.Module:
        """This rank's stage (an ``nn.Module`` holding its layers, and the embeddings / head at the ends)."""
        return self.runner.stage

    @property
    def optimizer_file(self) -> str:
        return OPTIMIZER_FILE.format(rank=self.stage.index, stages=self.num_stages)

    # ----- one step -----------------------------------------------------------------------------------------------
    def unpack(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(model input, labels, attention_mask)`` of a collated batch; other keys are refused (the stages would
        not pass them to the model)."""
        name = self.recipe.input_name
        allowed = {name, "labels"} | ({"attention_mask"} if name == "input_ids" else set())
        unknown = sorted(set(inputs) - allowed)
        if unknown or name not in inputs:
            raise UnsupportedTrainingSetupError(
                f"Layer-parallel {self.recipe.name} takes batches with {sorted(allowed)} (the stages rebuild "
                f"everything else from the shapes), got {sorted(inputs)}. Remove the other columns in the collator."
            )
        return inputs[name], inputs.get("labels"), inputs.get("attention_mask")

    def step(self, inputs: Mapping[str, Any], num_items_in_batch) -> Tensor:
        """Forward and backward of this stage on one batch; the loss, the same on every rank."""
        model_input, labels, attention_mask = self.unpack(inputs)
        self.check_same_batch(model_input, labels, attention_mask)
        loss = self.runner.step(model_input, labels, attention_mask, num_items_in_batch=num_items_in_batch)
        self._synced = False
        out = torch.zeros((), dtype=torch.float32, device=self.device)
        if loss is not None:
            out.copy_(loss.detach().float())
        return self._broadcast(out, self.num_stages - 1)

    def count_items(self, batches: list[Mapping[str, Any]]) -> Tensor:
        """The loss terms of the batches of one optimizer step (``num_items_in_batch``), counted here: every rank
        holds the same batches."""
        total = 0
        for batch in batches:
            model_input, labels, _ = self.unpack(batch)
            total += self.stage.count_items(labels if labels is not None else model_input)
        return torch.tensor(total, device=self.device)

    def check_same_batch(self, *tensors: Tensor | None) -> None:
        """Raise if the ranks got different batches (one all-reduce of a checksum and its negation)."""
        parts = [t.detach().double().sum() for t in tensors if t is not None]
        shape = float(sum(t.numel() for t in tensors if t is not None))
        check = torch.stack([*parts, torch.tensor(shape, dtype=torch.float64, device=parts[0].device)]).to(self.device)
        both = torch.cat([check, -check])
        self._all_reduce(both, dist.ReduceOp.MAX)
        if not torch.equal(both[: len(check)], -both[len(check) :]):
            raise HighwayBPError(
                "Layer-parallel training needs the same batch on every rank, and the ranks got different ones: the "
                "training data loader shards or shuffles per process. Use a map-style dataset (with __len__) and the "
                "Trainer's own sampler, or seed your sampler identically on every rank."
            )

    # ----- gradient norm ------------------------------------------------------------------------------------------
    def grad_norm(self, max_norm: float | None = None) -> Tensor:
        """The gradient norm over every stage (a tied parameter counted once); with ``max_norm``, clip every stage's
        gradients by the same factor (as ``torch.nn.utils.clip_grad_norm_`` on the whole model)."""
        stage = self.stage
        tied = {id(p) for p in stage.tied} if stage.is_last else set()
        grads = [p.grad for p in self.runner.parameters() if p.grad is not None]
        counted = [p.grad for p in self.runner.parameters() if p.grad is not None and id(p) not in tied]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in counted:
            squares += torch.linalg.vector_norm(g.detach(), dtype=torch.float64) ** 2
        self._all_reduce(squares, dist.ReduceOp.SUM)
        total = squares.sqrt()
        if max_norm is not None:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return total

    # ----- the whole model ----------------------------------------------------------------------------------------
    def mark_stale(self) -> None:
        self._synced = False

    def sync_model(self) -> None:
        """Broadcast every stage's trained parameters into the whole model on every rank (collective: every rank
        calls it at the same point). Nothing to do when no step ran since the last call."""
        if self._synced:
            return
        with torch.no_grad():
            for stage in range(self.num_stages):
                params = [p for owner, p in self._owner if owner == stage]
                for dtype in dict.fromkeys(p.dtype for p in params):
                    group = [p for p in params if p.dtype == dtype]
                    flat = torch.cat([p.detach().reshape(-1) for p in group])
                    self._broadcast(flat, stage)
                    offset = 0
                    for p in group:
                        p.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
        self._synced = True

    # ----- optimizer state ----------------------------------------------------------------------------------------
    def save_optimizer(self, optimizer: torch.optim.Optimizer, output_dir: str) -> None:
        """Every rank writes its stage's optimizer state into the checkpoint folder."""
        os.makedirs(output_dir, exist_ok=True)
        torch.save(optimizer.state_dict(), os.path.join(output_dir, self.optimizer_file))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, checkpoint: str) -> None:
        path = os.path.join(checkpoint, self.optimizer_file)
        if not os.path.isfile(path):
            saved = sorted(f for f in os.listdir(checkpoint) if f.startswith("optimizer_stage"))
            raise UnsupportedTrainingSetupError(
                f"{checkpoint} has no optimizer state for stage {self.stage.index} of {self.num_stages} "
                f"({self.optimizer_file}; it holds {saved or 'none'}). Resume a layer-parallel run with the number "
                "of processes it was saved with."
            )
        optimizer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    # ----- collectives (gloo with CUDA tensors goes through host memory: in_place_collective) ---------------------
    def _broadcast(self, tensor: Tensor, stage: int) -> Tensor:
        if self.num_stages == 1:
            return tensor
        src = dist.get_global_rank(self.runner.comm.group, stage) if self.runner.comm.group is not None else stage
        return in_place_collective(lambda t: dist.broadcast(t, src=src), tensor)

    def _all_reduce(self, tensor: Tensor, op) -> Tensor:
        if self.num_stages == 1:
            return tensor
        return in_place_collective(lambda t: dist.all_reduce(t, op=op), tensor)


__all__ = ["OPTIMIZER_FILE", "LayerParallelModel", "LayerParallelTraining"]
