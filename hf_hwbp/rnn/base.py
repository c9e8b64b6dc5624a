"""What ``HighwayGRU`` and ``HighwayLSTM`` share: the settings, the input checks and the loop over layers.

A recurrent module here *is* its ``torch.nn`` class (a ``HighwayRNNMixin`` listed before ``nn.GRU`` /
``nn.LSTM``), so only the training forward differs: it runs every layer and direction as one autograd Function
whose backward is Highway-BP(k) through time. The cell-specific part is the ``_apply_layer`` hook (which Function,
which states) and ``_wrap_states`` / ``_unwrap_states`` (a GRU's state is one tensor, an LSTM's the pair (h, c)).

The eval-mode rule, the same as for a patched transformers model: a module in eval mode (``module.eval()``) runs
its ``torch.nn`` forward and therefore the ordinary backward (backprop through time), and ``last_iterations``
is then empty (no Highway iteration ran). Forwards that record no gradient also run the ``torch.nn`` forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..config import validate_k
from .function import HighwaySettings


class HighwayRNNMixin:
    """Highway-BP(k) through time on top of a ``torch.nn`` recurrent module (listed first among the bases).

    Subclasses define ``_apply_layer`` and, when their state is not one tensor, ``_wrap_states`` /
    ``_unwrap_states`` and ``_num_states``.
    """

    _num_states = 1  # tensors in the recurrent state: h (GRU) or (h, c) (LSTM)

    def __init__(self, *args, k: int = 2, tol: float | None = None, scan_chunk: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k
        self.tol = tol
        self.scan_chunk = scan_chunk
        self._last_settings: HighwaySettings | None = None

    @classmethod
    def _converted(cls, module: torch.nn.RNNBase, k: int, tol: float | None) -> HighwayRNNMixin:
        """An instance with ``module``'s configuration, weights, device, dtype and train/eval mode."""
        weight = module.weight_ih_l0
        extra = {"proj_size": module.proj_size} if module.proj_size else {}  # nn.GRU takes no proj_size
        new = cls(
            module.input_size,
            module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            k=k,
            tol=tol,
            **extra,
        )
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    # ----- settings, validated where they are set ------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = validate_k(value, exact_from="T")

    @property
    def tol(self) -> float | None:
        return self._tol

    @tol.setter
    def tol(self, value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"tol must be None or a number > 0 (relative change to stop at), got {value!r}.")
        self._tol = None if value is None else float(value)

    @property
    def scan_chunk(self) -> int | None:
        return self._scan_chunk

    @scan_chunk.setter
    def scan_chunk(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"scan_chunk must be None (about sqrt(T)) or an int >= 1, got {value!r}.")
        self._scan_chunk = value

    @property
    def last_iterations(self) -> list[int]:
        """Highway iterations run by the last backward, per layer and direction.

        Empty before the first one, and after a forward in eval mode (its backward is the ordinary one).
        """
        if self._last_settings is None:
            return []
        found = self._last_settings.iterations
        return [found[i] for i in sorted(found)]

    def extra_repr(self) -> str:
        tol = "" if self.tol is None else f", tol={self.tol}"
        return f"{super().extra_repr()}, k={self.k}{tol}"

    # ----- cell-specific hooks ---------------------------------------------------------------------------------
    def _apply_layer(
        self, source: Tensor, states: list[Tensor], settings: HighwaySettings, index: int
    ) -> tuple[Tensor, list[Tensor]]:
        """Layer-direction ``index`` on the time-major ``source``: (outputs [T, B, H], its final states)."""
        raise NotImplementedError

    def _unwrap_states(self, hx: object) -> list[Tensor] | None:
        """The user's ``hx`` as a list of ``_num_states`` tensors (None: zeros)."""
        return None if hx is None else [hx]

    def _wrap_states(self, states: list[Tensor]) -> object:
        """The final states in the ``torch.nn`` module's output form."""
        return states[0]

    def _state_sizes(self) -> list[int]:
        return [self.hidden_size] * self._num_states

    # ----- forward ---------------------------------------------------------------------------------------------
    def forward(self, input: Tensor, hx: object = None) -> tuple[Tensor, object]:  # noqa: A002 - torch's name
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{name} does not take a PackedSequence: pad the batch (torch.nn.utils.rnn.pad_packed_sequence) "
                f"and mask the loss of the padded steps, or use torch.nn.{name[len('Highway') :]} for packed input."
            )
        states = self._unwrap_states(hx)
        if not self._records_gradient(input, states):
            return super().forward(input, hx)
        if not self.training:  # eval mode: the ordinary forward and backward, as for a patched transformers model
            self._last_settings = None
            return super().forward(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: expected input to be 2-D or 3-D, got {input.dim()}-D instead.")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if states is not None:
            wanted = 3 if batched else 2
            if any(s.dim() != wanted for s in states):
                kind = "batched 3-D" if batched else "unbatched 2-D"
                dims = ", ".join(f"{s.dim()}-D" for s in states)
                raise RuntimeError(f"For {kind} input, the states should also be {wanted}-D but got ({dims}) tensors")
            if not batched:
                states = [s.unsqueeze(1) for s in states]
        if not batched:
            input = input.unsqueeze(batch_dim)
        directions = 2 if self.bidirectional else 1
        if states is None:
            count = (self.num_layers * directions, input.size(batch_dim))
            states = [torch.zeros((*count, n), dtype=input.dtype, device=input.device) for n in self._state_sizes()]
        self.check_forward_args(input, self._wrap_states(states), None)

        settings = HighwaySettings(k=self.k, tol=self.tol, chunk=self.scan_chunk)
        sequence = input.transpose(0, 1) if self.batch_first else input  # time-major from here on
        finals: list[list[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                reverse = direction == 1
                source = sequence.flip(0) if reverse else sequence
                out, last = self._apply_layer(source, [s[index] for s in states], settings, index)
                outputs.append(out.flip(0) if reverse else out)
                for found, value in zip(finals, last):
                    found.append(value)
            sequence = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout, training=True)
        self._last_settings = settings

        output = sequence.transpose(0, 1) if self.batch_first else sequence
        hidden = [torch.stack(found) for found in finals]
        if not batched:
            output, hidden = output.squeeze(batch_dim), [h.squeeze(1) for h in hidden]
        return output, self._wrap_states(hidden)

    def _records_gradient(self, input: Tensor, states: list[Tensor] | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [input, *self._flat_weights, *(states or [])]
        return any(t is not None and t.requires_grad for t in tensors)

    def _layer_weights(self, index: int) -> list[Tensor | None]:
        """(W_ih, W_hh, b_ih, b_hh) of layer-direction ``index`` (biases None without bias)."""
        per_direction = 4 if self.bias else 2
        weights = list(self._flat_weights[index * per_direction : (index + 1) * per_direction])
        return weights if self.bias else weights + [None, None]
