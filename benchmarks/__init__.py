"""Research benchmarks and analyses of hf_hwbp (not installed with the package).

Run them from the repository root as modules, e.g. ``python -m benchmarks.bench_step --models gpt2``; each writes
its tables under ``results/``. The user tools (``run_clm_hwbp.py``, ``run_image_classification_hwbp.py``) stay in
``scripts/``.
"""
