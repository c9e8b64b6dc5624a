"""Highway-BP through time for recurrent networks: ``HighwayGRU`` and ``HighwayLSTM``, drop-ins for ``torch.nn``'s."""

from .gru import HighwayGRU
from .lstm import HighwayLSTM

__all__ = ["HighwayGRU", "HighwayLSTM"]
