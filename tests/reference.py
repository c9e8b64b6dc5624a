"""An independent Highway-BP(k) for the tests: the definition written out literally on an unpatched model.

It shares no code with hf_hwbp. Hooks cut the unpatched model at every block: each block runs on a fresh leaf
for its hidden state and a fresh leaf for every other tensor it reads that requires grad (side inputs: encoder
states, prefix keys/values inside a cache, parameters passed in), and the rest of the model reads a leaf in
place of each block output. One ordinary backward (graphs retained) then gives d at each stack output, e_j at
intermediate states (from losses on hidden states, and from side outputs such as attention maps or router
logits, whose gradient ordinary autograd carries through the block's graph into its input leaf, its parameters
and its side-input leaves: exactly the definition's e_{j-1} += (ds_j/dh_{j-1})^T g and its direct parameter
term), and the gradients of everything outside the stacks. The recursion is then evaluated literally, with a
sum over m >= i of what enters at every state h_m, carried down the residual path (the identity, or the fixed
gates of act(h + g(h)) layers), for every i (O(L^2) VJPs), one stack run at a time from the last one the
forward(s) ran to the first: each run's stack input and side inputs are backpropagated ordinarily into what
lies below them, which may be an earlier stack's output (ResNet stages, an encoder under a decoder's
cross-attention). A stack whose layers run again on the output of their last pass (a layer shared across depths, as
ALBERT's) is one run over the unrolled depth: each pass's blocks after the last one's, a shared layer's parameters
getting the sum of its blocks' terms.

A state may be several residual streams (LUKE's word and entity states): ``streams`` names where each layer receives
every stream besides its hidden state and where it returns it. The state is then a tuple, each stream with its own
identity path: every block reads a leaf per stream, the rest of the model reads a leaf per stream in place of each
block output, d and e_j are tuples, and J_j^T v is the VJP over the whole tuple minus v, componentwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

# Layer classes whose forward ends with ``self.activation(hidden + shortcut)`` (read from transformers' sources):
# their residual path is diag(act'(pre-activation)), which ``pre_activation_gates`` reads with a hook on the
# activation (not from the layer's output, as the package does).
POST_ACTIVATION_CLASSES = frozenset(
    {"ResNetBasicLayer", "ResNetBottleNeckLayer", "RegNetXLayer", "RegNetYLayer", "BitBottleneckLayer"}
)


def grads_of(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """The gradients one backward of ``loss_fn(model)`` writes (whatever the model's backward is), ``.grad`` cleared
    before and after: the measured side of every comparison with the reference."""
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@contextlib.contextmanager
def pre_activation_gates(layers: Sequence[nn.Module]):
    """For layers relu(h + g(h)): yields ``residual_gate`` for ``reference_highway_grads``, 1 where each layer's
    pre-activation (read by a hook on ``layer.activation``) is positive."""
    before_activation = {}
    handles = [
        layer.activation.register_forward_pre_hook(
            lambda module, args, layer=layer: before_activation.__setitem__(layer, args[0].detach().clone())
        )
        for layer in layers
    ]
    try:
        yield lambda layer: (before_activation[layer] > 0).to(before_activation[layer].dtype)
    finally:
        for handle in handles:
            handle.remove()


def residual_gates(stacks: Sequence[Sequence[nn.Module]]):
    """``pre_activation_gates`` of the stacks' layers when they are of a post-activation class, else no gate."""
    layers = [layer for stack in stacks for layer in stack]
    if not any(type(layer).__name__ in POST_ACTIVATION_CLASSES for layer in layers):
        return contextlib.nullcontext(None)
    return pre_activation_gates(layers)


class _Run:
    """One forward of one stack. Every state is a tuple: the hidden state, then each stream's."""

    def __init__(self, stack: Sequence[nn.Module], stack_input: tuple[torch.Tensor, ...]):
        self.stack = stack
        self.stack_input = stack_input
        self.inputs: list[tuple[torch.Tensor, ...]] = []  # block input leaves
        self.outputs: list[tuple[torch.Tensor, ...]] = []  # block outputs, in their local graphs
        self.exposed: list[tuple[torch.Tensor, ...]] = []  # leaves the rest of the model reads as the block outputs
        self.side: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (block, original, leaf)
        self.gates: list[torch.Tensor | None] = []  # a_j of each block's residual path (None: the identity)
        self.blocks: list[list[nn.Module]] = []  # the layers of each block, in the order they ran
        self.delta: list[tuple[torch.Tensor, ...]] = []

    def published(self) -> _Run:
        """What ``runs=`` receives: without streams, each state is its one tensor rather than a 1-tuple."""
        for name in ("inputs", "outputs", "exposed", "delta"):
            setattr(self, name, [_public(state) for state in getattr(self, name)])
        return self


def _public(state: tuple) -> tuple | torch.Tensor:
    return state[0] if len(state) == 1 else state


def _replace_grad_tensors(value, make_leaf, depth=0, seen=None):
    """Every tensor that requires grad in ``value`` (tuples, lists, dicts, object attributes) -> make_leaf(t)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        return make_leaf(value) if value.requires_grad else value
    if depth > 4 or id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type, nn.Module)):
        return value
    seen.add(id(value))
    if isinstance(value, tuple):
        return type(value)(_replace_grad_tensors(v, make_leaf, depth + 1, seen) for v in value)
    if isinstance(value, list):
        value[:] = [_replace_grad_tensors(v, make_leaf, depth + 1, seen) for v in value]
        return value
    if isinstance(value, dict):
        for key in list(value):
            value[key] = _replace_grad_tensors(value[key], make_leaf, depth + 1, seen)
        return value
    if hasattr(value, "__dict__") and not callable(value):
        for key, v in list(vars(value).items()):
            setattr(value, key, _replace_grad_tensors(v, make_leaf, depth + 1, seen))
    return value


def reference_highway_grads(
    model: nn.Module,
    layers: Sequence[nn.Module] | Sequence[Sequence[nn.Module]],
    loss_fn: Callable[[nn.Module], torch.Tensor],
    k: int,
    *,
    group_size: int = 1,
    stop: Callable[[list[torch.Tensor], list[torch.Tensor]], bool] | None = None,
    iterations: list[int] | None = None,
    residual_gate: Callable[[nn.Module], torch.Tensor] | None = None,
    runs: list | None = None,
    streams: dict[int, Sequence[tuple[int | str, int]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter of ``model`` under Highway-BP(k), by name.

    Args:
        layers: one stack (a sequence of layers) or several (a sequence of sequences, in forward order).
        loss_fn: runs the forward(s) of ``model`` and returns the loss.
        group_size: G consecutive layers form one block.
        stop: optional adaptive stop, called after each iteration with (delta^(n), delta^(n+1)) of one stack
            run (lists over i = 0..L; of tuples over the streams with ``streams``); True ends that run's iterations.
        iterations: if given, receives the number of iterations each stack run did (in the order they ran).
        residual_gate: for layers act(h + g(h)): called with a layer just after its forward, returns a_j, the
            diagonal of its residual path (the definition's R_j = diag(a_j)); group_size must then be 1.
        runs: if given, receives each stack run in forward order, with ``delta`` (delta^(k)_0..L of that run, each a
            tuple over the state's streams), ``outputs`` (each block's output state in its local graph) and
            ``exposed`` (what the rest of the model read in its place): what a test needs to compute the gradient of
            a tensor inside a block.
        streams: stack index -> the residual streams its layers hand on besides the hidden state, each as (where
            a layer receives it: a position in its positional arguments or a keyword; its position in the layer's
            output). group_size must be 1.
    """
    streams = dict(streams or {})
    if residual_gate is not None and group_size != 1:
        raise ValueError("The reference defines gated residual paths per layer: group_size must be 1.")
    if streams and (group_size != 1 or residual_gate is not None):
        raise ValueError("The reference defines several streams for blocks h + g(h) of one layer each.")
    stacks = [layers] if isinstance(layers[0], nn.Module) else list(layers)
    runs_made: list[_Run] = []
    current: dict[int, _Run] = {}
    original_of: dict[int, torch.Tensor] = {}  # id(leaf made here) -> the tensor it stands for

    def make_hooks(s: int, i: int):
        stack_streams = list(streams.get(s, ()))

        def pre_hook(module, args, kwargs):
            key = None if args else ("hidden_states" if "hidden_states" in kwargs else "hidden_state")
            hidden = args[0] if args else kwargs[key]
            args = list(args)
            places = [(args, where) if isinstance(where, int) else (kwargs, where) for where, _ in stack_streams]
            if any(not isinstance(where, int) and where not in held for held, where in places) or any(
                isinstance(where, int) and where >= len(args) for _, where in places
            ):
                raise ValueError(f"A layer of stack {s} was called without one of its streams {stack_streams}.")
            state = (hidden, *(held[where] for held, where in places))
            # A stack whose layers run again on the output of their last pass (a layer shared across depths):
            # the same run goes on over the unrolled depth. Otherwise layer 0 starts a new run.
            continues = s in current and current[s].exposed and hidden is current[s].exposed[-1][0]
            if i == 0 and not continues:
                current[s] = _Run(stacks[s], state)
                runs_made.append(current[s])
            run = current[s]
            block = len(run.inputs) if i % group_size == 0 else len(run.inputs) - 1  # the block this layer is in

            def side_leaf(t: torch.Tensor) -> torch.Tensor:
                original = original_of.get(id(t), t)
                leaf = t.detach().requires_grad_(True)
                original_of[id(leaf)] = original
                run.side.append((block, original, leaf))
                return leaf

            if i % group_size == 0:
                state = tuple(t.detach().requires_grad_(True) for t in state)
                for (held, where), leaf in zip(places, state[1:]):
                    held[where] = leaf  # a leaf per stream, no side input
                hidden = state[0]
                run.inputs.append(state)
                run.blocks.append([])
            stream_args = {where for where, _ in stack_streams if isinstance(where, int)}
            stream_keys = {where for where, _ in stack_streams if isinstance(where, str)}
            rest_args = tuple(
                a if n + 1 in stream_args else _replace_grad_tensors(a, side_leaf) for n, a in enumerate(args[1:])
            )
            rest = {
                n: v if n in stream_keys else _replace_grad_tensors(v, side_leaf) for n, v in kwargs.items() if n != key
            }
            run.blocks[-1].append(module)
            if args:
                return (hidden,) + rest_args, rest
            return (), {**rest, key: hidden}

        def post_hook(module, args, output):
            if i % group_size != group_size - 1 and i != len(stacks[s]) - 1:
                return None
            run = current[s]
            sequence = isinstance(output, (tuple, list))  # a list: OpenAI GPT's blocks return one
            positions = [0] + [position for _, position in stack_streams]
            if stack_streams and (not sequence or len(output) <= max(positions)):
                raise ValueError(f"A layer of stack {s} does not return its streams {stack_streams}.")
            state = tuple(output[p] for p in positions) if sequence else (output,)
            run.outputs.append(state)
            run.gates.append(residual_gate(module) if residual_gate is not None else None)
            leaves = tuple(t.detach().requires_grad_(True) for t in state)
            run.exposed.append(leaves)
            if not sequence:
                return leaves[0]
            items = list(output)
            for p, leaf in zip(positions, leaves):
                items[p] = leaf
            return type(output)(items)

        return pre_hook, post_hook

    handles = []
    for s, stack in enumerate(stacks):
        for i, layer in enumerate(stack):
            pre_hook, post_hook = make_hooks(s, i)
            handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_hook(post_hook, prepend=True))
    try:
        loss = loss_fn(model)
    finally:
        for h in handles:
            h.remove()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    # Everything outside the stacks, and the side outputs' direct terms; leaves collect d, e_j and more.
    loss.backward(retain_graph=True)
    for run in reversed(runs_made):
        done = _backward_run(run, k, group_size, stop)
        if iterations is not None:
            iterations.insert(0, done)
    if runs is not None:
        runs.extend(run.published() for run in runs_made)
    result = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return result


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _backward_run(run: _Run, k: int, group_size: int, stop) -> int:
    """Theorem 2 on one stack run, then the parameter, side-input and stack-input gradients. Returns iterations.
    Every state and every delta is a tuple over the streams (one entry without streams)."""
    num_blocks = len(run.outputs)
    zeros = tuple(torch.zeros_like(t) for t in run.exposed[-1])

    def grad_or_zero(state: tuple) -> tuple:
        return tuple(t.grad if t.grad is not None else z for t, z in zip(state, zeros))

    d = grad_or_zero(run.exposed[-1])
    e = [grad_or_zero(run.inputs[0])] + [
        _add(grad_or_zero(run.exposed[j - 1]), grad_or_zero(run.inputs[j])) for j in range(1, num_blocks)
    ]
    gates = [None] + run.gates  # gates[j]: a_j of block j (None: the identity residual path)

    def along_residual(i: int, m: int, v: tuple) -> tuple:  # R_{i+1}^T ... R_m^T v: h_m down to h_i
        for j in range(i + 1, m + 1):
            if gates[j] is not None:
                v = tuple(gates[j] * x for x in v)
        return v

    def j_transpose(j: int, v: tuple) -> tuple:  # J_j^T v = (df_j/dh)^T v - R_j^T v, over the whole tuple
        xs, ys = run.inputs[j - 1], run.outputs[j - 1]
        pairs = [(y, g) for y, g in zip(ys, v) if y.requires_grad]
        wanted = [x for x in xs if x.requires_grad]
        found = iter(
            torch.autograd.grad(
                [y for y, _ in pairs], wanted, [g for _, g in pairs], retain_graph=True, allow_unused=True
            )
        )
        full = []
        for x, g in zip(xs, v):
            f = next(found) if x.requires_grad else None
            full.append(torch.zeros_like(g) if f is None else f)
        return tuple(f - (g if gates[j] is None else gates[j] * g) for f, g in zip(full, v))

    def deltas(crossed: list[tuple] | None) -> list[tuple]:
        """delta_i = sum over m >= i of (what enters at h_m) carried down the residual path from h_m to h_i."""
        entering = [_add(e[m], crossed[m + 1]) if crossed is not None else e[m] for m in range(num_blocks)] + [d]
        result = []
        for i in range(num_blocks + 1):
            total = zeros
            for m in range(i, num_blocks + 1):
                total = _add(total, along_residual(i, m, entering[m]))
            result.append(total)
        return result

    delta = run.delta = deltas(None)
    done = 0
    for _ in range(min(k, num_blocks)):
        crossed = [None] + [j_transpose(j, delta[j]) for j in range(1, num_blocks + 1)]
        new = deltas(crossed)
        delta, previous = new, delta
        run.delta = delta
        done += 1
        if stop is not None and stop([_public(v) for v in previous], [_public(v) for v in delta]):
            break
    # A stream of the stack's output that the loss does not read (LiLT's layout state) reaches no parameter, as in
    # autograd: the parameters only it reads get no gradient rather than a zero one.
    unread = {s for s, t in enumerate(run.exposed[-1]) if t.grad is None and s > 0}

    def read(j: int) -> list:
        return [
            (y, g)
            for s, (y, g) in enumerate(zip(run.outputs[j - 1], delta[j]))
            if y.requires_grad and not (j == num_blocks and s in unread)
        ]

    for j, block in enumerate(run.blocks, start=1):  # a layer shared by several blocks sums their terms
        trainable = [p for layer in block for p in layer.parameters() if p.requires_grad]
        pairs = read(j)
        if trainable:
            grads = torch.autograd.grad(
                [y for y, _ in pairs], trainable, [g for _, g in pairs], retain_graph=True, allow_unused=True
            )
            for p, g in zip(trainable, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
    e0 = tuple(g.clone() for g in grad_or_zero(run.inputs[0]))
    for block, original, leaf in run.side:
        pairs = read(block + 1)
        (g,) = torch.autograd.grad(
            [y for y, _ in pairs], leaf, [g for _, g in pairs], retain_graph=True, allow_unused=True
        )
        total = g if leaf.grad is None else (leaf.grad if g is None else g + leaf.grad)
        if total is not None and original.requires_grad:
            original.backward(total, retain_graph=True)  # ordinary backprop below the side input
    # A side input made by block 1 from h_0 (handed on to the blocks above) backpropagates into h_0 as well.
    late = tuple(now - before for now, before in zip(grad_or_zero(run.inputs[0]), e0))
    for h0, g, more in zip(run.stack_input, delta[0], late):
        if h0.requires_grad:
            h0.backward(g + more, retain_graph=True)
    return done
