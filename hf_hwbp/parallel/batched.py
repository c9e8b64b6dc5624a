"""Moved to ``hf_hwbp.batched`` (the batched backend beside the engine); kept so old imports work."""

from ..batched import BatchedBlocks, BatchedStack

__all__ = ["BatchedBlocks", "BatchedStack"]
