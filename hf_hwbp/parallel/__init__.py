"""Layer-parallel Highway-BP on torch.distributed: one pipeline stage per process.

    torchrun --nproc_per_node 2 your_script.py      # gloo on CPU, NCCL on GPU

    from hf_hwbp.parallel import LayerParallelHighway, train_layer_parallel
    runner = LayerParallelHighway(model, k=1)       # every rank: same model, keeps its stage
    loss = runner.step(input_ids)                   # every rank, same batch; loss on the last rank

See ``schedule.py`` for the algorithm and ``LayerParallelHighway`` for the contract.
"""

from .comm import Comm
from .gpipe import GPipeBaseline
from .layout import StageLayout, make_layout
from .runner import LayerParallelHighway, check_world
from .stages import Stage, build_stage
from .train import init_distributed, train_layer_parallel

__all__ = [
    "Comm",
    "GPipeBaseline",
    "LayerParallelHighway",
    "Stage",
    "StageLayout",
    "build_stage",
    "check_world",
    "init_distributed",
    "make_layout",
    "train_layer_parallel",
]
