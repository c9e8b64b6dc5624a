"""StageLayout: which layers, grouped into which Highway blocks, each pipeline stage holds. Pure arithmetic.

The stack of L layers is cut into Highway blocks of ``group_size`` consecutive layers (the last one may be
shorter), exactly as ``hf_hwbp.patch_model(model, k, group_size=G)`` groups them; the N blocks are then dealt
to S stages in contiguous runs, so a stage boundary is always a block boundary and the single-process and
the layer-parallel Highway-BP(k) compute the same thing. ``group_size="stage"`` makes every stage one block
(exact backprop inside a stage, Highway iterations across stages).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StageLayout:
    """The placement of a stack of ``num_layers`` layers on ``num_stages`` stages.

    Attributes:
        num_layers: L, the layers of the stack.
        num_stages: S, one per rank.
        blocks: the Highway blocks, bottom to top, each a ``(first_layer, end_layer)`` half-open range.
        stage_blocks: for each stage, the ``(first_block, end_block)`` half-open range of its blocks.
    """

    num_layers: int
    num_stages: int
    blocks: tuple[tuple[int, int], ...]
    stage_blocks: tuple[tuple[int, int], ...]

    @property
    def num_blocks(self) -> int:
        """N, the Highway blocks of the whole stack (k >= N is exact backprop)."""
        return len(self.blocks)

    def layers_of(self, stage: int) -> range:
        """The (global) layer indices held by ``stage``."""
        first, end = self.stage_blocks[stage]
        return range(self.blocks[first][0], self.blocks[end - 1][1])

    def local_blocks(self, stage: int) -> list[range]:
        """The blocks of ``stage`` as ranges of indices into its own layer list (0-based)."""
        first, end = self.stage_blocks[stage]
        offset = self.blocks[first][0]
        return [range(a - offset, b - offset) for a, b in self.blocks[first:end]]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return int(value)


def make_layout(
    num_layers: int,
    num_stages: int,
    group_size: int | str = 1,
    blocks_per_stage: Sequence[int] | None = None,
) -> StageLayout:
    """Cut ``num_layers`` layers into Highway blocks and deal them to ``num_stages`` stages.

    Args:
        num_layers: the layers of the stack.
        num_stages: the pipeline stages (one per rank).
        group_size: layers per Highway block (an int >= 1, as in ``patch_model``), or ``"stage"``: one block
            per stage (exact backprop inside each stage).
        blocks_per_stage: how many blocks each stage gets (must sum to the number of blocks); by default as
            even as possible, the earlier stages taking the remainder (the last stage also runs the head).

    Raises:
        ValueError: a stage would get no block (more stages than blocks), or the arguments are malformed.
    """
    num_layers = _positive_int("num_layers", num_layers)
    num_stages = _positive_int("num_stages", num_stages)
    if group_size == "stage":
        if num_stages > num_layers:
            raise ValueError(
                f"Cannot split a stack of {num_layers} layers into {num_stages} stages: every stage needs at least "
                f"one layer. Use at most {num_layers} processes (--nproc_per_node)."
            )
        layer_counts = _even_split(num_layers, num_stages, blocks_per_stage, "layers")
        bounds, start = [], 0
        for count in layer_counts:
            bounds.append((start, start + count))
            start += count
        return StageLayout(num_layers, num_stages, tuple(bounds), tuple((s, s + 1) for s in range(num_stages)))
    group_size = _positive_int("group_size", group_size)
    blocks = tuple((a, min(a + group_size, num_layers)) for a in range(0, num_layers, group_size))
    if num_stages > len(blocks):
        raise ValueError(
            f"Cannot place {len(blocks)} Highway block(s) ({num_layers} layers, group_size={group_size}) on "
            f"{num_stages} stages: every stage needs at least one block. Use at most {len(blocks)} processes, "
            "or a smaller group_size."
        )
    counts = _even_split(len(blocks), num_stages, blocks_per_stage, "blocks")
    stage_blocks, start = [], 0
    for count in counts:
        stage_blocks.append((start, start + count))
        start += count
    return StageLayout(num_layers, num_stages, blocks, tuple(stage_blocks))


def _even_split(total: int, parts: int, given: Sequence[int] | None, what: str) -> list[int]:
    if given is None:
        base, extra = divmod(total, parts)
        return [base + (1 if s < extra else 0) for s in range(parts)]
    counts = [int(c) for c in given]
    if len(counts) != parts or any(c < 1 for c in counts) or sum(counts) != total:
        raise ValueError(
            f"blocks_per_stage={list(given)} must give each of the {parts} stages at least one of the {total} "
            f"{what}, summing to {total}."
        )
    return counts
