"""The C++ CPU backend beyond the shared suite: chunking paths, threads, memory bound, build errors.

The shared suite (test_functional.py, test_bad_input.py, test_kernels.py) runs on backend="cpu"
through ``FUSED_BACKENDS`` with the default budget, where small shapes fit one tile; here tiny
budgets force many token and vocabulary chunks so every merge path runs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_objectives as fo
from fused_objectives.backends import cpu, resolve_backend
from helpers import assert_no_worse, ground_truth, make_inputs, naive_same_dtype, run

REPO = Path(__file__).resolve().parents[1]
KB = 1024


@pytest.fixture
def budget(request, monkeypatch):
    """Set the backend's (budget, tile) bytes for one test."""
    total, tile = request.param
    monkeypatch.setattr(cpu.BACKEND, "budget_bytes", total)
    monkeypatch.setattr(cpu.BACKEND, "tile_bytes", tile)
    return total


@pytest.fixture(autouse=True)
def _built():
    cpu.ensure_built()


# (budget, tile): one tile for everything; a few rows x all columns; many rows and columns
BUDGETS = [(64 << 20, 8 << 20), (16 * KB, 4 * KB), (2 * KB, 256)]
BUDGET_IDS = ["one-tile", "row-chunks", "tiny-tiles"]


@pytest.mark.parametrize("budget", BUDGETS, ids=BUDGET_IDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [
    dict(objective="nll"),
    dict(objective="neg_p", bias=True),
    dict(objective="nll_top:0.2", softcap=4.0, bias=True),
    dict(objective="power:3", logit_scale=0.6, reduction="none"),
], ids=["nll", "neg_p-bias", "gated-softcap-bias", "power-scale-none"])
def test_matches_float64_across_chunkings(budget, dtype, case):
    case = dict(case)
    bias = case.pop("bias", False)
    h, w, t, b = make_inputs(N=45, H=24, V=203, dtype=dtype, bias=bias, peaked=3.0, ignore_frac=0.3)
    up = torch.randn(t.shape) if case.get("reduction") == "none" else None
    fused = run(h, w, t, b, upstream=up, backend="cpu", **case)
    base = naive_same_dtype(h, w, t, b, upstream=up, **case)
    truth = ground_truth(h, w, t, b, upstream=up, **case)
    assert_no_worse(fused, base, truth, what=f"{dtype} ")


@pytest.mark.parametrize("budget", BUDGETS[1:], ids=BUDGET_IDS[1:], indirect=True)
def test_stats_and_argmax_across_chunks(budget):
    h, w, t, b = make_inputs(N=64, H=16, V=300, bias=True, peaked=4.0)
    _, fused = fo.linear_objective_loss(h, w, t, b, backend="cpu", return_stats=True)
    _, ref = fo.linear_objective_loss(h, w, t, b, backend="reference", return_stats=True)
    assert torch.equal(fused.valid, ref.valid) and torch.equal(fused.n_kept, ref.n_kept)
    assert fused.accuracy.item() == pytest.approx(ref.accuracy.item())
    torch.testing.assert_close(fused.logp, ref.logp, atol=2e-5, rtol=1e-5)


def test_argmax_tie_across_vocabulary_chunks(monkeypatch):
    # equal maxima in two different chunks: the first index wins, as torch.argmax
    monkeypatch.setattr(cpu.BACKEND, "budget_bytes", 2 * KB)
    monkeypatch.setattr(cpu.BACKEND, "tile_bytes", 256)
    V = 100
    w = torch.zeros(V, 1)
    w[[7, 90], 0] = 1.0
    h = torch.ones(3, 1)
    t = torch.tensor([7, 90, 3])
    _, stats = fo.linear_objective_loss(h, w, t, backend="cpu", return_stats=True)
    assert stats.accuracy.item() == pytest.approx(1 / 3)


def _fwd_bwd(h, w, t, b, **kw):
    return run(h, w, t, b, backend="cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_and_two_threads_agree(monkeypatch, dtype):
    monkeypatch.setattr(cpu.BACKEND, "tile_bytes", 32 * KB)  # several row and column chunks
    h, w, t, b = make_inputs(N=300, H=64, V=700, dtype=dtype, bias=True, peaked=3.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(h, w, t, b, objective="neg_p")
        torch.set_num_threads(2)
        two = _fwd_bwd(h, w, t, b, objective="neg_p")
    finally:
        torch.set_num_threads(before)
    for key in ("loss", "dh", "dw", "db"):
        a, c = one[key].double(), two[key].double()
        # the epilogues reduce each row and column in a fixed order; only the GEMM library's
        # blocking may differ with the thread count: a few fp32 roundings of the largest entry
        tol = 8 * torch.finfo(torch.float32).eps * max(a.abs().max().item(), 1e-30)
        if dtype != torch.float32 and key != "loss":
            tol = 2 * torch.finfo(dtype).eps * max(a.abs().max().item(), 1e-30)  # one final rounding
        assert (a - c).abs().max().item() <= tol, key


def _allocations(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_tokens_by_vocab_buffer_and_buffers_within_budget(monkeypatch, dtype):
    # every allocation, including those inside the C++ operators (the profiler sees ATen's CPU
    # allocator), is either a gradient-sized output or within the chunk budget; N * V is 40x larger
    N, H, V = 512, 16, 5000
    budget = 64 * KB
    monkeypatch.setattr(cpu.BACKEND, "budget_bytes", budget)
    monkeypatch.setattr(cpu.BACKEND, "tile_bytes", budget // 4)
    h, w, t, b = make_inputs(N=N, H=H, V=V, dtype=dtype, bias=True, ignore_frac=0.3)
    h, w, b = h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    step = lambda: fo.linear_objective_loss(h, w, t, b, objective="neg_p", backend="cpu").backward()
    step()  # warm: the GEMM library's one-time workspaces for new shapes (oneDNN bf16) are not ours
    fused = _allocations(step)
    grads = {N * H * s for s in (2, 4)} | {V * H * s for s in (2, 4)}  # fp32 accumulators and results
    # (the profiler nets an op's frees against its allocations: a scalar temporary freed by the
    # backward's gradient * upstream multiply shows as a few bytes less)
    over = [a for a in fused if a > budget and not any(0 <= g - a < 64 for g in grads)]
    assert not over, f"allocations beyond the {budget}-byte budget: {over}"
    assert fused[0] < N * V * 4 // 8
    ref = _allocations(lambda: fo.linear_objective_loss(h, w, t, b, objective="neg_p", backend="reference").backward())
    assert ref[0] >= N * V * 4  # the detector sees the reference's fp32 logits


@pytest.mark.parametrize("n,v,h,x32,w32", [(1, 1, 1, True, True), (4096, 128000, 256, True, True),
                                           (8192, 32000, 1024, True, True), (7, 50, 4096, False, False),
                                           (100000, 256000, 8192, False, False)])
@pytest.mark.parametrize("budget,tile", [(64 << 20, 8 << 20), (1 << 20, 256 * KB), (4 * KB, 1 * KB)])
def test_plan_respects_budget(n, v, h, x32, w32, budget, tile):
    rows, cols = cpu.plan_chunks(n, v, h, x32, w32, budget, tile)
    assert 1 <= rows <= max(n, 1) and 1 <= cols <= v
    workspace = 4 * (rows * cols + 2 * rows * h + (0 if w32 else 2 * cols * h))
    c = min(cpu.MIN_COLS, v)  # the smallest tile: one row, MIN_COLS columns
    minimum = 4 * (c + 2 * h + (0 if w32 else 2 * c * h))
    assert workspace <= max(budget, minimum)


def test_auto_is_cpu_on_cpu_and_ops_are_registered():
    assert resolve_backend("auto", torch.device("cpu")) is cpu.BACKEND
    h, w, t, _ = make_inputs(N=8, H=4, V=11)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fo.linear_objective_loss(h.requires_grad_(), w, t, reduction="none").sum().backward()
    names = {e.name for e in prof.events()}
    assert {"fused_objectives::lse_forward", "fused_objectives::grad_backward"} <= names


def test_scalar_loss_takes_three_gemms_and_no_backward_recompute():
    # a mean/sum loss gets its gradients in the forward (chunked.py): logits, dX and dW GEMMs, once
    h, w, t, _ = make_inputs(N=8, H=4, V=11)
    h, w = h.requires_grad_(), w.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fo.linear_objective_loss(h, w, t, objective="neg_p").backward()
    names = [e.name for e in prof.events()]
    assert names.count("aten::mm") + names.count("aten::addmm_") == 3, sorted(set(names))
    assert "fused_objectives::grad_backward" not in names


def test_traceable_with_fake_tensors():
    # torch.compile sees through the operators via their fake (shape-only) kernels
    h, w, t, b = make_inputs(N=12, H=8, V=30, bias=True)
    fn = torch.compile(lambda h, w, b: fo.linear_objective_loss(h, w, t, b, objective="neg_p", backend="cpu"),
                       backend="aot_eager", fullgraph=False)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    fn(hh, ww, bb).backward()
    ref = run(h, w, t, b, backend="cpu", objective="neg_p")
    torch.testing.assert_close(hh.grad, ref["dh"])
    torch.testing.assert_close(ww.grad, ref["dw"])


def test_no_compiler_is_a_clear_error(tmp_path):
    code = ("import torch, fused_objectives as fo\n"
            "h = torch.randn(4, 8); w = torch.randn(10, 8); t = torch.randint(0, 10, (4,))\n"
            "print('REF', float(fo.linear_objective_loss(h, w, t, backend='reference')))\n"
            "try:\n    fo.linear_objective_loss(h, w, t)\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # an empty build cache and no compiler: nothing to load, nothing to build with
    env.update(CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert "REF" in out.stdout, out.stdout + out.stderr
    assert "ERR" in out.stdout, out.stdout + out.stderr
    msg = out.stdout.split("ERR", 1)[1]
    assert "C++17 compiler" in msg and "g++" in msg and "backend='reference'" in msg, msg
