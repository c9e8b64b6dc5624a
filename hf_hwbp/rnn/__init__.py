"""Highway-BP through time for recurrent networks: ``HighwayGRU``, a drop-in for ``torch.nn.GRU``."""

from .gru import HighwayGRU

__all__ = ["HighwayGRU"]
