"""Layer-parallel Highway-BP on torch.distributed: one pipeline stage per process.

    torchrun --nproc_per_node 2 your_script.py      # gloo on CPU, NCCL on GPU

    from hf_hwbp.parallel import LayerParallelHighway
    runner = LayerParallelHighway(model, k=1, microbatches=4)   # every rank: same model, keeps its stage
    loss = runner.step(input_ids)                               # every rank, same batch; loss on the last rank

Modules: ``graph`` (the dependency graph of a step), ``runtime`` (a rank executes its tasks), ``stage_stack``
(the engine's recursion for one stage, with the scan across ranks), ``simulate`` (the same graphs replayed
with measured costs), ``calibrate`` (measures those costs), ``baselines`` (torch.distributed.pipelining's
schedules over the same stages), ``batched`` (one device: the input-VJPs of one iteration as one batched call).
"""

from .baselines import GPipeBaseline, TorchPipeline
from .batched import BatchedBlocks, BatchedStack
from .comm import Comm
from .graph import HighwayShape, StepGraph, Task, backprop_graph, highway_graph
from .layout import StageLayout, make_layout
from .runner import LayerParallelHighway
from .simulate import StackCosts, WorkCosts, best_backprop, predict
from .stage_stack import ChainScan, StageStack
from .stages import Stage, build_stage
from .tied import check_world
from .train import init_distributed, train_layer_parallel

__all__ = [
    "BatchedBlocks",
    "BatchedStack",
    "ChainScan",
    "Comm",
    "GPipeBaseline",
    "HighwayShape",
    "LayerParallelHighway",
    "StackCosts",
    "Stage",
    "StageLayout",
    "StageStack",
    "StepGraph",
    "Task",
    "TorchPipeline",
    "WorkCosts",
    "backprop_graph",
    "best_backprop",
    "build_stage",
    "check_world",
    "highway_graph",
    "init_distributed",
    "make_layout",
    "predict",
    "train_layer_parallel",
]
