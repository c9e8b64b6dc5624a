"""The Highway-BP(k) recursion: one loop, a pluggable scan along the residual path. Knows nothing of transformers.

A stack of L blocks maps h_{j-1} to h_j. From the gradient ``d`` at the stack output (and optional gradients
``e_i`` that reach intermediate states from outside), Highway-BP (docs/algorithm.md) iterates

    delta^(0):   delta_L = d,  delta_i = e_i + R_{i+1}^T delta_{i+1}
    delta^(n+1): delta_L = d,  delta_i = e_i + R_{i+1}^T delta_{i+1} + J_{i+1}^T delta^(n)_{i+1}

where R_j is the residual path of block j (the identity for ``x + g(x)``; a fixed diagonal gate for gated
recurrent cells) and J_j the rest of the block's Jacobian. One iteration is therefore two steps:

1. *inflow*: the input-only VJPs u_j = J_j^T delta^(n)_j of every block, independent of each other (that is
   the parallelism), plus the e_i;
2. *scan*: accumulate the inflow along the residual path, from the top down. For identity residuals this is a
   reverse cumulative sum; across the ranks of a layer-parallel run it is a cumulative sum with one
   exchange between ranks; for gated cells it is a reverse linear scan.

``recursion_steps`` is that loop, written once (``run_recursion`` runs it to the end; a scheduler can advance it
step by step): it clamps k, decides which block VJPs can be reused (delta^(n)_j no longer changes once
n >= L - j, so its VJP is the previous one), and applies the adaptive stop. What varies between one process,
several ranks and recurrent cells lives in the ``HighwayStack`` it drives: how the deltas are stored, how the
VJPs are computed, and the ``ResidualScan``.

``RecordedStack`` is the stack of recorded local graphs (one per block, each ending at its own input leaf)
that the patch's backward and the layer-parallel stages use, with the parameter step (``parameter_vjps``);
``highway_backward`` is its one-call form.

A state may be a tuple of tensors (several residual streams that each block reads and hands on: LUKE's word and
entity states, LiLT's text and layout states), each with its own identity path. ``StatePacking`` holds such a state
as one flat tensor: the componentwise identity is then the identity, J_j the Jacobian over the whole tuple, and the
loop, the scans and the adaptive stop run unchanged; only the VJPs unpack it at the autograd boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class HighwayResult:
    """What one Highway backward produced.

    Attributes:
        input_grad: delta^(k)_0, the gradient for the stack input (None when not requested; a tuple of one
            gradient per stream when the state is several streams).
        param_grads: the gradients of the given parameters, in their order (None for one no block uses).
        iterations: the number of Highway iterations actually run (<= k, fewer with ``tol``).
        block_grads: delta^(k)_j for j = 1..L (only when ``keep_block_grads=True``; used by tests and the
            fidelity metrics).
    """

    input_grad: Tensor | tuple[Tensor, ...] | None
    param_grads: tuple[Tensor | None, ...]
    iterations: int
    block_grads: list[Tensor] | list[tuple[Tensor, ...]] | None = None


class StatePacking:
    """A state made of several tensors (streams), held as one flat tensor: the streams flattened, one after the other.

    The engine's deltas and inflows are flat tensors; ``unpack`` gives the streams' views for autograd, ``pack``
    puts gradients back (zeros where a stream got none). With one stream both are the identity (no copy)."""

    def __init__(self, like: Sequence[Tensor]):
        dtypes = {t.dtype for t in like}
        if len(dtypes) != 1:
            raise ValueError(f"The streams of a state must share one dtype; got {sorted(map(str, dtypes))}.")
        self.shapes = [t.shape for t in like]
        self.sizes = [t.numel() for t in like]
        self.dtype = like[0].dtype
        self.device = like[0].device

    @property
    def streams(self) -> int:
        return len(self.shapes)

    def pack(self, parts: Sequence[Tensor | None]) -> Tensor | None:
        """One flat tensor from the streams' gradients (None where a stream got none; None when none did)."""
        if len(parts) != len(self.shapes):
            raise ValueError(f"Got {len(parts)} gradients for a state of {len(self.shapes)} streams.")
        if all(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        return torch.cat(
            [
                (p.reshape(-1) if p is not None else torch.zeros(n, dtype=self.dtype, device=self.device))
                for p, n in zip(parts, self.sizes)
            ]
        )

    def unpack(self, flat: Tensor) -> tuple[Tensor, ...]:
        """The streams of a flat state, as views of it."""
        if len(self.shapes) == 1:
            return (flat,)
        return tuple(part.view(shape) for part, shape in zip(flat.split(self.sizes), self.shapes))


def _streams(state: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


class HighwayStack(Protocol):
    """What ``run_recursion`` needs from a stack. ``Deltas``/``Inflow`` are the stack's own containers.

    Block indices are global and 1-based (block j reads h_{j-1} and writes h_j), so that a stack that holds
    only some blocks (a pipeline stage) applies the same reuse rule as the whole stack.
    """

    num_blocks: int  # L, the number of blocks of the whole stack (k is clamped to it)

    def inflow(self, delta: Any, fresh_until: int, release: bool) -> Any:
        """e_i + J_{i+1}^T delta_{i+1} for every state i this stack owns.

        Blocks j <= ``fresh_until`` need a fresh VJP; blocks above it may reuse the VJP of the previous call
        (their delta has not changed). With ``release=True`` the stack may drop ``delta``'s entries as it
        consumes them (the caller no longer needs them).
        """

    def scan(self, inflow: Any | None) -> Any:
        """The deltas from the inflow, accumulated from the top down; ``None`` gives delta^(0)."""

    def squared_change(self, new: Any, old: Any) -> tuple[Tensor, Tensor]:
        """(||new - old||^2, ||new||^2) over the whole stack (summed across ranks where it is split)."""


def recursion_steps(stack: HighwayStack, k: int, tol: float | None = None) -> Generator[tuple[str, int], None, Any]:
    """The recursion as a generator: it yields ``("inflow", n)`` before the n-th inflow and ``("scan", n)``
    before the n-th scan (n = 1..k), and returns ``(delta^(k), iterations)``.

    A scheduler that interleaves several recursions with other work (the layer-parallel runtime) advances it
    step by step; ``run_recursion`` simply drains it. k is clamped to the number of blocks (exact from there
    on). With ``tol``, iterations stop once ||delta^(n+1) - delta^(n)|| <= tol * ||delta^(n+1)|| over all states.
    """
    num_blocks = stack.num_blocks
    k = min(k, num_blocks)
    delta = stack.scan(None)
    iterations = 0
    for n in range(k):
        yield ("inflow", n + 1)
        # delta^(n)_j is exact for j >= L - n; it equals delta^(n-1)_j for j >= L - n + 1, whose VJPs are reused.
        inflow = stack.inflow(delta, fresh_until=num_blocks - n, release=tol is None)
        yield ("scan", n + 1)
        new = stack.scan(inflow)
        iterations += 1
        if tol is not None:
            change_sq, norm_sq = stack.squared_change(new, delta)
            if change_sq.sqrt() <= tol * norm_sq.sqrt():
                delta = new
                break
        delta = new
    return delta, iterations


def run_recursion(stack: HighwayStack, k: int, tol: float | None = None) -> tuple[Any, int]:
    """Run k Highway iterations on ``stack``; return delta^(k) (the stack's container) and the iterations run."""
    steps = recursion_steps(stack, k, tol)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


class ResidualScan:
    """Accumulation along identity residual paths on one process: a reverse cumulative sum.

    ``__call__(top, inflow)`` returns [delta_0, ..., delta_m] with delta_m = top and
    delta_i = inflow[i] + delta_{i+1} (an entry of ``inflow`` may be None: nothing flows in there).
    Subclasses change where the sum comes from (other ranks) or what the residual path is.
    """

    def __call__(self, top: Tensor, inflow: list[Tensor | None]) -> list[Tensor]:
        out: list[Tensor] = [top] * (len(inflow) + 1)
        running = top
        for i in range(len(inflow) - 1, -1, -1):
            if inflow[i] is not None:
                running = running + inflow[i]
                inflow[i] = None  # consumed: keep at most one gradient per state alive
            out[i] = running
        return out

    def all_reduce(self, stats: Tensor) -> Tensor:
        """Sum ``stats`` over every part of the stack (one process: nothing to do)."""
        return stats


class GatedResidualScan(ResidualScan):
    """Accumulation along gated residual paths R_j = diag(a_j) on one process: a reverse linear scan.

    ``gates[i]`` is a_j of local block i (the block that reads state i); delta_i = inflow[i] + a_j * delta_{i+1}.
    Used for blocks ``act(h + g(h))`` whose activation's derivative, held fixed, is the residual path (the HF
    ResNet's ReLU: a_j = 1 where the block's output is positive).
    """

    def __init__(self, gates: Sequence[Tensor]):
        self.gates = list(gates)

    def __call__(self, top: Tensor, inflow: list[Tensor | None]) -> list[Tensor]:
        if len(self.gates) != len(inflow):
            raise ValueError(f"Got {len(self.gates)} residual gates for {len(inflow)} blocks.")
        out: list[Tensor] = [top] * (len(inflow) + 1)
        running = top
        for i in range(len(inflow) - 1, -1, -1):
            running = self.gates[i] * running
            if inflow[i] is not None:
                running = running + inflow[i]
                inflow[i] = None
            out[i] = running
        return out


class RecordedStack:
    """Blocks recorded as local autograd graphs: block j wrote ``outputs[j-1]`` from the leaf ``inputs[j-1]``.

    J_j^T v is the input-VJP of block j minus v (block j is x + g_j(x); the subtraction makes the recursion
    exact for any block, residual or not). The local graphs are retained through the iterations: the
    parameter step still needs them.

    A block whose state is several streams has a tuple of input leaves and a tuple of outputs (one per stream);
    ``d`` and the ``extra_grads`` are then flat (``packing.pack``) or tuples, and the deltas are flat
    (``packing.unpack`` gives the streams). A stream input that does not require grad (a stack input nobody
    trains) contributes no J^T term.

    Args:
        inputs, outputs: the blocks this stack owns, bottom to top (tensors, or tuples of one tensor per stream).
        d: the gradient at the top of these blocks (for a pipeline stage: at the stack output; the scan adds
            what flows in from the stages above).
        extra_grads: ``extra_grads[i]`` is e at the input state of local block i (i = 0 is h_0 for the whole
            stack); None entries for none.
        scan: the accumulation along the residual path.
        residual_gates: a_j for each local block when its residual path is diag(a_j) rather than the identity
            (gated blocks: J_j^T v is then the input-VJP minus a_j * v, and the scan is a linear scan).
        need_input_grad: whether delta_0 at the bottom is wanted (if not, block 1's VJP is skipped: it feeds
            delta_0 only).
        first_block: the global index of the state below local block 0 (0 for a whole stack).
        num_blocks: L of the whole stack (defaults to the number of local blocks).
        around_blocks: ``around_blocks(local_blocks, prefetch)`` gives a context manager entered around every
            autograd call through the local graphs of ``local_blocks`` (a list of local indices); ``prefetch``
            lists the blocks the next call needs. An engine that shards parameters gathers them there
            (``hf_hwbp.sharding``); default: nothing.
    """

    def __init__(
        self,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        d: Tensor,
        extra_grads: Sequence[Tensor | None] | None = None,
        *,
        scan: ResidualScan | None = None,
        residual_gates: Sequence[Tensor] | None = None,
        need_input_grad: bool = True,
        first_block: int = 0,
        num_blocks: int | None = None,
        around_blocks: Callable[[list[int], list[int]], AbstractContextManager] | None = None,
    ):
        if len(inputs) != len(outputs):
            raise ValueError(f"Got {len(inputs)} block inputs for {len(outputs)} block outputs.")
        streams = not isinstance(outputs[0], Tensor)
        self.packing = StatePacking(_streams(outputs[-1])) if streams else None
        self.unread_top: set[int] = set()
        if streams:
            if residual_gates is not None:
                raise ValueError("Gated residual paths are defined for a single-tensor state, not for several streams.")
            if any(len(_streams(x)) != self.packing.streams for x in list(inputs) + list(outputs)):
                raise ValueError(f"Every block input and output must have the state's {self.packing.streams} streams.")
            # A stream of the top state that no gradient reached (given as None in a tuple ``d``) stays out of the
            # top block's VJPs: the parameters that only it reads get no gradient (None), as under autograd.
            if not isinstance(d, Tensor):
                self.unread_top = {s for s, g in enumerate(d) if g is None}
                like = _streams(outputs[-1])
                d = self.packing.pack([g if g is not None else torch.zeros_like(y) for g, y in zip(d, like)])
            extra_grads = [
                e if e is None or isinstance(e, Tensor) else self.packing.pack(_streams(e)) for e in extra_grads or []
            ]
        if residual_gates is not None:
            if scan is not None:
                raise ValueError("residual_gates come with their own scan (a linear scan); do not pass scan= too.")
            scan = GatedResidualScan(residual_gates)
        self.gates = list(residual_gates) if residual_gates is not None else None
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.d = d
        local = len(self.outputs)
        extra = list(extra_grads or [])
        self.extra: list[Tensor | None] = [extra[i] if i < len(extra) else None for i in range(local)]
        self.scan_along = scan if scan is not None else ResidualScan()
        self.need_input_grad = need_input_grad
        self.first_block = first_block
        self.num_blocks = local if num_blocks is None else num_blocks
        self._reused: dict[int, Tensor] = {}  # local block index -> its last VJP, for blocks whose delta is final
        self.around_blocks = around_blocks if around_blocks is not None else _no_context

    def input_vjp(self, local_index: int, grad: Tensor) -> Tensor:
        """J^T grad of one local block: its full input-VJP minus the residual path (identity, or its gate)."""
        if self.packing is not None:
            return self._streams_vjp(local_index, grad) - grad
        (full,) = torch.autograd.grad(self.outputs[local_index], self.inputs[local_index], grad, retain_graph=True)
        return full - (grad if self.gates is None else self.gates[local_index] * grad)

    def _streams_vjp(self, local_index: int, grad: Tensor) -> Tensor:
        """The full input-VJP of a block whose state is several streams, flat. A stream input that does not require
        grad gets the residual path only (its J^T term is zero)."""
        grads = self.packing.unpack(grad)
        pairs = self._read_pairs(local_index, grads)
        inputs = self.inputs[local_index]
        wanted = [n for n, x in enumerate(inputs) if x.requires_grad]
        full = list(grads)
        if pairs and wanted:
            found = torch.autograd.grad(
                [y for y, _ in pairs],
                [inputs[n] for n in wanted],
                [g for _, g in pairs],
                retain_graph=True,
                allow_unused=True,
            )
            for n, g in zip(wanted, found):
                full[n] = g if g is not None else torch.zeros_like(grads[n])
        return self.packing.pack(full)

    def _read_pairs(self, local_index: int, grads: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(stream output, its gradient) of a block whose state is several streams, for the streams a gradient
        reaches (all but the unread ones of the top state)."""
        top = self.first_block + local_index + 1 == self.num_blocks
        return [
            (y, g)
            for s, (y, g) in enumerate(zip(self.outputs[local_index], grads))
            if y.requires_grad and not (top and s in self.unread_top)
        ]

    def inflow(self, delta: list[Tensor], fresh_until: int, release: bool) -> list[Tensor | None]:
        local = len(self.outputs)
        # Local block i is global block first_block + i + 1. J_1^T delta_1 feeds delta_0 only: skipped unless wanted;
        # a block above fresh_until whose VJP is stored reuses it; the others get a fresh VJP, from the top down.
        fresh = [
            i
            for i in range(local - 1, -1, -1)
            if (self.first_block + i + 1 > 1 or self.need_input_grad)
            and not (self.first_block + i + 1 > fresh_until and i in self._reused)
        ]
        following = dict(zip(fresh, fresh[1:] + [None]))  # each fresh VJP -> the next one (to prefetch)
        flow: list[Tensor | None] = [None] * local
        for i in range(local - 1, -1, -1):
            u = self._reused.get(i)  # None for a skipped block 1
            if i in following:
                with self.around_blocks([i], [] if following[i] is None else [following[i]]):
                    u = self.input_vjp(i, delta[i + 1])
                if self.first_block + i + 1 >= fresh_until:  # its delta is final: the next iteration reuses this VJP
                    self._reused[i] = u
            if release:
                delta[i + 1] = None
            e = self.extra[i]
            flow[i] = u if e is None else (e if u is None else u + e)
        return flow

    def scan(self, inflow: list[Tensor | None] | None) -> list[Tensor]:
        if inflow is None:
            inflow = list(self.extra)
        return self.scan_along(self.d, inflow)

    def squared_change(self, new: list[Tensor], old: list[Tensor]) -> tuple[Tensor, Tensor]:
        stats = torch.zeros(2, dtype=torch.float64, device=self.d.device)
        skip_input = self.first_block == 0 and not self.need_input_grad  # delta_0 is not computed: leave it out
        for fresh, previous in zip(new[1:] if skip_input else new, old[1:] if skip_input else old):
            stats[0] += (fresh - previous).double().pow(2).sum()
            stats[1] += fresh.double().pow(2).sum()
        stats = self.scan_along.all_reduce(stats)
        return stats[0], stats[1]

    def parameter_vjps(
        self,
        delta: Sequence[Tensor],
        wrt: Sequence[Tensor],
        blocks: Sequence[int] | None = None,
        *,
        prefetch: Sequence[int] = (),
        retain_graph: bool = False,
    ) -> tuple[Tensor | None, ...]:
        """The parameter step: sum_j (dg_j/dtheta)^T delta_j over the local ``blocks`` (default: all), for each
        tensor of ``wrt`` (parameters, or any leaf the blocks read), in one autograd call; None for one no block
        reads. ``delta`` is [delta_0, ..., delta_m] as the recursion returns it. Frees those blocks' graphs
        unless ``retain_graph``."""
        blocks = list(range(len(self.outputs))) if blocks is None else list(blocks)
        if not wrt or not blocks:
            return (None,) * len(wrt)
        outputs, grads = [self.outputs[i] for i in blocks], [delta[i + 1] for i in blocks]
        if self.packing is not None:  # every stream of every block, with its part of the block's delta
            pairs = [pair for i in blocks for pair in self._read_pairs(i, self.packing.unpack(delta[i + 1]))]
            outputs, grads = [y for y, _ in pairs], [g for _, g in pairs]
        with self.around_blocks(blocks, list(prefetch)):
            return torch.autograd.grad(outputs, list(wrt), grads, retain_graph=retain_graph, allow_unused=True)


def _no_context(blocks: list[int], prefetch: list[int]) -> AbstractContextManager:
    return contextlib.nullcontext()


def highway_iterations(
    inputs: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    outputs: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    d: Tensor | Sequence[Tensor],
    extra_grads: Sequence[Tensor | Sequence[Tensor | None] | None] | None = None,
    *,
    k: int,
    tol: float | None = None,
    need_input_grad: bool = True,
    residual_gates: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], int]:
    """Run k Highway iterations over recorded blocks; return [delta^(k)_0, ..., delta^(k)_L] and the iterations run.

    ``extra_grads[i]`` (i = 0..L-1) is e_i, a gradient reaching the state h_i from outside the stack (None for
    none); ``residual_gates[j-1]`` is a_j for gated residual paths (None: identity). The local graphs are
    retained: the parameter step still needs them. A state of several streams (tuples of tensors for the inputs,
    outputs, ``d`` and each e_i) gives each delta as a tuple too.
    """
    stack = RecordedStack(
        inputs, outputs, d, extra_grads, need_input_grad=need_input_grad, residual_gates=residual_gates
    )
    delta, iterations = run_recursion(stack, k, tol)
    if stack.packing is not None:
        delta = [stack.packing.unpack(v) for v in delta]
    return delta, iterations


def highway_backward(
    inputs: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    outputs: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    params: Sequence[Tensor],
    d: Tensor | Sequence[Tensor],
    extra_grads: Sequence[Tensor | Sequence[Tensor | None] | None] | None = None,
    *,
    k: int,
    tol: float | None = None,
    need_input_grad: bool = True,
    keep_block_grads: bool = False,
    residual_gates: Sequence[Tensor] | None = None,
) -> HighwayResult:
    """Highway-BP(k) of recorded blocks in one call: k iterations, then the parameter step
    (``RecordedStack.parameter_vjps``: one VJP of every block with its delta^(k)_j, which frees each local graph as
    it goes, as ordinary backprop does). ``params`` are the blocks' trainable parameters (each once);
    ``residual_gates`` as in ``highway_iterations``; a state of several streams gives ``input_grad`` and
    ``block_grads`` as tuples. A patched model runs the same stack from its autograd graph.
    """
    stack = RecordedStack(
        inputs, outputs, d, extra_grads, need_input_grad=need_input_grad, residual_gates=residual_gates
    )
    delta, iterations = run_recursion(stack, k, tol)
    param_grads = stack.parameter_vjps(delta, params)
    if stack.packing is not None:
        delta = [stack.packing.unpack(v) for v in delta]
    return HighwayResult(
        input_grad=delta[0] if need_input_grad else None,
        param_grads=param_grads,
        iterations=iterations,
        block_grads=delta[1:] if keep_block_grads else None,
    )
