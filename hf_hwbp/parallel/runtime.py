"""The runtime: one rank executes its tasks of a step's graph (``graph.py``) in a fixed order.

Every rank computes the same graph and the same per-rank orders (deterministically, from the same shapes and
costs), so each knows in which order every other rank sends it messages: ``Mailbox`` receives them in that
order (NCCL matches point-to-point messages by order; gloo does too without tags) and keeps early arrivals.
Sends are asynchronous. Since the orders come from one consistent global schedule, no rank waits for a
message that is sent after something the waiting rank has not done yet: the step cannot deadlock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..engine import recursion_steps
from .comm import Comm
from .graph import StepGraph, Task
from .stage_stack import ChainScan, StageStack
from .stages import Stage


class Mailbox:
    """Receives this rank's messages of one step in each sender's order."""

    def __init__(self, comm: Comm, graph: StepGraph, order: list[list[Task]], rank: int, shape_of, dtype, device):
        self.comm, self.rank = comm, rank
        self.shape_of, self.dtype, self.device = shape_of, dtype, device
        self.expected: dict[int, list[Task]] = {}
        for src, tasks in enumerate(order):
            if src != rank:
                self.expected[src] = [t for t in tasks if rank in graph.sends(t)]
        self.arrived: dict[Task, Tensor] = {}
        self.graph = graph
        self.waited = 0.0  # seconds spent blocked in receives

    def get(self, producer: Task) -> Tensor:
        """The output of ``producer`` (a task of another rank), receiving earlier messages of that rank first."""
        src = self.graph.rank(producer)
        queue = self.expected[src]
        while producer not in self.arrived:
            if not queue:
                raise RuntimeError(f"rank {self.rank}: no message from {producer} is expected.")
            task = queue.pop(0)
            start = time.perf_counter()
            self.arrived[task] = self.comm.recv(self.shape_of(task), self.dtype, self.device, src)
            self.waited += time.perf_counter() - start
        return self.arrived[producer]

    def cancel(self, tasks: set[Task]) -> None:
        """Forget messages that will not be sent (a recursion that stopped early with ``tol``)."""
        for src in self.expected:
            self.expected[src] = [t for t in self.expected[src] if t not in tasks]


class RecursionStepper:
    """Advances one micro-batch's ``recursion_steps`` generator to the task the schedule has reached.

    The generator stops before its n-th inflow (task ``("V", n)``) and before its n-th scan (``("R", n)``);
    ``run_until(label)`` runs it up to that point, or to its end (then ``result`` is ``(delta, iterations)``).
    """

    _KINDS = {"inflow": "V", "scan": "R"}

    def __init__(self, steps):
        self._steps = steps
        self.label: tuple[str, int] | None = None
        self.done = False
        self.result = None

    def run_until(self, label: tuple[str, int]) -> None:
        while not self.done and self.label != label:
            try:
                kind, n = next(self._steps)
                self.label = (self._KINDS[kind], n)
            except StopIteration as finished:
                self.done, self.label, self.result = True, None, finished.value

    def close(self) -> None:
        self._steps.close()


@dataclass
class MicroBatch:
    """What one micro-batch leaves on this stage between its tasks."""

    input_ids: Tensor
    labels: Tensor | None
    attention_mask: Tensor | None
    inputs: list[Tensor] = field(default_factory=list)  # leaf input of each local block (or of the stage)
    outputs: list[Tensor] = field(default_factory=list)  # output of each local block (or of the stage)
    h0: Tensor | None = None  # first stage: the embeddings' output, attached to their graph
    head_input: Tensor | None = None  # last stage, Highway: the stack output (detached)
    loss: Tensor | None = None  # last stage
    d: Tensor | None = None
    stack: StageStack | None = None
    recursion: RecursionStepper | None = None
    delta: list[Tensor] | None = None
    iterations: int = 0


class StageRuntime:
    """Runs one step of this rank's tasks.

    Args:
        stage: this rank's stage.
        comm: its communication.
        graph, order: the step's graph and every rank's order of tasks.
        method: ``"highway"`` (tasks F, H, V, R, W, E) or ``"backprop"`` (F, B).
        k, tol, need_input_grad, fuse: Highway settings.
    """

    def __init__(
        self,
        stage: Stage,
        comm: Comm,
        graph: StepGraph,
        order: list[list[Task]],
        *,
        method: str,
        k: int = 0,
        tol: float | None = None,
        need_input_grad: bool = True,
        fuse: bool = True,
    ):
        self.stage, self.comm, self.graph, self.order = stage, comm, graph, order
        self.method, self.k, self.tol = method, min(k, stage.layout.num_blocks), tol
        self.need_input_grad, self.fuse = need_input_grad, fuse
        self.block_params = stage.block_parameters() if method == "highway" else None
        self.trace: list[tuple[Task, float, float, float]] | None = None  # (task, start, end, seconds waited)

    # ----- one step -------------------------------------------------------------------------------------------------
    def run(self, micro: list[MicroBatch], num_items_in_batch) -> tuple[Tensor | None, list[int]]:
        """Execute this rank's tasks; return the summed loss (last stage) and each micro-batch's iterations."""
        stage = self.stage
        self.micro = micro
        self.num_items = num_items_in_batch
        hidden = stage.config.hidden_size
        self.mailbox = Mailbox(
            self.comm,
            self.graph,
            self.order,
            stage.index,
            lambda task: (*micro[task.mb].input_ids.shape, hidden),
            stage.dtype,
            stage.device,
        )
        handlers = {
            "F": self._forward,
            "H": self._head,
            "V": self._inflow,
            "R": self._scan,
            "W": self._weights,
            "E": self._embeddings,
            "B": self._backward,
        }
        try:
            for task in self.order[stage.index]:
                self.task = task
                if self.trace is None:
                    handlers[task.kind](task, micro[task.mb])
                    continue
                waited, start = self.mailbox.waited, time.perf_counter()
                handlers[task.kind](task, micro[task.mb])
                self.trace.append((task, start, time.perf_counter(), self.mailbox.waited - waited))
        finally:
            for mb in micro:
                if mb.recursion is not None:
                    mb.recursion.close()
            self.comm.wait()
        losses = [mb.loss for mb in micro if mb.loss is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return loss, [mb.iterations for mb in micro]

    def _send(self, task: Task, tensor: Tensor) -> None:
        for dst in self.graph.sends(task):
            self.comm.send(tensor.to(self.stage.dtype), dst)

    # ----- forward and head --------------------------------------------------------------------------------------
    def _forward(self, task: Task, mb: MicroBatch) -> None:
        stage = self.stage
        if stage.is_first:
            h = stage.embed(mb.input_ids)
            mb.h0 = h
        else:
            h = self.mailbox.get(Task("F", task.stage - 1, task.mb))
        kwargs = stage.layer_kwargs(h, mb.attention_mask)
        segments = stage.blocks if self.method == "highway" else [range(len(stage.layers))]
        for segment in segments:
            # backprop needs no cut at the first stage's input: its backward runs on into the embeddings
            x = h if (self.method == "backprop" and stage.is_first) else h.detach().requires_grad_(True)
            h = stage.run_layers(x, segment, kwargs)
            mb.inputs.append(x)
            mb.outputs.append(h)
        if not stage.is_last:
            self._send(task, h)
        elif self.method == "highway":
            mb.head_input = h.detach()
        else:
            mb.loss = self._loss(h, mb)

    def _loss(self, h: Tensor, mb: MicroBatch) -> Tensor:
        if mb.labels is None:
            raise ValueError("The last stage needs `labels` to compute the loss.")
        return self.stage.loss(self.stage.logits(h), mb.labels, num_items_in_batch=self.num_items)

    def _head(self, task: Task, mb: MicroBatch) -> None:
        x = mb.head_input.requires_grad_(True)
        loss = self._loss(x, mb)
        loss.backward()  # the head's parameters, and d = dloss/dh_N
        mb.loss = loss.detach()
        mb.d, mb.head_input = x.grad, None
        self._send(task, mb.d)

    # ----- Highway backward ---------------------------------------------------------------------------------------
    def _d(self, mb_index: int) -> Tensor:
        mb = self.micro[mb_index]
        if mb.d is None:
            mb.d = self.mailbox.get(Task("H", self.stage.num_stages - 1, mb_index))
        return mb.d

    def _stack(self, task: Task, mb: MicroBatch) -> StageStack:
        if mb.stack is None:
            stage = self.stage
            mb.stack = StageStack(
                mb.inputs,
                mb.outputs,
                self._d(task.mb),
                self.block_params,
                scan=ChainScan(self._exchange, self.comm.all_reduce_sum),
                first_block=stage.first_block,
                num_blocks=stage.layout.num_blocks,
                need_input_grad=self.need_input_grad or not stage.is_first,
                fuse=self.fuse,
            )
            if self.k == 0:
                mb.delta = mb.stack.scan(None)
        return mb.stack

    def _recursion(self, task: Task, mb: MicroBatch) -> RecursionStepper:
        if mb.recursion is None:
            mb.recursion = RecursionStepper(recursion_steps(self._stack(task, mb), self.k, self.tol))
        return mb.recursion

    def _inflow(self, task: Task, mb: MicroBatch) -> None:
        if mb.delta is None:  # else the recursion has stopped early (tol): nothing left to do
            self._recursion(task, mb).run_until(("R", task.index))

    def _scan(self, task: Task, mb: MicroBatch) -> None:
        if mb.delta is not None:
            return
        call = self._recursion(task, mb)
        call.run_until(("V", task.index + 1))
        if call.done:
            mb.delta, mb.iterations = call.result
            mb.recursion = None
            if task.index < self.k:  # stopped early (tol): the later scans of this micro-batch are not sent
                later = {t for t in self.graph.deps if t.kind == "R" and t.mb == task.mb and t.index > task.index}
                self.mailbox.cancel(later)

    def _exchange(self, total: Tensor) -> Tensor:
        """The chain scan of the R task being run: receive the sum from above, send the running sum below."""
        task, stage = self.task, self.stage
        if stage.is_last:
            above = torch.zeros_like(total)
        else:
            above = self.mailbox.get(Task("R", task.stage + 1, task.mb, task.index)).to(total.dtype)
        if not stage.is_first:
            self._send(task, above + total)
        return above

    def _weights(self, task: Task, mb: MicroBatch) -> None:
        stack = self._stack(task, mb)
        stack.weight_vjp(task.index, mb.delta[task.index + 1])

    def _embeddings(self, task: Task, mb: MicroBatch) -> None:
        self._stack(task, mb)
        if mb.h0 is not None and mb.h0.requires_grad:
            mb.h0.backward(mb.delta[0])

    # ----- backprop ------------------------------------------------------------------------------------------------
    def _backward(self, task: Task, mb: MicroBatch) -> None:
        stage = self.stage
        if stage.is_last:
            mb.loss.backward()
            mb.loss = mb.loss.detach()
        else:
            grad = self.mailbox.get(Task("B", task.stage + 1, task.mb))
            torch.autograd.backward(mb.outputs[0], grad.to(mb.outputs[0].dtype))
        if not stage.is_first:
            self._send(task, mb.inputs[0].grad)
        mb.inputs.clear()
        mb.outputs.clear()
