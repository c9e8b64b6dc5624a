"""Training-gradient policies of the quality benchmarks: which gradient each parameter group gets at a step.

A *method* name says how the gradient applied by the optimizer is formed:

    backprop                  exact gradient (ordinary autograd)
    backprop_f64              exact gradient, model and data in float64 (a rounding-size perturbation of backprop)
    k<N>                      Highway-BP(N) (hf_hwbp.patch_model(model, N))
    k<N>_exact_pos            Highway-BP(N), but the position embeddings get the exact gradient
    k<N>_exact_input          Highway-BP(N), but every parameter below the stack (token and position embeddings,
                              ViT patch embedding and CLS token) gets the exact gradient: the prototype of
                              "exact gradients for input-side parameters"
    backprop_hw<N>_pos        exact gradient, except the position embeddings, which get Highway-BP(N)'s gradient
    backprop_noise<N>         exact gradient plus, on every parameter tensor, a random (isotropic Gaussian) error with
                              the norm of Highway-BP(N)'s error on that tensor at that step: a perturbation of the
                              same size as Highway-BP(N)'s, with no systematic direction
    backprop_noise@<r>        exact gradient plus a random error of relative norm r on every tensor (cheap noise floor)
    k<N>_warm<S>              exact backprop for the first S optimizer steps, then Highway-BP(N)
    auto_tol<T>               Highway-BP with the adaptive stop of the library (patch_model(model, k=L, tol=T)):
                              iterations end once the block gradients change by less than T (relative)

The prototypes compute the Highway gradient and the exact gradient on the same batch (two backwards) and mix
them; their step cost is therefore not what a library implementation would cost (see ``library_cost_proxy``).
Parameter groups (``group_of``): ``tok_emb``, ``pos_emb`` (below the stack), ``block_<i>`` (the stack) and
``head`` (final norm, LM head or classifier; GPT-2's LM head is tied to ``tok_emb``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import hf_hwbp

INPUT_GROUPS = ("tok_emb", "pos_emb")
AUTO_K = 10_000  # "as many iterations as there are blocks" (patch_model clamps k to the number of blocks)
_BLOCK_RE = re.compile(r"\.(?:h|layers|layer)\.(\d+)\.")
_METHOD_RE = re.compile(
    r"^(?:(?P<bp>backprop)(?:_(?P<f64>f64)|_hw(?P<hwk>\d+)_pos|_noise(?P<nk>\d+)|_noise@(?P<rel>[0-9.eE-]+))?"
    r"|k(?P<k>\d+)(?:_(?P<exact>exact_pos|exact_input)|_warm(?P<warm>\d+))?"
    r"|auto_tol(?P<tol>[0-9.eE-]+))$"
)


def group_of(name: str) -> str:
    """The parameter group of a parameter name (transformers GPT-2, Llama, ViT; PEFT-wrapped names too)."""
    match = _BLOCK_RE.search(name)
    if match:
        return f"block_{match.group(1)}"
    if "wpe" in name or "position_embeddings" in name:
        return "pos_emb"
    if any(key in name for key in ("wte", "embed_tokens", "patch_embeddings", "cls_token")):
        return "tok_emb"
    return "head"


@dataclass(frozen=True)
class Method:
    """A parsed method name (see the module docstring)."""

    name: str
    k: int | None = None  # the Highway-BP k whose gradient is needed (None: no Highway pass)
    base: str = "exact"  # "exact" or "highway": where the gradient comes from by default
    swap_groups: tuple[str, ...] = ()  # groups that take the gradient of the other source
    noise: str | None = None  # "matched" (norm of Highway's error) or "relative"
    noise_rel: float = 0.0
    float64: bool = False
    warm_steps: int = 0  # exact backprop for the first warm_steps steps
    tol: float | None = None  # adaptive stop (with k = a large number: up to the number of blocks)

    @property
    def needs_exact(self) -> bool:
        return self.base == "exact" or bool(self.swap_groups) or self.warm_steps > 0

    @property
    def needs_highway(self) -> bool:
        return self.k is not None

    @property
    def hybrid(self) -> bool:
        """Both gradients are computed at every step (the prototypes)."""
        return self.needs_highway and (self.base == "exact" or bool(self.swap_groups) or self.noise == "matched")

    def library_cost_proxy(self) -> str:
        """The plain method whose step cost a library implementation of this method would have (one device)."""
        if self.swap_groups and self.base == "highway":
            # Highway-BP(k) plus one sequential input-gradient sweep for the stack input ~ one more iteration.
            return f"k{self.k + 1}"
        if self.base == "exact":
            return "backprop"
        if self.tol is not None:
            return "the mean number of iterations run (see the record's mean_iterations)"
        return f"k{self.k}"


def parse_method(name: str) -> Method:
    match = _METHOD_RE.match(name)
    if not match:
        raise ValueError(
            f"unknown method {name!r}: use backprop, backprop_f64, k<N>, k<N>_exact_pos, k<N>_exact_input, "
            "k<N>_warm<S>, auto_tol<T>, backprop_hw<N>_pos, backprop_noise<N> or backprop_noise@<r>"
        )
    g = match.groupdict()
    if g["tol"]:
        tol = float(g["tol"])
        if not tol > 0:
            raise ValueError(f"tolerance must be > 0 in {name!r}")
        return Method(name, k=AUTO_K, base="highway", tol=tol)
    if g["bp"]:
        if g["f64"]:
            return Method(name, float64=True)
        if g["hwk"]:
            return Method(name, k=int(g["hwk"]), swap_groups=("pos_emb",))
        if g["nk"]:
            return Method(name, k=int(g["nk"]), noise="matched")
        if g["rel"]:
            rel = float(g["rel"])
            if not rel > 0:
                raise ValueError(f"noise level must be > 0 in {name!r}")
            return Method(name, noise="relative", noise_rel=rel)
        return Method(name)
    k = int(g["k"])
    if g["exact"] == "exact_pos":
        return Method(name, k=k, base="highway", swap_groups=("pos_emb",))
    if g["exact"] == "exact_input":
        return Method(name, k=k, base="highway", swap_groups=INPUT_GROUPS)
    if g["warm"]:
        return Method(name, k=k, base="highway", warm_steps=int(g["warm"]))
    return Method(name, k=k, base="highway")


def prepare_model(model: nn.Module, method: Method) -> nn.Module:
    """Cast (float64 methods) and patch (methods with a Highway pass) a freshly built model."""
    if method.float64:
        model = model.double()
    if method.needs_highway:
        hf_hwbp.patch_model(model, method.k, tol=method.tol)
    return model


def _grads(model: nn.Module, params: list[Tensor], loss_fn, exact: bool) -> tuple[Tensor, list[Tensor]]:
    if exact and hf_hwbp.is_patched(model):
        with hf_hwbp.exact_backprop(model):
            loss = loss_fn(model)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    else:
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def group_fidelity(names: list[str], highway: list[Tensor], exact: list[Tensor]) -> dict[str, dict[str, float]]:
    """Per group (and ``all``): cosine, norm ratio ||g_hw|| / ||g_exact|| and relative error, in float64."""
    sums: dict[str, list[float]] = {}
    for name, h, e in zip(names, highway, exact):
        h, e = h.double(), e.double()
        stats = [(h * e).sum().item(), h.pow(2).sum().item(), e.pow(2).sum().item(), (h - e).pow(2).sum().item()]
        for group in (group_of(name), "all"):
            acc = sums.setdefault(group, [0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(stats):
                acc[i] += value
    out = {}
    for group, (dot, hh, ee, dd) in sums.items():
        out[group] = {
            "cosine": dot / max((hh * ee) ** 0.5, 1e-300),
            "norm_ratio": (hh / ee) ** 0.5 if ee > 0 else float("nan"),
            "rel_error": (dd / ee) ** 0.5 if ee > 0 else float("nan"),
        }
    return out


class GradientStep:
    """Sets ``.grad`` of every trainable parameter for one optimizer step, as ``method`` says.

    ``generator`` seeds the random errors of the noise methods (a per-run stream, so runs are reproducible).
    ``step(..., monitor=True)`` also returns the per-group fidelity of Highway-BP(k) against the exact gradient on
    that batch (for methods without a Highway pass nothing is monitored).
    """

    def __init__(self, model: nn.Module, method: Method, seed: int = 0):
        self.model, self.method = model, method
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.groups = [group_of(n) for n in self.names]
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.iterations: list[int] = []  # Highway iterations run by each training step's Highway pass

    def step(self, loss_fn, step_index: int = 0, monitor: bool = False) -> tuple[float, dict | None]:
        method = self.method
        if method.warm_steps and step_index < method.warm_steps:
            loss, grads = _grads(self.model, self.params, loss_fn, exact=True)
            self._set(grads)
            return loss.item(), None
        fidelity = None
        if method.needs_highway and (method.hybrid or monitor):
            loss, hw = _grads(self.model, self.params, loss_fn, exact=False)
            self.iterations.append(hf_hwbp.last_highway_iterations(self.model))
            _, ex = _grads(self.model, self.params, loss_fn, exact=True)
            if monitor:
                fidelity = group_fidelity(self.names, hw, ex)
            grads = self._mix(hw, ex)
        elif method.needs_highway:
            loss, grads = _grads(self.model, self.params, loss_fn, exact=False)
            self.iterations.append(hf_hwbp.last_highway_iterations(self.model))
        else:
            loss, grads = _grads(self.model, self.params, loss_fn, exact=True)
            if method.noise == "relative":
                grads = [g + self._random_like(g, method.noise_rel * g.norm()) for g in grads]
        self._set(grads)
        return loss.item(), fidelity

    def _mix(self, hw: list[Tensor], ex: list[Tensor]) -> list[Tensor]:
        method = self.method
        if method.noise == "matched":
            return [e + self._random_like(e, (h - e).norm()) for h, e in zip(hw, ex)]
        base, other = (ex, hw) if method.base == "exact" else (hw, ex)
        return [o if group in method.swap_groups else b for b, o, group in zip(base, other, self.groups)]

    def _random_like(self, like: Tensor, norm: Tensor) -> Tensor:
        noise = torch.randn(like.shape, generator=self.generator, dtype=like.dtype)
        return noise * (norm / noise.norm().clamp_min(1e-30))

    def _set(self, grads: list[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.detach()
