"""The planner: "Will Highway-BP make my training faster?", answered on the user's model and machine.

``plan(model, example_batch, ...)`` (also ``hf_hwbp.plan``) measures backprop and Highway-BP(k) steps here, the
per-layer costs of each kind of work, peak memory and, with ``processes=N``, the link between N processes;
predicts one device, DDP, FSDP2 and layer-parallel stages with the calibrated simulator
(``hf_hwbp.parallel.simulate``); and recommends the fastest mode and the k the quality evidence supports.
``python -m hf_hwbp.plan`` is its command line (``hf_hwbp.planner.cli``). docs/planner.md says how it measures.

Modules: ``core`` (``plan``), ``measure`` (one-device steps), ``memory`` (peaks), ``launch`` / ``worker`` (the
N-process measurement), ``predict`` (the simulator and the collectives), ``evidence`` (which k), ``report``
(the table, the files), ``cli`` (the flags).
"""

from .core import plan
from .evidence import KEvidence, recommended_k
from .report import Plan, Row

__all__ = ["KEvidence", "Plan", "Row", "plan", "recommended_k"]
