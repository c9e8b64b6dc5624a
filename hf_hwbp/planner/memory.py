"""Peak memory of one training step, with what each device lets us see.

- CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the step (the caching allocator's
  own count of live tensors: exact for tensors, blind to the allocator's reserve and to workspaces).
- CPU (Linux): the process's peak resident set (``VmHWM``, reset before the step through
  ``/proc/self/clear_refs``) above its resident set before the step, after returning freed heap to the system
  (``malloc_trim``). Weak: it counts pages, not tensors, and allocator reuse can hide part of a step's peak, so
  compare rows of one run rather than absolute values. Elsewhere: not measured (None).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated above the allocation before the step"
CPU_METHOD = "peak resident set (Linux VmHWM, reset before each step) above the resident set before the step"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: step()`` then ``peak.mib`` (None where it cannot be measured)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mib: float | None = None
        self._base = 0

    @staticmethod
    def method(device: torch.device | str) -> str | None:
        """How peaks are measured on ``device`` (None: they are not)."""
        device = torch.device(device)
        if device.type == "cuda":
            return CUDA_METHOD
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kib("VmHWM")
        except OSError:
            return None
        return CPU_METHOD

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            _trim_heap()
            self._base = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            self.mib = (_status_kib("VmHWM") - self._base) / 1024


__all__ = ["CPU_METHOD", "CUDA_METHOD", "PeakMemory"]
