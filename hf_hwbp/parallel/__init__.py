"""Layer-parallel Highway-BP on torch.distributed: one pipeline stage per process.

Through the Trainer (one flag; ``hf_hwbp.parallel.trainer_mode``)::

    torchrun --nproc_per_node 2 train.py    # HighwayTrainer with HighwayTrainingArguments(layer_parallel=True, ...)

or the runner directly, in your own loop::

    from hf_hwbp.parallel import LayerParallelHighway
    runner = LayerParallelHighway(model, k=1, microbatches=4)   # every rank: same model, keeps its stage
    loss = runner.step(input_ids)                               # every rank, same batch; loss on the last rank

Modules: ``graph`` (the dependency graph of a step), ``runtime`` (a rank executes its tasks), ``stage_stack``
(the engine's recursion for one stage, with the scan across ranks), ``simulate`` (the same graphs replayed
with measured costs), ``calibrate`` (measures those costs), ``baselines`` (torch.distributed.pipelining's
schedules over the same stages). One device's batched backend (the input-VJPs of one iteration as one batched
call) is ``hf_hwbp.batched``.
"""

from .arch import supported_models
from .baselines import GPipeBaseline, TorchPipeline
from .comm import Comm
from .graph import HighwayShape, StepGraph, Task, backprop_graph, highway_graph
from .layout import StageLayout, make_layout
from .runner import LayerParallelHighway
from .simulate import StackCosts, WorkCosts, best_backprop, predict
from .stage_stack import ChainScan, StageStack
from .stages import Stage, build_stage
from .tied import check_world
from .trainer_mode import LayerParallelModel, LayerParallelTraining

__all__ = [
    "ChainScan",
    "Comm",
    "GPipeBaseline",
    "HighwayShape",
    "LayerParallelHighway",
    "LayerParallelModel",
    "LayerParallelTraining",
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
    "make_layout",
    "predict",
    "supported_models",
]
