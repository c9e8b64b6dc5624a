"""Gradient fidelity: the Highway-BP gradient against the exact gradient on the same batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers.utils import logging

from .api import exact_backprop, highway_state, unwrap_model

logger = logging.get_logger(__name__)


@dataclass
class FidelityReport:
    """Cosine similarity and relative error ||g_hw - g_exact|| / ||g_exact||, overall and per Highway block.

    ``per_block[j]`` covers the trainable parameters of Highway block j (0-based, bottom to top);
    ``overall`` covers every trainable parameter of the model (blocks, embeddings and head). ``highway_active`` is
    False when the measured pass ran no Highway-BP (model in eval mode, inside ``exact_backprop``): both gradients
    were then backprop's, and the perfect cosine says nothing about Highway-BP.
    """

    cosine: float
    rel_error: float
    per_block_cosine: list[float] = field(default_factory=list)
    per_block_rel_error: list[float] = field(default_factory=list)
    k: int | None = None
    iterations: int | None = None
    highway_active: bool = True

    def as_log_dict(self, prefix: str = "hwbp_fidelity/") -> dict[str, float]:
        logs = {f"{prefix}cosine": self.cosine, f"{prefix}rel_error": self.rel_error}
        for j, (c, e) in enumerate(zip(self.per_block_cosine, self.per_block_rel_error)):
            logs[f"{prefix}block_{j}_cosine"] = c
            logs[f"{prefix}block_{j}_rel_error"] = e
        return logs


def _flat(grads: list[Tensor | None], params: list[Tensor]) -> Tensor:
    parts = [(g if g is not None else torch.zeros_like(p)).detach().double().reshape(-1) for g, p in zip(grads, params)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def compare_gradients(highway: Tensor, exact: Tensor) -> tuple[float, float]:
    """(cosine similarity, relative error) of two flat gradient vectors, in float64."""
    highway, exact = highway.double(), exact.double()
    exact_norm = exact.norm()
    cosine = torch.nn.functional.cosine_similarity(highway, exact, dim=0, eps=1e-300).item()
    rel = ((highway - exact).norm() / exact_norm).item() if exact_norm > 0 else float((highway.norm() > 0).item())
    return cosine, rel


def _grads_of(model: nn.Module, params: list[Tensor], loss_fn: Callable[[nn.Module], Tensor]) -> list[Tensor | None]:
    loss = loss_fn(model)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def measure_fidelity(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
) -> FidelityReport:
    """Compare Highway-BP (the model's current settings) with exact backprop on one batch.

    ``loss_fn(model)`` runs a training forward and returns the scalar loss. Both passes start from the same
    RNG state (same dropout masks); ``.grad``, the
    global RNG stream and ``last_iterations`` are left untouched. Costs two forwards and backwards.
    """
    patch = highway_state(model)
    params = [p for p in unwrap_model(model).parameters() if p.requires_grad]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None})
    previous_iterations = patch.last_iterations
    with torch.random.fork_rng(devices=devices):  # the caller's RNG stream is left as it was
        rng_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        highway = _grads_of(model, params, loss_fn)
        iterations = patch.last_iterations
        torch.set_rng_state(rng_state)  # same dropout masks for the exact pass
        for d, state in zip(devices, cuda_states):
            torch.cuda.set_rng_state(state, d)
        with exact_backprop(model):
            exact = _grads_of(model, params, loss_fn)
    patch.last_iterations = previous_iterations
    cosine, rel = compare_gradients(_flat(highway, params), _flat(exact, params))
    report = FidelityReport(
        cosine=cosine, rel_error=rel, k=patch.effective_k, iterations=iterations, highway_active=iterations is not None
    )
    if not report.highway_active:
        logger.warning(
            "measure_fidelity: Highway-BP was not active in the measured pass (the model's stack is in eval mode, or "
            "the pass ran inside exact_backprop), so both gradients are backprop's and the cosine of 1.0 says nothing "
            "about Highway-BP. Call model.train() first."
        )
    index = {id(p): i for i, p in enumerate(params)}
    for block in patch.block_parameters():
        ids = [index[id(p)] for p in block if id(p) in index]
        c, e = compare_gradients(
            _flat([highway[i] for i in ids], [params[i] for i in ids]),
            _flat([exact[i] for i in ids], [params[i] for i in ids]),
        )
        report.per_block_cosine.append(c)
        report.per_block_rel_error.append(e)
    return report
