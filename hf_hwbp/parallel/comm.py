"""Comm: the point-to-point and collective calls of the pipeline, with a count of the bytes each rank sends.

Byte convention (payload only, no headers): ``send`` counts the tensor once; ``all_reduce`` over n ranks counts
``2 (n - 1) / n`` times the tensor per rank (a ring). Sends are asynchronous (``isend``) so that a stage never
waits for its neighbour to post the matching receive; ``wait()`` drains them.

With the gloo backend and CUDA tensors (several processes sharing one GPU, where NCCL refuses to run), tensors
travel through host memory: a correctness setting, not a fast one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def in_place_collective(
    collective: Callable[[Tensor], object], tensor: Tensor, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Run ``collective(t)`` (an in-place call such as ``dist.all_reduce``) on ``tensor`` and return it.

    gloo reads and writes host tensors only: with gloo and a CUDA tensor the call runs on a host copy that is copied
    back. ``group`` is the process group the call uses (None: the default group), whose backend decides.
    """
    if tensor.is_cuda and dist.get_backend(group) == "gloo":
        host = tensor.cpu()
        collective(host)
        tensor.copy_(host)
    else:
        collective(tensor)
    return tensor


class Comm:
    """The communication of one stage with the others, in a process group whose ranks are the stages."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self._pending: list[tuple[dist.Work, Tensor]] = []
        self._host_staging = dist.get_backend(group) == "gloo"  # gloo sends and receives host tensors only

    def _to_wire(self, tensor: Tensor) -> Tensor:
        tensor = tensor.detach().contiguous()
        return tensor.cpu() if self._host_staging and tensor.is_cuda else tensor

    def send(self, tensor: Tensor, dst: int) -> None:
        """Start sending ``tensor`` to stage ``dst`` (completed by :meth:`wait`)."""
        tensor = self._to_wire(tensor)
        work = dist.isend(tensor, group=self.group, group_dst=dst)
        self._pending.append((work, tensor))  # keep the buffer alive until the send completes
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def recv(self, shape, dtype: torch.dtype, device: torch.device, src: int) -> Tensor:
        """Receive a tensor of this shape and dtype from stage ``src`` (blocking)."""
        staged = self._host_staging and torch.device(device).type == "cuda"
        buffer = torch.empty(shape, dtype=dtype, device="cpu" if staged else device)
        dist.recv(buffer, group=self.group, group_src=src)
        return buffer.to(device) if staged else buffer

    def wait(self) -> None:
        """Complete every pending send."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def all_reduce_sum(self, tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
        """Sum ``tensor`` in place over ``group`` (default: all stages)."""
        group = self.group if group is None else group
        n = dist.get_world_size(group)
        if n > 1:
            in_place_collective(lambda t: dist.all_reduce(t, group=group), tensor, group)
            self.bytes_sent += tensor.numel() * tensor.element_size() * 2 * (n - 1) // n
        return tensor
