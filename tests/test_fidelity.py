"""measure_fidelity: exact at k = L, below 1 for small k, and free of side effects on training."""

from __future__ import annotations

import torch
from tiny_models import LAYERS, build, make_batch

import hf_hwbp
from hf_hwbp.fidelity import measure_fidelity


def test_fidelity_exact_at_L_and_rising_with_k():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    reports = {}
    for k in (0, 1, 2, LAYERS):
        hf_hwbp.patch_model(model, k=k)
        reports[k] = measure_fidelity(model, lambda m: m(**batch).loss)
        assert reports[k].iterations == k and len(reports[k].per_block_cosine) == LAYERS
    assert reports[LAYERS].cosine > 1 - 1e-12 and reports[LAYERS].rel_error < 1e-10
    errors = [reports[k].rel_error for k in (0, 1, 2, LAYERS)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-3
    # the top block's gradient is exact at every k (every path to it crosses no block)
    assert reports[0].per_block_rel_error[-1] < 1e-10
    logs = reports[1].as_log_dict()
    assert {"hwbp_fidelity/cosine", "hwbp_fidelity/block_0_rel_error"} <= logs.keys()


def test_fidelity_leaves_grads_rng_and_iterations_alone():
    model = build("gpt2-lm")
    batch = make_batch("gpt2-lm")
    hf_hwbp.patch_model(model, k=1)
    model(**batch).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    hf_hwbp.set_highway_k(model, 3)
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    measure_fidelity(model, lambda m: m(**batch).loss)
    assert torch.equal(torch.rand(3), expected_draw)
    assert hf_hwbp.last_highway_iterations(model) == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
