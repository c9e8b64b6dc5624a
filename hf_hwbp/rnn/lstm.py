"""``HighwayLSTM``: a drop-in for ``torch.nn.LSTM`` whose backward is Highway-BP(k) through time.

It *is* an ``nn.LSTM`` (same constructor, parameter names and shapes, initialization, state dict and forward
signature with ``(h_0, c_0)``), so it loads an ``nn.LSTM``'s weights and can replace one in an existing model.
Only the training backward differs: the state through time is (h_t, c_t) and each layer (and direction) is one
Highway stack whose residual path is the cell state's c_{t-1} -> f_t (.) c_{t-1} with the forward's gates held
fixed (and what that reaches of h_t through o_t tanh'(c_t)); J_t is every path from h_{t-1}, through the gates
(docs/algorithm.md, "Residual paths that are not the identity"). ``k`` counts how many times a gradient may cross
a step's gates; k >= T is exact backprop through time. In eval mode (``module.eval()``) and in forwards that need
no gradient it runs ``nn.LSTM``'s own forward, so an eval-mode backward is ``nn.LSTM``'s ordinary one.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import HighwayBPError
from .base import HighwayRNNMixin
from .function import HighwayLSTMLayer, HighwaySettings


class HighwayLSTM(HighwayRNNMixin, nn.LSTM):
    """``torch.nn.LSTM`` trained with Highway-BP(k) through time.

    Args:
        *args, **kwargs: exactly those of ``torch.nn.LSTM`` (``input_size``, ``hidden_size``, ``num_layers``,
            ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``device``, ``dtype``); ``proj_size`` > 0
            is refused (``HighwayBPError``): a projected LSTM trains with ``torch.nn.LSTM``.
        k: Highway iterations per backward (an attribute: change it between steps for a schedule). k = 0 trains
            every step through the cell state's residual path only; k >= T (the sequence length) is exact backprop
            through time, at the cost of T iterations (use ``nn.LSTM`` for that).
        tol: stop iterating early once the relative change of the deltas falls below ``tol`` (None: run k).
        scan_chunk: time steps per chunk of the linear scans (None: about sqrt(T)).

    In eval mode the backward is ``nn.LSTM``'s ordinary one (exact; ``last_iterations`` is empty). Packed
    sequences are refused (pad them and mask the loss).
    """

    _num_states = 2

    def __init__(self, *args, k: int = 2, tol: float | None = None, scan_chunk: int | None = None, **kwargs):
        proj_size = kwargs.get("proj_size", args[7] if len(args) > 7 else 0)
        if proj_size:
            raise HighwayBPError(
                f"HighwayLSTM does not support proj_size > 0 (got {proj_size}): its backward has no projected "
                "recurrent state. Use torch.nn.LSTM for a projected LSTM (it trains with ordinary backprop)."
            )
        super().__init__(*args, k=k, tol=tol, scan_chunk=scan_chunk, **kwargs)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, k: int = 2, tol: float | None = None) -> HighwayLSTM:
        """A ``HighwayLSTM`` with ``lstm``'s configuration, weights, device, dtype and train/eval mode."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"from_lstm expects a torch.nn.LSTM, got {type(lstm).__name__}.")
        return cls._converted(lstm, k, tol)

    def _unwrap_states(self, hx: object) -> list[Tensor] | None:
        if hx is None:
            return None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("HighwayLSTM expects hx as a tuple (h_0, c_0), as torch.nn.LSTM does.")
        return list(hx)

    def _wrap_states(self, states: list[Tensor]) -> tuple[Tensor, Tensor]:
        return states[0], states[1]

    def _apply_layer(
        self, source: Tensor, states: list[Tensor], settings: HighwaySettings, index: int
    ) -> tuple[Tensor, list[Tensor]]:
        out, last_h, last_c = HighwayLSTMLayer.apply(source, *states, settings, index, *self._layer_weights(index))
        return out, [last_h, last_c]
