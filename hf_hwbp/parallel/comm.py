"""Comm: the point-to-point and collective calls of the pipeline, with a count of the bytes each rank sends.

Byte convention (payload only, no headers): ``send`` counts the tensor once; ``broadcast`` counts it once
per receiver at the source; ``all_gather`` counts a rank's tensor once per other rank; ``all_reduce`` over
n ranks counts ``2 (n - 1) / n`` times the tensor per rank (a ring). Sends are asynchronous (``isend``) so
that a stage never waits for its neighbour to post the matching receive; ``wait()`` drains them.

Setting ``comm.trace = []`` records ``(op, peer, thread CPU time)`` at every call (scripts/bench_pipeline.py
replays these to estimate the step time of an idle machine from the compute between calls).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor


class Comm:
    """The communication of one stage with the others, in a process group whose ranks are the stages."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.trace: list[tuple] | None = None
        self._pending: list[tuple[dist.Work, Tensor]] = []

    def _mark(self, op: str, peer) -> None:
        if self.trace is not None:
            self.trace.append((op, peer, time.thread_time()))

    # ----- point to point ------------------------------------------------------------------------------
    def send(self, tensor: Tensor, dst: int) -> None:
        self._mark("send", dst)
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, group=self.group, group_dst=dst)
        self._pending.append((work, tensor))  # keep the buffer alive until the send completes
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int) -> Tensor:
        self._mark("recv", src)
        buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buffer, group=self.group, group_src=src)
        return buffer

    def wait(self) -> None:
        """Complete every pending send."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    # ----- collectives ---------------------------------------------------------------------------------
    def broadcast(self, tensor: Tensor | None, shape, dtype: torch.dtype, device: torch.device, src: int) -> Tensor:
        """``tensor`` from stage ``src`` on every stage (others pass None)."""
        if self.world_size == 1:
            return tensor
        self._mark("broadcast", src)
        if self.rank == src:
            tensor = tensor.detach().contiguous()
            self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world_size - 1)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, group=self.group, group_src=src)
        return tensor

    def exclusive_suffix_sum(self, tensor: Tensor, mode: str = "chain") -> Tensor:
        """``sum of tensor over the stages after this one`` on every stage (zeros on the last).

        ``mode="chain"``: the last stage sends its tensor down, each stage adds its own and passes the running
        sum on (S - 1 tensors cross, S - 1 hops). ``mode="allgather"``: one all_gather of every stage's
        tensor, each stage adds the later ones (S (S - 1) tensors cross, one collective).
        """
        rank, world = self.rank, self.world_size
        if world == 1:
            return torch.zeros_like(tensor)
        if mode == "allgather":
            self._mark("collective", tuple(range(world)))
            gathered = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(gathered, tensor.contiguous(), group=self.group)
            self.bytes_sent += tensor.numel() * tensor.element_size() * (world - 1)
            if rank == world - 1:
                return torch.zeros_like(tensor)
            total = gathered[world - 1]
            for s in range(world - 2, rank, -1):
                total = total + gathered[s]
            return total
        if mode != "chain":
            raise ValueError(f"Unknown scan mode {mode!r}; use 'chain' or 'allgather'.")
        if rank == world - 1:
            self.send(tensor, rank - 1)
            return torch.zeros_like(tensor)
        later = self.recv(tensor.shape, tensor.dtype, tensor.device, rank + 1)
        if rank > 0:
            self.send(later + tensor, rank - 1)
        return later

    def all_reduce_sum(self, tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
        """Sum ``tensor`` in place over ``group`` (default: all stages)."""
        group = self.group if group is None else group
        n = dist.get_world_size(group)
        if n > 1:
            if self.trace is not None:
                ranks = range(self.world_size)
                if group is not self.group:  # stage indices of the subgroup's members
                    members = dist.get_process_group_ranks(group)
                    ranks = members if self.group is None else [dist.get_group_rank(self.group, g) for g in members]
                self._mark("collective", tuple(ranks))
            dist.all_reduce(tensor, group=group)
            self.bytes_sent += tensor.numel() * tensor.element_size() * 2 * (n - 1) // n
        return tensor
