"""The forward half of routing: what a block reads and emits besides the residual stream, found in its arguments
and outputs (side inputs, side outputs, and the hidden state itself).

Side inputs are tensors that require grad and that a layer receives besides its hidden state: encoder states
under cross-attention, a parameter that lives outside the stack, prefix-tuning keys and values held in a
``Cache`` object. ``replace_tensors`` finds them (in arguments, tuples, lists, dicts, and, when ``deep``, inside
the attributes of plain objects such as caches) and puts a replacement in their place.

Side outputs are tensors computed inside a layer that the loss may read besides its output: tensors returned
next to the hidden state, and what transformers' output capturing (``output_attentions``,
``output_router_logits``, ...) collects from inside the layer. ``collector_marks`` and ``new_collected`` find
the ones a layer added.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import Tensor, nn

from ..errors import UnsupportedModelError

try:  # transformers >= 5: attentions, router logits and hidden states are collected by hooks inside the layers
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers return them from the layers instead
    _active_collector = None

_MAX_DEPTH = 4
_ATOMS = (str, bytes, int, float, bool, complex, type(None), type, nn.Module)

Replace = Callable[[str, Tensor], Tensor]


# The keywords a layer may receive its hidden state under when it gets no positional argument (PatchTST's layers
# take ``hidden_state=``).
HIDDEN_KEYWORDS = ("hidden_states", "hidden_state")


def hidden_keyword(args: tuple, kwargs: dict) -> str | None:
    """The keyword the hidden state came under (None: it is the first positional argument, or missing)."""
    return None if args else next((key for key in HIDDEN_KEYWORDS if key in kwargs), None)


def split_hidden(args: tuple, kwargs: dict) -> Tensor:
    """The hidden state a layer is called with: its first argument, or ``hidden_states=`` / ``hidden_state=``."""
    if args:
        return args[0]
    key = hidden_keyword(args, kwargs)
    if key is not None:
        return kwargs[key]
    raise UnsupportedModelError(
        "Highway-BP: a layer of the stack was called without its hidden state (a first argument, `hidden_states=` or "
        "`hidden_state=`). Pass layers= with blocks called that way, or train this model with ordinary backprop "
        "(unpatch_model(model))."
    )


def with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, hidden_keyword(args, kwargs) or "hidden_states": hidden}


def output_hidden(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def with_output_hidden(output, hidden: Tensor):
    if isinstance(output, tuple):
        return (hidden,) + output[1:]
    if isinstance(output, list):
        return [hidden] + output[1:]
    return hidden


def argument_name(module: nn.Module, name: str) -> str:
    """``argument 2`` -> the name of the layer's second parameter (for messages, and to tell one argument passed
    positionally to one layer and by keyword to the next), when its signature says it."""
    head, _, rest = name.partition("[")
    if not head.startswith("argument "):
        return name
    try:
        return _parameter_names(type(module))[int(head.split()[1])] + (f"[{rest}" if rest else "")
    except (ValueError, TypeError, IndexError):
        return name


@functools.lru_cache(maxsize=256)
def _parameter_names(cls: type) -> tuple[str, ...]:
    """The parameter names of ``cls.forward`` after ``self`` (read once per class: every layer call asks)."""
    return tuple(inspect.signature(cls.forward).parameters)[1:]


def top_level_tensors(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, tuple[int | str, Tensor]]:
    """The tensors a layer receives directly as arguments besides its hidden state, by parameter name (the
    signature's name for a positional argument, so that one stream passed positionally to one layer and by keyword
    to the next is one argument): name -> (position in ``args`` or keyword, tensor)."""
    skipped = hidden_keyword(args, kwargs)
    found: dict[str, tuple[int | str, Tensor]] = {}
    for i, value in enumerate(args):
        if i > 0 and isinstance(value, Tensor):
            found[argument_name(module, f"argument {i}")] = (i, value)
    for key, value in kwargs.items():
        if key != skipped and isinstance(value, Tensor):
            found[key] = (key, value)
    return found


def with_arguments(args: tuple, kwargs: dict, replaced: dict[int | str, Tensor]) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the arguments at the given positions or keywords replaced."""
    if not replaced:
        return args, kwargs
    new_args = tuple(replaced.get(i, value) for i, value in enumerate(args))
    return new_args, {key: replaced.get(key, value) for key, value in kwargs.items()}


def has_grad_inputs(args: tuple, kwargs: dict) -> bool:
    """Whether a layer receives, besides its hidden state, a tensor that requires grad (directly, or in tuples,
    lists and dicts: what ``replace_tensors`` visits without ``deep``). The quick test that lets most layers skip it."""
    skipped = hidden_keyword(args, kwargs)
    values = list(args[1:]) + [v for key, v in kwargs.items() if key != skipped]
    return any(_any_grad(value, 0) for value in values)


def _any_grad(value, depth: int) -> bool:
    if isinstance(value, Tensor):
        return value.requires_grad
    if depth >= _MAX_DEPTH:
        return False
    if isinstance(value, (tuple, list)):
        return any(_any_grad(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_any_grad(v, depth + 1) for v in value.values())
    return False


def replace_tensors(args: tuple, kwargs: dict, replace: Replace, *, deep: bool) -> tuple[tuple, dict]:
    """Call ``replace(name, t)`` on every tensor that requires grad among a layer's inputs, except its hidden
    state, and put what it returns in its place. Tuples and the top-level ``args``/``kwargs`` are rebuilt;
    lists, dicts and object attributes found with ``deep=True`` are updated in place (a cache keeps serving
    the layers that read it). Returns the new ``(args, kwargs)``, the same objects when nothing changed."""
    hidden_key = hidden_keyword(args, kwargs)
    new_args = tuple(
        value if i == 0 else _swap(value, f"argument {i}", replace, deep, 0, set()) for i, value in enumerate(args)
    )
    new_kwargs = {
        key: value if key == hidden_key else _swap(value, key, replace, deep, 0, set()) for key, value in kwargs.items()
    }
    changed_args = any(a is not b for a, b in zip(new_args, args))
    changed_kwargs = any(new_kwargs[key] is not kwargs[key] for key in kwargs)
    return (new_args if changed_args else args), (new_kwargs if changed_kwargs else kwargs)


def _swap(value, name: str, replace: Replace, deep: bool, depth: int, seen: set[int]):
    if isinstance(value, Tensor):
        return replace(name, value) if value.requires_grad else value
    if isinstance(value, _ATOMS) or depth >= _MAX_DEPTH or id(value) in seen:
        return value
    if isinstance(value, tuple):
        items = [_swap(v, f"{name}[{i}]", replace, deep, depth + 1, seen) for i, v in enumerate(value)]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        seen.add(id(value))
        for i, v in enumerate(value):
            new = _swap(v, f"{name}[{i}]", replace, deep, depth + 1, seen)
            if new is not v:
                value[i] = new
        return value
    if isinstance(value, dict):
        seen.add(id(value))
        for key, v in list(value.items()):
            new = _swap(v, f"{name}[{key!r}]", replace, deep, depth + 1, seen)
            if new is not v:
                value[key] = new
        return value
    if deep and hasattr(value, "__dict__") and not callable(value):
        seen.add(id(value))
        for key, v in list(vars(value).items()):
            new = _swap(v, f"{name}.{key}", replace, deep, depth + 1, seen)
            if new is not v:
                setattr(value, key, new)
    return value


def output_extras(output) -> list[tuple[int, Tensor]]:
    """Tensors that require grad returned by a layer next to its hidden state, with their positions."""
    if not isinstance(output, (tuple, list)):
        return []
    return [(i, t) for i, t in enumerate(output) if i > 0 and isinstance(t, Tensor) and t.requires_grad]


def with_output_extras(output, replaced: dict[int, Tensor]):
    items = [replaced.get(i, item) for i, item in enumerate(output)]
    return tuple(items) if isinstance(output, tuple) else items


def collector() -> dict | None:
    """The dict transformers' output capturing is filling right now (None when nothing is being captured)."""
    return None if _active_collector is None else _active_collector.get()


def collector_marks(collected: dict | None) -> dict[str, int] | None:
    """How many entries each captured output has, to find the ones a layer adds."""
    if not collected:
        return None
    return {key: len(value) for key, value in collected.items() if isinstance(value, list)}


def new_collected(collected: dict | None, marks: dict[str, int] | None) -> list[tuple[list, int, Tensor]]:
    """Entries that require grad added to the collector since ``marks``: (list, position, tensor)."""
    if not collected or marks is None:
        return []
    found = []
    for key, values in collected.items():
        if isinstance(values, list):
            for i in range(marks.get(key, 0), len(values)):
                if isinstance(values[i], Tensor) and values[i].requires_grad:
                    found.append((values, i, values[i]))
    return found


def output_tensors(output, depth: int = 0) -> list[Tensor]:
    """The tensors a model returned: ``output`` itself, or the items of a tuple, list, dict or ``ModelOutput``, and of
    the tuples inside it (hidden states, attentions)."""
    if isinstance(output, Tensor):
        return [output]
    if depth >= 2:
        return []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return [tensor for value in values for tensor in output_tensors(value, depth + 1)]
