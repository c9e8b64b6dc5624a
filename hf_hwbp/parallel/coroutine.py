"""PausableCall: run a function in a helper thread that only runs while its caller waits, pausing at labels.

The engine's ``run_recursion`` is one loop per backward. To interleave the Highway iterations of several
micro-batches with forwards and parameter steps on one rank, each micro-batch's recursion runs as a
PausableCall: the stage stack calls ``pause(label)`` where the schedule may switch to other work (before each
inflow and each scan), and the runtime resumes it when the schedule reaches that task. Exactly one of the
caller and the helper runs at any time, so there is no concurrency, only a second call stack.

(A generator version of ``run_recursion``, yielding at the same two points, would make this module
unnecessary; see the project's notes on the engine.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch


class _Closed(BaseException):
    """Raised inside a paused call that is being abandoned (the step failed elsewhere)."""


class PausableCall:
    """``fn()`` on a helper thread, advanced from the caller with :meth:`run_until`.

    Args:
        fn: the function to run; it may call :meth:`pause` (from inside) any number of times.
        device: the device whose CUDA context the helper thread must use (CUDA's current device is per thread).
    """

    def __init__(self, fn: Callable[[], Any], device: torch.device | None = None, name: str = "highway"):
        self._fn = fn
        self._device = device
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = False
        self._closing = False
        self._error: BaseException | None = None
        self.label: Hashable | None = None
        self.done = False
        self.result: Any = None

    # ----- helper thread ---------------------------------------------------------------------------------------
    def _main(self) -> None:
        self._go.acquire()
        try:
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            if not self._closing:
                self.result = self._fn()
        except _Closed:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            self._error = error
        finally:
            self.done = True
            self.label = None
            self._back.release()

    def pause(self, label: Hashable) -> None:
        """Hand control back to the caller (called from inside ``fn``); returns when resumed."""
        self.label = label
        self._back.release()
        self._go.acquire()
        if self._closing:
            raise _Closed

    # ----- caller ------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Run ``fn`` until its next pause or its end; re-raise what it raised."""
        if self.done:
            return
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def run_until(self, label: Hashable) -> None:
        """Resume until ``fn`` pauses at ``label`` or ends."""
        while not self.done and self.label != label:
            self.resume()

    def close(self) -> None:
        """Abandon a paused call (its thread unwinds and ends)."""
        if self._started and not self.done:
            self._closing = True
            self._go.release()
            self._back.acquire()
        if self._started:
            self._thread.join()
