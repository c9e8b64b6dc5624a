"""``HighwayGRU``: a drop-in for ``torch.nn.GRU`` whose backward is Highway-BP(k) through time.

It *is* an ``nn.GRU`` (same constructor, parameter names and shapes, initialization, state dict and forward
signature), so ``load_state_dict`` from an ``nn.GRU`` works and it can replace one in an existing model. Only the
training backward differs: each layer (and direction) is one Highway stack through time whose residual path is
the GRU's direct term z_t (.) h_{t-1} with the forward's gates held fixed (docs/algorithm.md, "Residual paths that
are not the identity"). ``k`` counts how many times a gradient may cross a step's gates; k >= T is exact
backprop through time. Forwards that need no gradient run ``nn.GRU``'s own forward, and so does a forward in eval mode
(``module.eval()``): its backward is ``nn.GRU``'s ordinary one and ``last_iterations`` is empty, the rule a patched
transformers model follows too.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import HighwayRNNMixin
from .function import HighwayGRULayer, HighwaySettings


class HighwayGRU(HighwayRNNMixin, nn.GRU):
    """``torch.nn.GRU`` trained with Highway-BP(k) through time.

    Args:
        *args, **kwargs: exactly those of ``torch.nn.GRU`` (``input_size``, ``hidden_size``, ``num_layers``,
            ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``device``, ``dtype``).
        k: Highway iterations per backward (an attribute: change it between steps for a schedule). k = 0 trains
            every step through the residual path only; k >= T (the sequence length) is exact backprop through
            time, at the cost of T iterations (use ``nn.GRU`` for that).
        tol: stop iterating early once the relative change of the deltas falls below ``tol`` (None: run k).
        scan_chunk: time steps per chunk of the reverse linear scan (None: about sqrt(T)).

    In eval mode the backward is ``nn.GRU``'s ordinary one (exact; ``last_iterations`` is empty). Packed sequences
    are refused (pad them and mask the loss); ``proj_size`` does not exist for GRUs.
    """

    @classmethod
    def from_gru(cls, gru: nn.GRU, k: int = 2, tol: float | None = None) -> HighwayGRU:
        """A ``HighwayGRU`` with ``gru``'s configuration, weights, device, dtype and train/eval mode."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"from_gru expects a torch.nn.GRU, got {type(gru).__name__}.")
        return cls._converted(gru, k, tol)

    def _apply_layer(
        self, source: Tensor, states: list[Tensor], settings: HighwaySettings, index: int
    ) -> tuple[Tensor, list[Tensor]]:
        out, last = HighwayGRULayer.apply(source, states[0], settings, index, *self._layer_weights(index))
        return out, [last]
