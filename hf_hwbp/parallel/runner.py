"""LayerParallelHighway: one pipeline stage per process, trained with layer-parallel Highway-BP(k) or backprop."""

from __future__ import annotations

from dataclasses import replace

import torch.distributed as dist
from torch import Tensor, nn

from ..config import HighwayConfig
from ..errors import HighwayBPError
from .arch import get_module
from .comm import Comm
from .graph import HighwayShape, StepGraph, Task, backprop_graph, highway_graph
from .runtime import MicroBatch, StageRuntime
from .simulate import (
    StackCosts,
    Timeline,
    WorkCosts,
    backprop_task_cost,
    highway_task_cost,
    list_schedule,
    message_latency,
    replay,
    split_batch,
)
from .stages import build_stage
from .tied import TiedGrads, check_world, tie_group

METHODS = ("highway", "backprop")
BACKPROP_ORDERS = ("gpipe", "1f1b")


def flop_costs(config, seq_len: int, layers_per_block: int = 1) -> StackCosts:
    """Relative per-layer costs from FLOP counts, for planning when nothing was measured (one unit = the
    forward of one layer on one sample). Measured costs (``hf_hwbp.parallel.simulate``) plan better."""
    h = config.hidden_size
    v = getattr(config, "vocab_size", None) or getattr(config, "num_labels", 2)  # LM head, or a classifier
    layer = 24 * h * h + 4 * seq_len * h  # FLOPs per token of a transformer layer's forward (x2 for mul-add)
    head = 2 * h * v / layer
    unit = WorkCosts(
        f=1.0, b=2.0, v=1.2, w=1.7, bi=1.2, bw=0.9, head_f=head, head_b=2 * head, head_bi=head, add=2.0 / layer * h
    )
    return StackCosts("flop-estimate", config.num_hidden_layers, layers_per_block, 1.0, {1: unit}, latency=0.05)


class LayerParallelHighway:
    """Trains one pipeline stage of a model per process, with layer-parallel Highway-BP(k) or backprop.

    Launch one process per stage (``torchrun --nproc_per_node S``) and initialize ``torch.distributed``
    first (gloo on CPU, NCCL on GPU). Every process builds the same full model (same seed or checkpoint) and
    wraps it; each keeps only its stage: the embeddings and the first layers on rank 0, the next layers on
    rank 1, ..., the final norm, head and loss on rank S - 1. Call :meth:`step` on every rank with the same
    batch; it adds this stage's gradients to ``.grad`` of :meth:`parameters` (tied parameters, such as
    GPT-2's ``lm_head.weight`` = ``wte.weight``, are summed between the first and last stage) and returns
    the loss on the last rank. Step your optimizer over :meth:`parameters` on every rank.

    A step runs the batch as M micro-batches through a schedule computed from the step's dependency graph
    (``hf_hwbp.parallel.graph``): forwards, Highway iterations and per-block parameter steps of different
    micro-batches interleave, and a micro-batch's iterations wait only for the per-iteration scan from the
    stages above. Each micro-batch's loss is its token sum over the batch's token count, so the gradient is
    the whole batch's for every M.

    Args:
        model: a supported model (``hf_hwbp.parallel.arch.supported_models()``: GPT-2 and Llama-family causal
            LMs, ViTForImageClassification; dropout as you like; in train mode).
        k: Highway iterations (int >= 0); clamped to the number of blocks, where it is exact backprop.
        group_size: layers per Highway block, as in ``patch_model`` (blocks never straddle stages), or
            ``"stage"``: each stage is one block (exact backprop inside a stage).
        method: ``"highway"`` (layer-parallel Highway-BP) or ``"backprop"`` (pipeline backprop with the same
            placement and micro-batches, in ``backprop_order``: the baseline).
        num_stages: the stages requested; must equal the process group's size (default: that size).
        scan: deprecated, ignored: the per-stage sums always reach the stages below by ``"chain"`` (one message
            per stage boundary and iteration, overlapping with other micro-batches); any other value raises.
        tol: optional adaptive stop, as in ``HighwayConfig``, decided per micro-batch (one all_reduce of two
            scalars per iteration). Only with ``microbatches=1``.
        blocks_per_stage: optional explicit count of Highway blocks per stage.
        microbatches: M >= 1 slices of the batch along dim 0.
        costs: the per-layer costs the schedule is planned with (``hf_hwbp.parallel.simulate.StackCosts``,
            e.g. measured by ``benchmarks/simulate_pipeline.py``); default: FLOP estimates. Must be the same on
            every rank.
        fuse: run the parameter VJP of a block together with its input VJP once its delta is final.
        backprop_order: ``"gpipe"`` or ``"1f1b"`` (``method="backprop"`` only).
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
        scan: str | None = None,
        tol: float | None = None,
        blocks_per_stage=None,
        microbatches: int = 1,
        costs: StackCosts | None = None,
        fuse: bool = True,
        backprop_order: str = "gpipe",
        process_group: dist.ProcessGroup | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise HighwayBPError(
                "LayerParallelHighway needs torch.distributed: launch with torchrun and call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first."
            )
        if method not in METHODS:
            raise ValueError(
                f"method must be one of {METHODS}, got {method!r} (torch's schedules: hf_hwbp.parallel.TorchPipeline)."
            )
        if scan not in (None, "chain"):  # the one scan there is; the argument stays for old callers
            raise ValueError(f"scan must be 'chain' (the scan that overlaps with micro-batches), got {scan!r}.")
        scan = "chain"
        if backprop_order not in BACKPROP_ORDERS:
            raise ValueError(f"backprop_order must be one of {BACKPROP_ORDERS}, got {backprop_order!r}.")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}.")
        self._config = HighwayConfig.from_options(k=k, tol=tol)  # validates k (an int) and tol
        self._check_tol(tol, microbatches)
        world_size = dist.get_world_size(process_group)
        num_stages = check_world(num_stages, world_size)
        self.stage = build_stage(
            model,
            dist.get_rank(process_group),
            num_stages,
            group_size=group_size,
            blocks_per_stage=blocks_per_stage,
        )
        recipe = self.stage.recipe
        # the same on every rank (each still holds the whole model here): shapes the graph of every step
        self.need_input_grad = any(
            p.requires_grad for path in recipe.embeddings.values() for p in get_module(model, path).parameters()
        )
        self.method = method
        self.scan = scan
        self.microbatches = microbatches
        self.fuse = fuse
        self.backprop_order = backprop_order
        self.costs = costs
        self.comm = Comm(process_group)
        tied = self.stage.has_tied
        self._tie = tie_group(tied, (0, num_stages - 1), process_group)
        self.last_iterations: int | None = None
        self.trace = False  # set True to record every task's (start, end, seconds waited) in ``last_trace``
        self.last_trace: list[tuple[Task, float, float, float]] | None = None
        self._plans: dict[tuple, tuple[StepGraph, list[list[Task]]]] = {}

    @staticmethod
    def _check_tol(tol: float | None, microbatches: int) -> None:
        if tol is not None and microbatches > 1:
            raise ValueError(
                "tol (adaptive stop) with microbatches > 1 is not supported by the layer-parallel runner: every "
                "micro-batch's stop statistics would be a collective in one global order. Use microbatches=1 or "
                "tol=None."
            )

    # ----- settings ------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._config.k

    @k.setter
    def k(self, value: int) -> None:
        """Change k between steps (same value on every rank)."""
        self._config = self._config.updated(k=value)

    @property
    def tol(self) -> float | None:
        return self._config.tol

    @tol.setter
    def tol(self, value: float | None) -> None:
        """Change the adaptive stop between steps (same value on every rank; ``microbatches=1`` only)."""
        self._check_tol(value, self.microbatches)
        self._config = self._config.updated(tol=value)

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

    # ----- the schedule --------------------------------------------------------------------------------------
    def plan(self, batch_size: int, seq_len: int) -> tuple[StepGraph, list[list[Task]]]:
        """The step's graph and every rank's order of tasks for a batch of this shape (cached)."""
        sizes = tuple(split_batch(batch_size, self.microbatches))
        key = (sizes, seq_len, self.method, self._config.k, self._config.tol is not None)
        if key not in self._plans:
            self._plans[key] = self._make_plan(sizes, seq_len)
        return self._plans[key]

    def _make_plan(self, sizes: tuple[int, ...], seq_len: int) -> tuple[StepGraph, list[list[Task]]]:
        layout = self.stage.layout
        if self.method == "backprop":
            graph = backprop_graph(self.backprop_order, layout.num_stages, len(sizes))
            return graph, graph.order
        shape = self._highway_shape(len(sizes))
        graph = highway_graph(shape)
        costs = self.costs if self.costs is not None else flop_costs(self.stage.config, seq_len)
        timeline = list_schedule(graph, *self._cost_model(shape, costs, sizes, graph))
        return graph, timeline.order

    def _highway_shape(self, microbatches: int) -> HighwayShape:
        layout = self.stage.layout
        return HighwayShape(
            tuple(b - a for a, b in layout.stage_blocks),
            microbatches,
            self._config.k,
            need_input_grad=self.need_input_grad,
            tol=self._config.tol is not None,
        )

    def _cost_model(self, shape: HighwayShape, costs: StackCosts, sizes, graph: StepGraph):
        layout = self.stage.layout
        costs = replace(costs, layers_per_block=max(b - a for a, b in layout.blocks))  # this layout's block size
        return highway_task_cost(shape, costs, list(sizes), self.fuse), message_latency(graph, costs, list(sizes))

    def predict(self, costs: StackCosts, batch_size: int, seq_len: int) -> Timeline:
        """The simulator's replay of the schedule a step of this shape runs, with ``costs`` (seconds)."""
        graph, order = self.plan(batch_size, seq_len)
        sizes = split_batch(batch_size, self.microbatches)
        graph = StepGraph(graph.num_ranks, graph.placement, graph.deps, order, graph.info)
        if self.method == "backprop":
            cost = backprop_task_cost(graph, costs, sizes, costs.task_overhead)  # this runtime's overhead
            return replay(graph, cost, message_latency(graph, costs, sizes))
        return replay(graph, *self._cost_model(self._highway_shape(len(sizes)), costs, sizes, graph))

    # ----- one step ------------------------------------------------------------------------------------
    def step(
        self,
        inputs: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor | None:
        """Forward and backward of one batch on this stage; returns the (detached) loss on the last stage.

        Every rank passes the same batch: ``inputs`` is the model's input (``input_ids`` of a causal LM,
        ``pixel_values`` of ViT; the first stage embeds it, every stage reads its shape), ``labels`` (read by the
        last stage) defaults to ``inputs`` for causal LMs (shifted inside the loss, as in transformers), and
        ``attention_mask`` (causal LMs) reaches every stage. Gradients are added to ``.grad`` (call it once per
        micro-batch of a gradient accumulation, passing the accumulated batch's ``num_items_in_batch``, as the
        Trainer does). Run it under ``torch.autocast`` for mixed precision: the forwards run in the caller's
        autocast state, messages travel in the parameters' dtype.
        """
        self._check_tol(self._config.tol, self.microbatches)
        stage = self.stage
        if labels is None:
            if not stage.recipe.labels_from_input:
                raise ValueError(f"Layer-parallel {stage.recipe.name} needs labels.")
            labels = inputs
        device = stage.device
        inputs = inputs.to(device)
        labels = labels.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        if stage.is_first and self.method == "highway":
            wanted = any(p.requires_grad for p in stage.embeddings.parameters())
            if wanted != self.need_input_grad:
                raise ValueError(
                    "The embeddings' requires_grad changed after LayerParallelHighway was built; build the runner "
                    "after freezing or unfreezing them."
                )
        sizes = split_batch(inputs.shape[0], self.microbatches)
        if num_items_in_batch is None and len(sizes) > 1:
            num_items_in_batch = stage.count_items(labels)  # the whole batch's mean over its loss terms
        seq_len = stage.activation_shape(inputs)[1]
        graph, order = self.plan(inputs.shape[0], seq_len)
        micro, start = [], 0
        for size in sizes:
            part = slice(start, start + size)
            start += size
            micro.append(
                MicroBatch(
                    inputs[part],
                    labels[part],
                    attention_mask[part] if attention_mask is not None else None,
                )
            )
        runtime = StageRuntime(
            stage,
            self.comm,
            graph,
            order,
            method=self.method,
            k=self._config.k,
            tol=self._config.tol,
            need_input_grad=self.need_input_grad,
            fuse=self.fuse,
        )
        runtime.trace = [] if self.trace else None
        with TiedGrads(stage.tied, self.comm, self._tie):
            loss, iterations = runtime.run(micro, num_items_in_batch)
        self.last_trace = runtime.trace
        if self.method == "highway":
            self.last_iterations = max(iterations) if self._config.k and self.num_blocks else 0
        return loss
