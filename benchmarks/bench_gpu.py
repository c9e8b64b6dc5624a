"""The GPU measurements (batched VJPs, per-layer GPU costs for the simulator, layer-parallel on one GPU), in one run
that writes whatever it finishes (each part fails alone).

    python -m benchmarks.bench_gpu --out OUT_DIR [--quick]

Parts (each writes ``OUT_DIR/<part>.json`` and a line in ``OUT_DIR/summary.md``):

1. ``batched_correctness``: Highway-BP with the blocks' input-VJPs batched over stacked weights
   (``hf_hwbp.batched.BatchedStack`` driven by the engine's ``run_recursion``) against the engine's
   recorded-graph Highway-BP, float32 on the GPU, k = 0, 1, 2, L: relative errors.
2. ``batched_speed``: one training step (forward, backward, no optimizer) of small-batch deep stacks (GPT-2 and
   Llama blocks; L, batch, seq below), bf16 weights, CUDA events, medians of interleaved repetitions: plain
   backprop (SDPA attention and eager attention), Highway-BP(k) with the engine (``patch_model``: one block VJP
   after another), and Highway-BP(k) with batched VJPs (eager attention: SDPA has no batching rule for vmap).
3. ``gpu_costs``: the per-layer costs of ``benchmarks/simulate_pipeline.py``'s GPT-2-small-shaped and
   Llama-1B-shaped stacks measured on this GPU (bf16, one sample per micro-batch), for the simulator's map.
4. ``layer_parallel``: ``tests/parallel_worker.py`` with two processes sharing this one GPU (gloo through host
   memory: NCCL refuses two ranks on one device). A correctness check only, not a speed measurement.
5. ``backend_speed``: one training step (forward + backward) in the user's path: backprop (SDPA), backprop under
   ``torch.compile``, and ``patch_model(model, k, backend=...)`` with the sequential and the batched backend, k =
   0, 1, 2; GPT-2-medium-shaped (L = 24, hidden 1024) and Llama-1B-shaped (L = 16, hidden 2048) stacks, tokens
   per step 256 to 8k, bf16; medians of interleaved repetitions and peak memory per method.
6. ``restack_cost``: what the batched backend's per-step restacking of the blocks' weights costs (time, bytes)
   at GPT-2-medium and Llama-1B layer shapes (a few layers, per layer; runs on the CPU too).

CPU-safe: without CUDA it runs tiny versions of parts 1 and 2 on the CPU (to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from hf_hwbp import patch_model, set_highway_k
from hf_hwbp.batched import BatchedBlocks, BatchedStack
from hf_hwbp.engine import highway_backward, run_recursion
from hf_hwbp.parallel.stages import build_stage

ROOT = Path(__file__).resolve().parents[1]


def build(arch: str, layers: int, hidden: int, seq: int, attn: str, dtype, device, vocab: int = 8192):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab,
            n_positions=seq,
            n_embd=hidden,
            n_layer=layers,
            n_head=max(1, hidden // 64),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cls = tf.GPT2LMHeadModel
    else:
        heads = max(1, hidden // 64)
        config = tf.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            max_position_embeddings=seq,
            tie_word_embeddings=False,
        )
        cls = tf.LlamaForCausalLM
    config._attn_implementation = attn
    with torch.device(device):  # initialize on the device (fast for large stacks)
        model = cls(config)
    model.config.use_cache = False
    return model.to(dtype=dtype).train()


# ----- one step of each method ---------------------------------------------------------------------------------
def backprop_step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()


def batched_highway_step(model, ids, k: int, cache: dict):
    """Forward without graphs inside the stack (the block inputs are kept), head backward for d, k batched
    iterations, one batched parameter VJP, then the embeddings' backward."""
    stage = cache.get("stage")
    if stage is None:
        stage = cache["stage"] = build_stage(model, 0, 1)
    h0 = stage.embed(ids)
    kwargs = stage.layer_kwargs(h0)
    if "blocks" not in cache:
        cache["blocks"] = BatchedBlocks(list(stage.layers), kwargs)
    blocks = cache["blocks"]
    blocks.kwargs = kwargs
    inputs = []
    with torch.no_grad():
        h = h0.detach()
        for i in range(len(stage.layers)):
            inputs.append(h)
            h = stage.run_layers(h, range(i, i + 1), kwargs)
    top = h.requires_grad_(True)
    stage.loss(stage.logits(top), ids).backward()
    stack = BatchedStack(blocks, torch.stack(inputs), top.grad)
    delta, _ = run_recursion(stack, k)
    stack.accumulate_param_grads(delta)
    h0.backward(delta[0])


def cuda_time(fn, device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1000


# ----- parts -------------------------------------------------------------------------------------------------
def part_batched_correctness(args, device) -> dict:
    out = {}
    hidden, seq = (64, 16) if args.quick else (256, 64)
    for arch in ("gpt2", "llama"):
        model = build(arch, 6, hidden, seq, "eager", torch.float32, device)
        stage = build_stage(model, 0, 1)
        ids = torch.randint(0, 8192, (2, seq), device=device)
        h = stage.embed(ids).detach()
        kwargs = stage.layer_kwargs(h)
        params = [p for layer in stage.layers for p in layer.parameters()]
        d = torch.randn_like(h) * 1e-2
        for k in (0, 1, 2, 6):
            inputs, outputs, x = [], [], h
            for i in range(6):
                leaf = x.detach().requires_grad_(True)
                x = stage.run_layers(leaf, range(i, i + 1), kwargs)
                inputs.append(leaf)
                outputs.append(x)
            ref = highway_backward(inputs, outputs, params, d, k=k)
            for p in params:
                p.grad = None
            stack = BatchedStack(list(stage.layers), torch.stack([t.detach() for t in inputs]), d, kwargs)
            delta, _ = run_recursion(stack, k)
            stack.accumulate_param_grads(delta)
            err = max(float((p.grad - r).norm() / r.norm()) for p, r in zip(params, ref.param_grads))
            err_in = float((delta[0] - ref.input_grad).norm() / ref.input_grad.norm())
            out[f"{arch} k={k}"] = {"param_rel_err": err, "input_rel_err": err_in}
            for p in params:
                p.grad = None
    return out


def speed_row(arch, layers, hidden, batch, seq, args, device, dtype) -> dict:
    """Interleaved medians of every method on one configuration."""
    sdpa = build(arch, layers, hidden, seq, "sdpa", dtype, device)
    eager = build(arch, layers, hidden, seq, "eager", dtype, device)
    patched = patch_model(build(arch, layers, hidden, seq, "sdpa", dtype, device), 0)
    ids = torch.randint(0, eager.config.vocab_size, (batch, seq), device=device)
    methods = {
        "backprop sdpa": lambda: backprop_step(sdpa, ids),
        "backprop eager": lambda: backprop_step(eager, ids),
    }
    caches = {k: {} for k in args.ks}
    for k in args.ks:
        methods[f"highway engine k={k}"] = lambda k=k: (set_highway_k(patched, k), backprop_step(patched, ids))
        methods[f"highway batched k={k}"] = lambda k=k: batched_highway_step(eager, ids, k, caches[k])
    times = {name: [] for name in methods}
    for rep in range(args.warmup + args.reps):
        for name, fn in methods.items():
            for m in (sdpa, eager, patched):
                m.zero_grad(set_to_none=True)
            t = cuda_time(fn, device)
            if rep >= args.warmup:
                times[name].append(t)
    row = {"median_s": {name: statistics.median(t) for name, t in times.items()}}
    best = min(row["median_s"]["backprop sdpa"], row["median_s"]["backprop eager"])
    row["speedup_vs_best_backprop"] = {name: best / t for name, t in row["median_s"].items()}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def part_batched_speed(args, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    configs = (
        [("gpt2", L, 768, b, 256) for L in (12, 24, 48) for b in (1, 4)]
        + [("llama", L, 1024, b, 256) for L in (16, 32) for b in (1, 4)]
        if not args.quick
        else [("gpt2", 4, 64, 1, 16), ("llama", 4, 64, 2, 16)]
    )
    for arch, layers, hidden, batch, seq in configs:
        row = {"arch": arch, "layers": layers, "hidden": hidden, "batch": batch, "seq": seq, "dtype": str(dtype)}
        try:
            row.update(speed_row(arch, layers, hidden, batch, seq, args, device, dtype))
        except Exception as error:  # noqa: BLE001 - one failing configuration must not stop the others
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
    return {"rows": rows}


def part_gpu_costs(args, device) -> dict:
    from hf_hwbp.parallel.calibrate import measure_stack_costs

    out = {}
    shapes = {
        "gpt2": dict(layers=12, hidden=768, seq=1024, vocab=50257),
        "llama": dict(layers=16, hidden=2048, seq=2048, vocab=128256),
    }
    for arch, s in shapes.items():
        import transformers as tf

        torch.manual_seed(0)
        if arch == "gpt2":
            config = tf.GPT2Config(
                vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["hidden"], n_layer=2, n_head=12,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            with torch.device(device):
                model = tf.GPT2LMHeadModel(config)
        else:
            config = tf.LlamaConfig(
                vocab_size=s["vocab"], hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=s["seq"],
                tie_word_embeddings=False,
            )  # fmt: skip
            with torch.device(device):
                model = tf.LlamaForCausalLM(config)
        model.config.use_cache = False
        model = model.to(dtype=torch.bfloat16).train()
        costs = measure_stack_costs(model, [1], s["seq"], reps=5, name=f"{arch} on {torch.cuda.get_device_name()}")
        costs.num_layers = s["layers"]  # two layers measured, the shaped stack has this many
        out[arch] = costs.to_json()
        del model
        torch.cuda.empty_cache()
    return out


def part_layer_parallel(args, device) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = Path(args.out) / "layer_parallel_ranks"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={port}", str(ROOT / "tests" / "parallel_worker.py"), "--out", str(target), "--device", "cuda",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.layer_parallel_timeout, env=env, cwd=ROOT)
    out = {"returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:], "cases": {}}
    for rank in (0, 1):
        path = target / f"rank{rank}.json"
        if path.exists():
            for name, case in json.loads(path.read_text()).items():
                ok = case["max_rel_err"] <= case["tolerance"] and not case["missing"]
                out["cases"].setdefault(name, []).append({"rank": rank, "ok": ok, "max_rel_err": case["max_rel_err"]})
    out["all_ok"] = bool(out["cases"]) and all(c["ok"] for v in out["cases"].values() for c in v)
    return out


def timed_step(model, ids) -> None:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def part_backend_speed(args, device) -> dict:
    """The user's path: patch_model with each backend, against backprop eager (SDPA) and compiled."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        shapes, tokens = [("gpt2", 4, 64), ("llama", 4, 64)], [(1, 16), (2, 16)]
    else:
        shapes = [("gpt2", 24, 1024), ("llama", 16, 2048)]
        tokens = [(1, 256), (2, 512), (4, 512), (2, 1024), (4, 1024), (8, 1024)]  # 256 .. 8k tokens per step
    rows = []
    for arch, layers, hidden in shapes:
        for batch, seq in tokens:
            row = {"arch": arch, "layers": layers, "hidden": hidden, "batch": batch, "seq": seq, "dtype": str(dtype)}
            try:
                plain = build(arch, layers, hidden, seq, "sdpa", dtype, device)
                ids = torch.randint(0, plain.config.vocab_size, (batch, seq), device=device)
                methods = {"backprop sdpa": lambda m=plain, ids=ids: timed_step(m, ids)}
                if device.type == "cuda" or not args.quick:
                    compiled = torch.compile(plain)
                    methods["backprop compiled"] = lambda m=compiled, ids=ids: timed_step(m, ids)
                for backend in ("sequential", "batched"):
                    model = patch_model(build(arch, layers, hidden, seq, "sdpa", dtype, device), 0, backend=backend)
                    for k in args.ks:
                        methods[f"highway {backend} k={k}"] = lambda m=model, k=k, ids=ids: (
                            set_highway_k(m, k),
                            timed_step(m, ids),
                        )
                times = {name: [] for name in methods}
                memory = {}
                for rep in range(args.warmup + args.reps):
                    for name, fn in methods.items():
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        t = cuda_time(fn, device)
                        if rep >= args.warmup:
                            times[name].append(t)
                        if device.type == "cuda":
                            memory[name] = torch.cuda.max_memory_allocated() / 2**30
                row["median_s"] = {name: statistics.median(t) for name, t in times.items()}
                best = min(t for name, t in row["median_s"].items() if name.startswith("backprop"))
                row["speedup_vs_best_backprop"] = {name: best / t for name, t in row["median_s"].items()}
                if memory:
                    row["peak_memory_gib"] = memory
            except Exception as error:  # noqa: BLE001 - one failing configuration must not stop the others
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def part_restack_cost(args, device) -> dict:
    """Time and bytes of stacking the blocks' weights (what ``hf_hwbp.batched`` does at every batched backward)."""
    import transformers as tf

    dtype = torch.bfloat16
    count = 2 if args.quick else 4
    shapes = {
        "gpt2-medium layer": lambda: tf.GPT2Config(n_embd=1024, n_layer=count, n_head=16, vocab_size=64),
        "llama-1b layer": lambda: tf.LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=count,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=64,
        ),  # fmt: skip
    }
    out = {}
    for name, make in shapes.items():
        config = make()
        cls = tf.GPT2LMHeadModel if "gpt2" in name else tf.LlamaForCausalLM
        with torch.device(device):
            model = cls(config).to(dtype).eval()  # dropout off: only the weights matter here
        layers = list(model.transformer.h if "gpt2" in name else model.model.layers)
        blocks = BatchedBlocks(layers)
        stacked = sum(t.numel() * t.element_size() for t in (*blocks.params.values(), *blocks.frozen.values()))
        times = []
        for _ in range(args.warmup + args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            BatchedBlocks(layers)  # what one batched backward builds: template + restacked weights
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times[args.warmup :])
        restack = []  # the weights' stacking alone (``refresh``), without the template's copy
        for _ in range(args.warmup + args.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            blocks.refresh()
            if device.type == "cuda":
                torch.cuda.synchronize()
            restack.append(time.perf_counter() - start)
        out[name] = {
            "layers_measured": count,
            "dtype": str(dtype),
            "device": str(device),
            "ms_per_layer": 1000 * median / count,
            "restack_only_ms_per_layer": 1000 * statistics.median(restack[args.warmup :]) / count,
            "mib_per_layer": stacked / count / 2**20,
        }
        print(name, json.dumps(out[name]), flush=True)
        del model, layers, blocks
    return out


PARTS = {
    "batched_correctness": part_batched_correctness,
    "batched_speed": part_batched_speed,
    "gpu_costs": part_gpu_costs,
    "layer_parallel": part_layer_parallel,
    "backend_speed": part_backend_speed,
    "restack_cost": part_restack_cost,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--ks", default="0,1,2")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script, e.g. on a CPU)")
    parser.add_argument("--layer_parallel_timeout", type=int, default=240)
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        args.quick = True
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu (no CUDA: quick CPU check of the script)",
        "args": vars(args),
    }
    (out / "env.json").write_text(json.dumps(env, indent=1))
    summary = [f"# GPU checks ({env['device']}, torch {env['torch']})", ""]
    for name in args.parts.split(","):
        if name in ("gpu_costs", "layer_parallel") and not cuda:
            summary.append(f"- {name}: skipped (no CUDA)")
            continue
        start = time.time()
        try:
            result = PARTS[name](args, device)
            status = "ok"
        except Exception as error:  # noqa: BLE001 - write what failed and go on with the next part
            result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
            status = f"FAILED ({type(error).__name__})"
        result["seconds"] = time.time() - start
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        summary.append(f"- {name}: {status} in {result['seconds']:.0f} s")
        (out / "summary.md").write_text("\n".join(summary) + "\n")
        print(summary[-1], flush=True)


if __name__ == "__main__":
    main()
