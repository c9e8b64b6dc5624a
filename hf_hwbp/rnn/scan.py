"""The reverse linear scan along a gated residual path, vectorized over time (no Python loop over T).

Through time, the residual path of a gated cell is h_{t-1} -> a_t (.) h_{t-1}, with the gate a_t of the forward
held fixed, so accumulating an inflow c along it (docs/algorithm.md, "Residual paths that are not the identity")
is the linear recurrence

    delta_T = top,    delta_i = c_i + a_{i+1} (.) delta_{i+1},    i = T-1 .. 0.

A Python loop over T would walk T tiny steps one after another, which is exactly what Highway-BP wants to avoid.
``ReverseLinearScan`` cuts the T states into M chunks of C steps and works on all M chunks at once: a first sweep
down the C positions of every chunk finds what the chunk's own inflow adds at its bottom; the carries between
chunks then take one step per chunk on a [B, H] tensor; a second sweep down the chunks, now starting from their
carries, writes the deltas. That is about 2C + M ~ 3 sqrt(T) small steps and two passes over the data, no
full-size temporary, and no log/exp of gates (a gate can be ~0). The product of the coefficients over each chunk
depends only on the (fixed) gates, so it is computed once and reused by every scan of the backward.
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
        self._through = self._chunk_products() if self.num_chunks > 0 else None

    def _chunked(self, tensor: Tensor) -> Tensor:
        """[T, *state] -> [M, C, *state] over the chunked part [rest, T)."""
        return tensor[self.rest :].view(self.num_chunks, self.chunk, *tensor.shape[1:])

    def _chunk_products(self) -> Tensor:
        """[M, *state]: the product of a over each chunk, i.e. how the carry above a chunk reaches its bottom."""
        a = self._chunked(self.coefficients)
        through = a[:, -1].clone()
        for p in range(self.chunk - 2, -1, -1):
            through.mul_(a[:, p])
        return through

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
        # 1. what each chunk adds at its bottom from its own inflow (all chunks at once, nothing stored)
        from_inside = c[:, -1].clone()
        for p in range(self.chunk - 2, -1, -1):
            torch.addcmul(c[:, p], a[:, p], from_inside, out=from_inside)
        # 2. the carries, chunk by chunk from the top: carry[m] is delta at the first state above chunk m
        carry = torch.empty((self.num_chunks, *top.shape), dtype=top.dtype, device=top.device)
        carry[-1] = top
        for m in range(self.num_chunks - 1, 0, -1):
            torch.addcmul(from_inside[m], self._through[m], carry[m], out=carry[m - 1])
        # 3. every chunk again, now from its carry, writing the deltas (all chunks at once)
        deltas = self._chunked(out[:-1])
        torch.addcmul(c[:, -1], a[:, -1], carry, out=deltas[:, -1])
        for p in range(self.chunk - 2, -1, -1):
            torch.addcmul(c[:, p], a[:, p], deltas[:, p + 1], out=deltas[:, p])


def forward_linear_scan(coefficients: Tensor, inflow: Tensor, initial: Tensor, chunk: int | None = None) -> Tensor:
    """x_0 = initial, x_t = inflow[t-1] + coefficients[t-1] (.) x_{t-1}: [x_0, ..., x_T] as one [T + 1, *state].

    The same chunked scheme as ``ReverseLinearScan``, forward in time and used once: an LSTM's cell states
    c_t = f_t c_{t-1} + i_t g_t, which torch's fused forward does not return, from the recomputed gates.
    """
    num_steps = coefficients.shape[0]
    state = coefficients.shape[1:]
    chunk = min(default_chunk(num_steps) if chunk is None else chunk, max(num_steps, 1))
    num_chunks = num_steps // chunk
    done = num_chunks * chunk  # the chunks cover steps 1..done; the rest follows one step at a time
    out = torch.empty((num_steps + 1, *state), dtype=initial.dtype, device=initial.device)
    out[0] = initial
    if num_chunks > 0:
        a = coefficients[:done].view(num_chunks, chunk, *state)
        c = inflow[:done].view(num_chunks, chunk, *state)
        # 1. what each chunk ends at from its own inflow, and how a state before it reaches its end
        from_inside, through = c[:, 0].clone(), a[:, 0].clone()
        for p in range(1, chunk):
            torch.addcmul(c[:, p], a[:, p], from_inside, out=from_inside)
            through.mul_(a[:, p])
        # 2. the state before each chunk, chunk by chunk
        carry = torch.empty((num_chunks, *state), dtype=initial.dtype, device=initial.device)
        carry[0] = initial
        for m in range(1, num_chunks):
            torch.addcmul(from_inside[m - 1], through[m - 1], carry[m - 1], out=carry[m])
        # 3. every chunk again from its carry, writing the states (all chunks at once)
        states = out[1 : done + 1].view(num_chunks, chunk, *state)
        torch.addcmul(c[:, 0], a[:, 0], carry, out=states[:, 0])
        for p in range(1, chunk):
            torch.addcmul(c[:, p], a[:, p], states[:, p - 1], out=states[:, p])
    for t in range(done, num_steps):
        torch.addcmul(inflow[t], coefficients[t], out[t], out=out[t + 1])
    return out
