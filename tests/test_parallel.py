"""Layer-parallel Highway-BP (hf_hwbp.parallel): real multi-process runs on CPU (gloo) + in-process checks.

The multi-process runs launch tests/parallel_worker.py with ``python -m torch.distributed.run`` (2 stages for
every case, 3 stages for a subset: a middle stage, the chain scan over 3 ranks, a tied-gradient subgroup).
Each rank compares the gradients of its own stage with single-process references on the same float64 model
and batch: ``patch_model(model, k, group_size=G)`` for Highway-BP, the unpatched model for exact backprop,
for M = 1, 2 and 4 micro-batches (see the worker's docstring for the micro-batched reference).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import hf_hwbp
from hf_hwbp.parallel import LayerParallelHighway, build_stage, check_world, make_layout

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from parallel_worker import build, cases  # noqa: E402

CASES = cases()
THREE_STAGE_CASES = [
    "gpt2-uneven-k2-g1-mb2",
    "gpt2-backprop-exact",
    "llama-k1-g1-mb1",
    "gpt2-k1-g1-mb4",
    "llama-k4-exact-mb2",
    "gpt2-torch-gpipe",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, out: Path, only: list[str] | None = None) -> dict[int, dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(TESTS / "parallel_worker.py"),
        "--out",
        str(out),
    ]
    if only:
        cmd += ["--only", ",".join(only)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=TESTS.parent)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)}


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("two_stages"))


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory):
    return _launch(3, tmp_path_factory.mktemp("three_stages"), THREE_STAGE_CASES)


def _check(results: dict[int, dict], name: str) -> None:
    for rank, per_rank in results.items():
        r = per_rank[name]
        assert r["params"] > 0 and not r["missing"], f"rank {rank}: parameters without gradient: {r['missing']}"
        assert r["max_rel_err"] <= r["tolerance"], f"rank {rank}: {name}: {r['worst']} rel. error {r['max_rel_err']}"


@pytest.mark.parametrize("name", list(CASES))
def test_two_stages_match_single_process(two_stages, name):
    _check(two_stages, name)


@pytest.mark.parametrize("name", THREE_STAGE_CASES)
def test_three_stages_match_single_process(three_stages, name):
    _check(three_stages, name)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("mb", 1) > 1 and c["method"] == "highway"])
def test_micro_batches_give_the_whole_batch_gradient(two_stages, name):
    """Against the whole-batch reference: only the float32 rounding inside transformers' loss may differ."""
    for per_rank in two_stages.values():
        assert per_rank[name]["whole_batch_rel_err"] <= 1e-6


def test_every_stage_holds_a_part(two_stages):
    total = sum(two_stages[r]["gpt2-k1-g1-mb1"]["params"] for r in two_stages)
    assert total == len(list(build("gpt2", 4).parameters())) + 1  # the tied weight lives on both ends


def test_tol_stops_like_the_engine(two_stages):
    iterations = {two_stages[r]["gpt2-k4-tol"]["iterations"] for r in two_stages}
    assert len(iterations) == 1 and 0 < iterations.pop() < 4


def test_train_layer_parallel_matches_single_process_training(two_stages):
    for rank in two_stages:
        train = two_stages[rank]["train"]
        assert len(train["losses"]) == 3
        assert train["losses"] == pytest.approx(train["reference"], rel=1e-9, abs=0)


# ----- in-process: layout and errors ------------------------------------------------------------------------
def test_layout_groups_like_patch_model():
    layout = make_layout(5, 2, group_size=2)
    assert layout.blocks == ((0, 2), (2, 4), (4, 5))
    assert layout.stage_blocks == ((0, 2), (2, 3))
    assert list(layout.layers_of(1)) == [4]
    stage = make_layout(5, 2, group_size="stage")
    assert stage.blocks == ((0, 3), (3, 5)) and stage.num_blocks == 2
    assert make_layout(6, 3, blocks_per_stage=[1, 2, 3]).stage_blocks == ((0, 1), (1, 3), (3, 6))


def test_more_stages_than_blocks_is_a_value_error():
    with pytest.raises(ValueError, match="every stage needs at least one block"):
        make_layout(4, 3, group_size=2)
    with pytest.raises(ValueError, match="every stage needs at least one layer"):
        make_layout(2, 3, group_size="stage")
    with pytest.raises(ValueError, match="at least one block"):
        build_stage(build("gpt2", 4), 0, 5)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        make_layout(4, 2, blocks_per_stage=[1, 2])


def test_bad_rank_or_model_is_a_value_error():
    with pytest.raises(ValueError, match="rank must be"):
        build_stage(build("gpt2", 4), 2, 2)
    with pytest.raises(ValueError, match="no stage recipe"):
        build_stage(torch.nn.Linear(2, 2), 0, 1)
    with pytest.raises(ValueError, match="no module"):
        build_stage(build("gpt2", 2).transformer, 0, 1)  # bare GPT2Model: no lm_head


def test_world_size_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="2 stages were requested but the process group has 1"):
        check_world(2, 1)
    assert check_world(None, 3) == 3


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_runner_rejects_a_world_that_does_not_match(world_of_one):
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        LayerParallelHighway(build("gpt2", 4), k=1, num_stages=2)
    with pytest.raises(ValueError, match="method"):
        LayerParallelHighway(build("gpt2", 4), method="zero-bubble")
    with pytest.raises(ValueError, match="k must be"):
        LayerParallelHighway(build("gpt2", 4), k=-1)
    with pytest.raises(ValueError, match="microbatches=1 or tol=None"):
        LayerParallelHighway(build("gpt2", 4), k=2, tol=0.1, microbatches=2)
    with pytest.raises(ValueError, match="scan must be 'chain'"):
        LayerParallelHighway(build("gpt2", 4), scan="allgather")


def test_runner_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="torchrun"):
        LayerParallelHighway(build("gpt2", 2), k=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_single_stage_equals_patch_model(world_of_one, arch):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = hf_hwbp.patch_model(build(arch, 3), 1)
    ref(input_ids=ids, labels=ids).loss.backward()
    model = build(arch, 3)
    names = {id(p): n for n, p in model.named_parameters()}
    runner = LayerParallelHighway(model, k=1)
    loss = runner.step(ids)
    assert loss is not None and runner.last_iterations == 1
    want = dict(ref.named_parameters())
    for p in runner.parameters():
        r = want[names[id(p)]].grad
        assert float((p.grad - r).norm() / r.norm()) <= 1e-10


def test_steps_accumulate_like_one_step_on_the_whole_batch(world_of_one):
    """Two calls with the accumulated batch's token count add up to one call on both halves (Trainer-style
    gradient accumulation); micro-batches inside a call do not change that."""
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    items = int((ids[:, 1:] != -100).sum())
    whole = LayerParallelHighway(build("gpt2", 3), k=1)
    whole_loss = whole.step(ids)
    parts = LayerParallelHighway(build("gpt2", 3), k=1, microbatches=2)
    loss = parts.step(ids[:2], num_items_in_batch=items) + parts.step(ids[2:], num_items_in_batch=items)
    assert float(loss) == pytest.approx(float(whole_loss), rel=1e-6)  # transformers computes the loss in float32
    for p, q in zip(whole.parameters(), parts.parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm()) <= 1e-10


def test_step_runs_under_autocast(world_of_one):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = hf_hwbp.patch_model(build("llama", 3).float(), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(input_ids=ids, labels=ids).loss.backward()
    model = build("llama", 3).float()
    names = {id(p): n for n, p in model.named_parameters()}
    runner = LayerParallelHighway(model, k=1, microbatches=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        runner.step(ids)
    want = dict(ref.named_parameters())
    for p in runner.parameters():
        r = want[names[id(p)]].grad
        assert torch.isfinite(p.grad).all()
        assert float((p.grad - r).norm() / r.norm()) <= 5e-2  # bf16 rounding of two micro-batches vs one batch
