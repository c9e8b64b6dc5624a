"""The step graphs and the simulator on small schedules whose timelines are computed by hand."""

from __future__ import annotations

import pytest
import torch

from hf_hwbp.engine import RecordedStack, run_recursion
from hf_hwbp.parallel.graph import HighwayShape, StepGraph, Task, backprop_graph, highway_graph
from hf_hwbp.parallel.simulate import (
    StackCosts,
    WorkCosts,
    backprop_task_cost,
    fit_task_overhead,
    highway_task_cost,
    list_schedule,
    message_latency,
    predict,
    replay,
)


def unit_costs(num_layers=2, latency=0.0, **overrides) -> StackCosts:
    """One sample per micro-batch: f = 1, b = 2, v = 1.5, w = 2 per layer; no head, embeddings or scan cost."""
    work = dict(f=1.0, b=2.0, v=1.5, w=2.0, bi=1.2, bw=0.8)
    work.update(overrides)
    return StackCosts("unit", num_layers, 1, 10.0, {1: WorkCosts(**work)}, latency=latency)


def test_gpipe_one_microbatch_is_the_sequential_step():
    # F0 [0,1] F1 [1,2] B1 [2,4] B0 [4,6]
    assert predict("gpipe", unit_costs(), num_ranks=2, microbatches=1) == pytest.approx(6.0)


def test_gpipe_two_microbatches():
    # rank 0: F(0,0) [0,1] F(0,1) [1,2]; rank 1: F(1,0) [1,2] F(1,1) [2,3] B(1,0) [3,5] B(1,1) [5,7];
    # rank 0: B(0,0) waits for B(1,0): [5,7], B(0,1) [7,9]
    assert predict("gpipe", unit_costs(), num_ranks=2, microbatches=2) == pytest.approx(9.0)


def test_latency_delays_every_crossing():
    # F0 [0,1], message 0.5, F1 [1.5,2.5], B1 [2.5,4.5], message, B0 [5,7]
    assert predict("gpipe", unit_costs(latency=0.5), num_ranks=2, microbatches=1) == pytest.approx(7.0)


def test_task_overhead_is_paid_by_every_task():
    # GPipe M = 1: F0, F1, B1, B0 in a chain, each 0.25 s longer: 6 + 4 x 0.25
    costs = unit_costs()
    costs.torch_task_overhead = 0.25
    assert predict("gpipe", costs, num_ranks=2, microbatches=1) == pytest.approx(7.0)
    # pipeline backprop through hf_hwbp's runtime pays its own overhead instead
    costs.task_overhead = 0.5
    assert predict("gpipe", costs, num_ranks=2, microbatches=1, overhead=costs.task_overhead) == pytest.approx(8.0)


def test_fit_task_overhead_recovers_the_overhead_of_a_step():
    from dataclasses import replace

    costs = unit_costs(4, latency=0.1, head_f=0.5, head_b=0.5)
    measured = predict("highway", replace(costs, task_overhead=0.03), num_ranks=2, microbatches=2, k=1, batch=2)

    def predict_with(overhead):
        return predict("highway", replace(costs, task_overhead=overhead), num_ranks=2, microbatches=2, k=1, batch=2)

    assert fit_task_overhead(predict_with, measured) == pytest.approx(0.03, rel=1e-9)
    assert fit_task_overhead(predict_with, 0.5 * predict_with(0.0)) == 0.0  # faster than the bare work: none


def test_costs_without_overheads_load_as_zero():
    data = unit_costs().to_json()
    del data["task_overhead"], data["torch_task_overhead"]  # a costs file written before the overheads existed
    costs = StackCosts.from_json(data)
    assert costs.task_overhead == 0.0 and costs.torch_task_overhead == 0.0


def test_1f1b_order_and_time():
    graph = backprop_graph("1f1b", 2, 2)
    assert [str(t) for t in graph.order[0]] == ["F(0,0)", "F(0,1)", "B(0,0)", "B(0,1)"]
    assert [str(t) for t in graph.order[1]] == ["F(1,0)", "B(1,0)", "F(1,1)", "B(1,1)"]
    # rank 1: F(1,0) [1,2] B(1,0) [2,4] F(1,1) [4,5] B(1,1) [5,7]; rank 0: B(0,0) [4,6] B(0,1) [7,9]
    assert predict("1f1b", unit_costs(), num_ranks=2, microbatches=2) == pytest.approx(9.0)


def test_torch_multi_stage_orders_cover_every_task_once():
    for schedule in ("interleaved", "zb", "zbv"):
        graph = backprop_graph(schedule, 2, 4)
        ran = [t for order in graph.order for t in order]
        assert sorted(ran) == sorted(graph.deps), schedule
        assert all(graph.rank(t) == r for r, order in enumerate(graph.order) for t in order)
        timeline = replay(graph, backprop_task_cost(graph, unit_costs(4), [1] * 4), lambda a, b: 0.0)
        assert timeline.makespan > 0


def test_highway_k0_two_stages_by_hand():
    """F0 [0,1] F1 [1,2] H [2,3]; then both stages' parameter VJPs (w = 2) at once: 5."""
    costs = unit_costs(head_f=0.5, head_b=0.5)
    assert predict("highway", costs, num_ranks=2, microbatches=1, k=0) == pytest.approx(5.0)


def test_highway_k1_two_stages_by_hand():
    """k = 1 with 2 blocks: the top block's delta is final at iteration 1, so its input and parameter VJPs run
    fused (b = 3); block 1 runs its input VJP (v = 1.5), then the scan, then its parameter VJP (w = 2).
    F0 [0,1] F1 [1,2] H [2,3]; V(1) [3,6] (fused), V(0) [3,4.5]; R(1) [6,6], R(0) [6,6]; W(0) [6,8]."""
    costs = unit_costs(b=3.0, head_f=0.5, head_b=0.5)
    assert predict("highway", costs, num_ranks=2, microbatches=1, k=1) == pytest.approx(8.0)


def test_list_schedule_is_consistent_with_its_replay():
    shape = HighwayShape((2, 2, 1), microbatches=3, k=2)
    costs = unit_costs(5, latency=0.1, head_f=0.3, head_b=0.6, add=0.05)
    graph = highway_graph(shape)
    cost, latency = highway_task_cost(shape, costs, [1, 1, 1]), message_latency(graph, costs, [1, 1, 1])
    timeline = list_schedule(graph, cost, latency)
    assert sorted(t for order in timeline.order for t in order) == sorted(graph.deps)
    fixed = StepGraph(graph.num_ranks, graph.placement, graph.deps, timeline.order)
    assert replay(fixed, cost, latency).makespan == pytest.approx(timeline.makespan)


def test_replay_detects_orders_that_deadlock():
    graph = backprop_graph("gpipe", 2, 1)
    graph.order = [[Task("B", 0, 0), Task("F", 0, 0)], graph.order[1]]
    with pytest.raises(RuntimeError, match="deadlock"):
        replay(graph, lambda t: 1.0, lambda a, b: 0.0)


@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_graph_counts_the_vjps_the_engine_runs(k, need_input_grad):
    """The graph's fresh blocks per iteration are the input-VJPs the engine's recursion actually computes."""
    torch.manual_seed(0)
    depth = 5
    layers = [torch.nn.Linear(3, 3).double() for _ in range(depth)]
    h = torch.randn(2, 3, dtype=torch.float64)
    inputs, outputs = [], []
    for layer in layers:
        x = h.detach().requires_grad_(True)
        h = x + torch.tanh(layer(x))
        inputs.append(x)
        outputs.append(h)
    calls = []

    class Counting(RecordedStack):
        def input_vjp(self, local_index, grad):
            calls.append(local_index + 1)
            return super().input_vjp(local_index, grad)

    stack = Counting(inputs, outputs, torch.ones_like(h), need_input_grad=need_input_grad)
    run_recursion(stack, k)
    shape = HighwayShape((2, 3), microbatches=1, k=k, need_input_grad=need_input_grad)
    expected = sorted(j for n in range(1, shape.iterations + 1) for s in (0, 1) for j in shape.fresh_blocks(s, n))
    assert sorted(calls) == expected


def test_costs_interpolate_and_scale():
    low = WorkCosts(f=1, b=2, v=1, w=2, bi=1, bw=1, head_f=1)
    high = WorkCosts(f=3, b=6, v=3, w=6, bi=3, bw=3, head_f=3)
    costs = StackCosts("x", 4, 1, 100.0, {1: low, 3: high})
    assert costs.at(2).f == pytest.approx(2.0)
    assert costs.at(6).f == pytest.approx(6.0)  # linear beyond the largest size
    bigger = costs.scaled("y", 8, layer=10.0, head=2.0, embed=1.0, activation=4.0)
    assert bigger.at(1).b == pytest.approx(20.0) and bigger.at(1).head_f == pytest.approx(2.0)
    assert bigger.activation_bytes_per_sample == 400.0 and bigger.num_layers == 8
    assert StackCosts.from_json(bigger.to_json()) == bigger


def test_highway_graph_waits_only_for_the_scan_from_above():
    graph = highway_graph(HighwayShape((1, 1, 1), microbatches=2, k=2))
    assert graph.deps[Task("R", 0, 1, 2)] == [Task("V", 0, 1, 2), Task("R", 1, 1, 2)]
    assert graph.deps[Task("V", 1, 0, 2)] == [Task("R", 1, 0, 1)]
    assert graph.sends(Task("H", 2, 0)) == [0, 1]  # d goes to every stage
    crossing = {(d.mb, t.mb) for t, deps in graph.deps.items() for d in deps}
    assert all(a == b for a, b in crossing)  # no micro-batch waits for another one


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _run(*cmd, timeout=240):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_and_simulate_scripts_run_end_to_end(tmp_path):
    """A tiny 2-rank bench_pipeline run, then simulate_pipeline on its JSON: files, validation rows, map cells."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run(
        "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
        "-m", "benchmarks.bench_pipeline", "--models", "gpt2", "--layers", "4", "--hidden", "32", "--heads", "2",
        "--vocab", "64", "--seq", "8", "--batch", "4", "--microbatches", "1,2", "--ks", "0,1",
        "--schedules", "gpipe,zbv", "--reps", "1", "--warmup", "0", "--calib_reps", "1", "--round_calib_reps", "1",
        "--out", str(tmp_path), "--tag", "bench",
    )  # fmt: skip
    bench = json.loads((tmp_path / "bench.json").read_text())
    methods = [r["method"] for r in bench["models"][0]["rows"]]
    assert "torch ZBVZeroBubble M=2" in methods and "highway k=1 M=2" in methods
    _run(
        "-m",
        "benchmarks.simulate_pipeline",
        "--bench",
        str(tmp_path / "bench.json"),
        "--overhead_bench",
        str(tmp_path / "bench.json"),  # the same run stands in for the near-free-layers run
        "--out",
        str(tmp_path),
        "--deep_layers",
        "0",
    )
    result = json.loads((tmp_path / "simulate_pipeline.json").read_text())
    assert len(result["validation"]) == len(methods)
    assert all(r["predicted_s"] > 0 for r in result["validation"])
    overheads = result["overheads"]["gpt2"]
    assert overheads["hf_hwbp"] >= 0 and overheads["torch"] >= 0 and set(overheads["per_method"]) == set(methods)
    assert all(r["predicted_s"] >= r["predicted_no_overhead_s"] for r in result["validation"])
    cells = [c for m in result["maps"] for c in m["cells"] if c.get("best_backprop")]
    assert cells and all(c["speedup_k0"] > 0 for c in cells)
    assert (tmp_path / "simulate_pipeline_map.png").stat().st_size > 0
    # the no-overhead table: one row per (M, k) measured; a step lasts at least its busiest rank's work
    ideal = result["ideal"]
    assert {(r["M"], r["k"]) for r in ideal} == {(m, k) for m in (1, 2) for k in (0, 1)}
    for r in ideal:
        assert 0 < r["busiest_rank_work_s"] <= r["highway_ideal_s"] * (1 + 1e-9)
        assert r["speedup_bound"] >= r["speedup_ideal"] * (1 - 1e-9)
    assert "busiest rank's work" in (tmp_path / "simulate_pipeline.md").read_text()


def test_gpu_script_runs_its_cpu_check(tmp_path):
    _run("-m", "benchmarks.bench_gpu", "--out", str(tmp_path), "--parts", "batched_correctness", "--quick")
    import json

    result = json.loads((tmp_path / "batched_correctness.json").read_text())
    assert all(v["param_rel_err"] < 1e-5 for k, v in result.items() if k != "seconds")


def test_task_kind_is_an_enum_that_still_compares_with_its_letter():
    from hf_hwbp.parallel.graph import Task, TaskKind

    task = Task("V", 1, 0, 2)
    assert task.kind is TaskKind.V and task.kind == "V" and str(task) == "V(1,0,2)"
    assert task == Task(TaskKind.V, 1, 0, 2) and hash(task) == hash(Task(TaskKind.V, 1, 0, 2))
    with pytest.raises(ValueError):
        Task("X", 0, 0)
