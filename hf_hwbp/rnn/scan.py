"""The reverse linear scan along a gated residual path, vectorized over time (no Python loop over T).

Through time, the residual path of a gated cell is h_{t-1} -> a_t (.) h_{t-1}, with the gate a_t of the forward
held fixed, so accumulating an inflow c along it (docs/algorithm.md, "Residual paths that are not the identity")
is the linear recurrence

    delta_T = top,    delta_i = c_i + a_{i+1} (.) delta_{i+1},    i = T-1 .. 0.

A Python loop over T would walk T tiny steps one after another, which is exactly what Highway-BP wants to avoid.
``ReverseLinearScan`` cuts the T states into M chunks of C steps. Inside a chunk it scans from a zero carry, with
one Python step per position but all M chunks at once; the carries between chunks are one step per chunk on a
[B, H] tensor; one vectorized multiply-add then adds each chunk's carry, weighted by the product of the
coefficients above it. That is about C + M ~ 2 sqrt(T) small steps plus two passes over the data, and no
log/exp of gates (a gate can be ~0). The chunk products depend only on the coefficients, which stay fixed through
all Highway iterations, so they are computed once and reused by every scan.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def default_chunk(num_steps: int) -> int:
    """About sqrt(T): balances the steps inside a chunk against the steps between chunks."""
    return max(1, math.isqrt(max(num_steps, 1)))


class ReverseLinearScan:
    """delta_i = c_i + a_{i+1} delta_{i+1} from delta_T = top, for fixed coefficients.

    Args:
        coefficients: [T, *state] with ``coefficients[i]`` = a_{i+1}, the coefficient that carries delta_{i+1}
            down to delta_i (for a GRU, the update gate z_{i+1}).
        chunk: steps per chunk (default about sqrt(T)).
    """

    def __init__(self, coefficients: Tensor, chunk: int | None = None):
        self.coefficients = coefficients
        num_steps = coefficients.shape[0]
        self.num_steps = num_steps
        chunk = default_chunk(num_steps) if chunk is None else chunk
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}.")
        self.chunk = min(chunk, max(num_steps, 1))
        self.num_chunks = num_steps // self.chunk
        # States [0, rest) are scanned one by one after the chunks; the chunks cover [rest, T).
        self.rest = num_steps - self.num_chunks * self.chunk
        self._products = self._chunk_products() if self.num_chunks > 0 else None

    def _chunked(self, tensor: Tensor) -> Tensor:
        """[T, *state] -> [M, C, *state] over the chunked part [rest, T)."""
        return tensor[self.rest :].view(self.num_chunks, self.chunk, *tensor.shape[1:])

    def _chunk_products(self) -> Tensor:
        """products[m, p] = a at positions p..C-1 of chunk m, multiplied: how the carry above the chunk reaches p."""
        a = self._chunked(self.coefficients)
        products = torch.empty_like(a)
        products[:, -1] = a[:, -1]
        for p in range(self.chunk - 2, -1, -1):
            torch.mul(a[:, p], products[:, p + 1], out=products[:, p])
        return products

    def __call__(self, top: Tensor, inflow: Tensor | None, out: Tensor | None = None) -> Tensor:
        """[delta_0, ..., delta_T] as one [T + 1, *state] tensor; ``inflow`` [T, *state] (None: zero inflow).

        ``out`` (optional, contiguous [T + 1, *state], not ``inflow``) receives the result.
        """
        num_steps, a = self.num_steps, self.coefficients
        if out is None:
            out = torch.empty((num_steps + 1, *top.shape), dtype=top.dtype, device=top.device)
        out[num_steps] = top
        if inflow is None:
            inflow = torch.zeros_like(a)
        if self.num_chunks > 0:
            self._scan_chunks(top, inflow, out)
        for i in range(self.rest - 1, -1, -1):  # the remainder below the chunks: fewer than C steps
            torch.addcmul(inflow[i], a[i], out[i + 1], out=out[i])
        return out

    def _scan_chunks(self, top: Tensor, inflow: Tensor, out: Tensor) -> None:
        a, c = self._chunked(self.coefficients), self._chunked(inflow)
        local = self._chunked(out[:-1])  # a view: the chunks are scanned in place
        # 1. inside every chunk at once, from a zero carry
        local[:, -1] = c[:, -1]
        for p in range(self.chunk - 2, -1, -1):
            torch.addcmul(c[:, p], a[:, p], local[:, p + 1], out=local[:, p])
        # 2. the carries: carry[m] is delta at the top of chunk m (the first state of chunk m + 1)
        products = self._products
        carry = torch.empty((self.num_chunks, *top.shape), dtype=top.dtype, device=top.device)
        carry[-1] = top
        for m in range(self.num_chunks - 1, 0, -1):
            torch.addcmul(local[m, 0], products[m, 0], carry[m], out=carry[m - 1])
        # 3. every state gets its chunk's carry through the coefficients above it
        local.addcmul_(products, carry.unsqueeze(1))
