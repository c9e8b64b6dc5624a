"""``HighwayGRU``: a drop-in for ``torch.nn.GRU`` whose backward is Highway-BP(k) through time.

It *is* an ``nn.GRU`` (same constructor, parameter names and shapes, initialization, state dict and forward
signature), so ``load_state_dict`` from an ``nn.GRU`` works and it can replace one in an existing model. Only the
training backward differs: each layer (and direction) is one Highway stack through time whose residual path is
the GRU's direct term z_t (.) h_{t-1} with the forward's gates held fixed (docs/algorithm.md, "Residual paths that
are not the identity"). ``k`` counts how many times a gradient may cross a step's gates; k >= T is exact
backprop through time. Forwards that need no gradient run ``nn.GRU``'s own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .function import HighwayGRULayer, HighwaySettings


class HighwayGRU(nn.GRU):
    """``torch.nn.GRU`` trained with Highway-BP(k) through time.

    Args:
        *args, **kwargs: exactly those of ``torch.nn.GRU`` (``input_size``, ``hidden_size``, ``num_layers``,
            ``bias``, ``batch_first``, ``dropout``, ``bidirectional``, ``device``, ``dtype``).
        k: Highway iterations per backward (an attribute: change it between steps for a schedule). k = 0 trains
            every step through the residual path only; k >= T (the sequence length) is exact backprop through
            time, at the cost of T iterations (use ``nn.GRU`` for that).
        tol: stop iterating early once the relative change of the deltas falls below ``tol`` (None: run k).
        scan_chunk: time steps per chunk of the reverse linear scan (None: about sqrt(T)).

    Packed sequences are refused (pad them and mask the loss); ``proj_size`` does not exist for GRUs.
    """

    def __init__(self, *args, k: int = 2, tol: float | None = None, scan_chunk: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k
        self.tol = tol
        self.scan_chunk = scan_chunk
        self._last_settings: HighwaySettings | None = None

    @classmethod
    def from_gru(cls, gru: nn.GRU, k: int = 2, tol: float | None = None) -> HighwayGRU:
        """A ``HighwayGRU`` with ``gru``'s configuration, weights, device, dtype and train/eval mode."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"from_gru expects a torch.nn.GRU, got {type(gru).__name__}.")
        weight = gru.weight_ih_l0
        new = cls(
            gru.input_size,
            gru.hidden_size,
            num_layers=gru.num_layers,
            bias=gru.bias,
            batch_first=gru.batch_first,
            dropout=gru.dropout,
            bidirectional=gru.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            k=k,
            tol=tol,
        )
        new.load_state_dict(gru.state_dict())
        return new.train(gru.training)

    # ----- settings, validated where they are set ------------------------------------------------------------
    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"k must be an int >= 0 (Highway iterations), got {type(value).__name__} {value!r}.")
        if value < 0:
            raise ValueError(f"k must be >= 0 (0 = residual path only, >= T = exact backprop), got {value}.")
        self._k = value

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
        """Highway iterations run by the last backward, per layer and direction (empty before one)."""
        if self._last_settings is None:
            return []
        found = self._last_settings.iterations
        return [found[i] for i in sorted(found)]

    def extra_repr(self) -> str:
        tol = "" if self.tol is None else f", tol={self.tol}"
        return f"{super().extra_repr()}, k={self.k}{tol}"

    # ----- forward ---------------------------------------------------------------------------------------------
    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:  # noqa: A002 - nn.GRU's name
        if isinstance(input, PackedSequence):
            raise TypeError(
                "HighwayGRU does not take a PackedSequence: pad the batch (torch.nn.utils.rnn.pad_packed_sequence) "
                "and mask the loss of the padded steps, or use torch.nn.GRU for packed input."
            )
        if not self._records_gradient(input, hx):
            return super().forward(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"HighwayGRU: expected input to be 2-D or 3-D, got {input.dim()}-D instead.")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        directions = 2 if self.bidirectional else 1
        if hx is None:
            shape = (self.num_layers * directions, input.size(batch_dim), self.hidden_size)
            hx = torch.zeros(shape, dtype=input.dtype, device=input.device)
        self.check_forward_args(input, hx, None)

        settings = HighwaySettings(k=self.k, tol=self.tol, chunk=self.scan_chunk)
        sequence = input.transpose(0, 1) if self.batch_first else input  # time-major from here on
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                reverse = direction == 1
                source = sequence.flip(0) if reverse else sequence
                out, last = HighwayGRULayer.apply(source, hx[index], settings, index, *self._layer_weights(index))
                outputs.append(out.flip(0) if reverse else out)
                finals.append(last)
            sequence = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                sequence = F.dropout(sequence, self.dropout, training=True)
        self._last_settings = settings

        output = sequence.transpose(0, 1) if self.batch_first else sequence
        hidden = torch.stack(finals)
        if not batched:
            output, hidden = output.squeeze(batch_dim), hidden.squeeze(1)
        return output, hidden

    def _records_gradient(self, input: Tensor, hx: Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [input, *self._flat_weights] + ([] if hx is None else [hx])
        return any(t is not None and t.requires_grad for t in tensors)

    def _layer_weights(self, index: int) -> list[Tensor | None]:
        """(W_ih, W_hh, b_ih, b_hh) of layer-direction ``index`` (biases None without bias)."""
        per_direction = 4 if self.bias else 2
        weights = list(self._flat_weights[index * per_direction : (index + 1) * per_direction])
        return weights if self.bias else weights + [None, None]
