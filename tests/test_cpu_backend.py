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
    dict(objective="nll_top:0.2", softcap=8.0, bias=True),
    dict(objective="power:3", logit_scale=0.6, reduction="none"),
], ids=["nll", "neg_p-bias", "gated-softcap-bias", "power-scale-none"])
def test_matches_float64_across_chunkings(budget, dtype, case):
    case = dict(case)
    bias = case.pop("bias", False)
    h, w, t, b = make_inputs(N=45, H=24, V=203, dtype=dtype, bias=bias, peaked=3.0, ignore_frac=0.3)
    if "top" in case["objective"]:  # the gate keeps some valid tokens and drops others
        _, st = fo.linear_objective_loss(h.double(), w.double(), t, b.double(), backend="reference",
                                         return_stats=True, **case)
        assert 0 < st.n_kept.item() < st.n_valid.item(), (st.n_kept, st.n_valid)
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


# ---------------------------------------------------------------- half-precision GEMMs (issue 16)

def _truth64(h, w, t, b, objective, reduction, softcap=None, logit_scale=None, upstream=None):
    """float64 loss and gradients from the definitions, on the inputs' own (rounded) values."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = h64 @ w64.T + (0 if b64 is None else b64)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != -100
    lp = torch.log_softmax(z, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    per_tok = {"nll": -lp, "neg_p": -torch.expm1(lp)}[objective] * valid
    if reduction == "none":
        loss = per_tok
        (loss * upstream.double()).sum().backward()
    else:
        loss = per_tok.sum() / (valid.sum() if reduction == "mean" else 1)
        loss.backward()
    return {"loss": loss.detach(), "dh": h64.grad, "dw": w64.grad, "db": None if b64 is None else b64.grad}


@pytest.fixture
def half_gemm(request, monkeypatch):
    """Force the GEMM-dtype decision (FUSED_OBJECTIVES_CPU_HALF_GEMM) for one test."""
    monkeypatch.setenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", request.param)
    return request.param == "1"


@pytest.mark.parametrize("budget", [BUDGETS[0], BUDGETS[2]], ids=["one-tile", "tiny-tiles"], indirect=True)
@pytest.mark.parametrize("half_gemm", ["1", "0"], ids=["half-gemm", "fp32-gemm"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    dict(objective="neg_p", reduction="mean", bias=True),
    dict(objective="nll", reduction="none", softcap=3.0, logit_scale=0.7),
], ids=["neg_p-mean-bias", "nll-none-softcap-scale"])
def test_half_precision_no_worse_than_eager_same_dtype(budget, half_gemm, dtype, case):
    # bf16 / fp16 inputs, GEMMs in that dtype or in fp32: loss and gradients against a float64
    # truth no worse than eager PyTorch in the same dtype (logits in the input dtype)
    case = dict(case)
    bias = case.pop("bias", False)
    h, w, t, b = make_inputs(N=40, H=32, V=257, dtype=dtype, bias=bias, peaked=3.0, ignore_frac=0.2, seed=3)
    up = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) if case["reduction"] == "none" else None
    fused = run(h, w, t, b, upstream=up, backend="cpu", **case)
    base = naive_same_dtype(h, w, t, b, upstream=up, **case)
    truth = _truth64(h, w, t, b, upstream=up, **case)
    for key in ("dh", "dw", "db"):
        if fused[key] is not None:
            assert fused[key].dtype == dtype, key
    assert_no_worse(fused, base, truth, what=f"{dtype} half_gemm={half_gemm} ")


def test_half_gemm_decision_is_cached_and_overridable(monkeypatch):
    monkeypatch.delenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", raising=False)
    assert cpu.half_gemm(torch.float32) is False
    first = cpu.half_gemm(torch.bfloat16)
    assert isinstance(first, bool) and cpu._HALF_GEMM[torch.bfloat16] is first
    monkeypatch.setattr(cpu, "_gemm_times", lambda dtype: pytest.fail("measured twice"))
    assert cpu.half_gemm(torch.bfloat16) is first
    monkeypatch.setenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", "0")
    assert cpu.half_gemm(torch.bfloat16) is False
    monkeypatch.setenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", "1")
    assert cpu.half_gemm(torch.float16) is True


def test_half_gemm_prefers_the_faster_kernels(monkeypatch):
    # the decision follows the measurement: a dtype 10x slower than fp32 (no native kernels) stays fp32
    monkeypatch.delenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", raising=False)
    monkeypatch.setattr(cpu, "_HALF_GEMM", {})
    monkeypatch.setattr(cpu, "_gemm_times", lambda dtype: (10.0, 1.0) if dtype == torch.float16 else (0.3, 1.0))
    assert cpu.half_gemm(torch.float16) is False
    assert cpu.half_gemm(torch.bfloat16) is True


# ---------------------------------------------------------------- issue 12, items 3, 4, 5

@pytest.mark.parametrize("softcap", [1e8, 30.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_tanh_accurate(softcap, reduction):
    # softcap 1e8: tanh of ~1e-8 arguments, where (1 - e) / (1 + e) with e = exp(-2|a|) cancels
    h, w, t, b = make_inputs(N=40, H=16, V=300, bias=True, peaked=3.0, seed=5)
    h = h * 4  # logits of tens: the soft-cap at 30 bends them
    up = torch.randn(t.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    kw = dict(objective="nll", reduction=reduction, softcap=softcap)
    fused = run(h, w, t, b, upstream=up, backend="cpu", **kw)
    base = naive_same_dtype(h, w, t, b, upstream=up, **kw)
    truth = _truth64(h, w, t, b, upstream=up, **kw)
    assert_no_worse(fused, base, truth, k=4.0, what=f"softcap={softcap} {reduction} ")


@pytest.mark.parametrize("scale", [1e4, 1e6])
@pytest.mark.parametrize("api", ["none", "target_logprob", "mean"])
def test_large_logit_scale_backward_consistent(scale, api):
    # Logits near 1e4 / 1e6 that differ by O(1): raw logits 1 + d with d ~ 3 / scale (hidden =
    # [one-hot, 1], weight = [d, 1]: two products per dot product, so every GEMM rounds them
    # alike), then one fp32 rounding of raw * scale, the same in the forward and in every
    # recomputation.  The truth is float64 on those fp32 logits; a backward that rounds
    # differently from the forward (an FMA fusing raw * scale - max) is off by up to ulp(1e6) =
    # 0.06 in the logits, i.e. percents.
    N, H, V = 24, 40, 64
    g = torch.Generator().manual_seed(4)
    k = torch.randint(0, H, (N,), generator=g)
    h = torch.cat([torch.nn.functional.one_hot(k, H).float(), torch.ones(N, 1)], 1)
    w = torch.cat([torch.randn(V, H, generator=g) * (3.0 / scale), torch.ones(V, 1)], 1)
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    if api == "target_logprob":
        out = fo.target_logprob(hh, ww, t, logit_scale=scale, backend="cpu")
        (out * up).sum().backward()
        sign, upstream = 1.0, up
    elif api == "none":
        out = fo.linear_objective_loss(hh, ww, t, reduction="none", logit_scale=scale, backend="cpu")
        (out * up).sum().backward()
        sign, upstream = -1.0, up
    else:
        fo.linear_objective_loss(hh, ww, t, reduction="sum", logit_scale=scale, backend="cpu").backward()
        sign, upstream = -1.0, torch.ones(N)
    z32 = (h @ w.T) * torch.tensor(scale, dtype=torch.float32)  # round(1 + d), then one rounding
    p = torch.softmax(z32.double(), -1)
    dz = sign * upstream.double()[:, None] * (torch.nn.functional.one_hot(t, V).double() - p) * scale
    dh, dw = dz @ w.double(), dz.T @ h.double()
    # dh's last column sums dz over the vocabulary (zero up to cancellation): left out
    for got, want, name in ((hh.grad[:, :H], dh[:, :H], "dh"), (ww.grad, dw, "dw")):
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative error {rel:.2e} at logit_scale={scale}"


def test_confident_token_loss_accurate_on_every_path():
    # 1 - p = 1e-7: the NLL is log1p(1e-7); log(1 + rest) in fp32 is 19% off.  Every path (scalar
    # loss with gradients in the forward, without gradients, per-token) gives the same value.
    V = 5
    rest = 1e-7
    w = torch.zeros(V, 1)
    w[1:, 0] = float(torch.log(torch.tensor(rest / (V - 1), dtype=torch.float64)))
    h = torch.ones(6, 1)
    t = torch.zeros(6, dtype=torch.long)
    truth = torch.log_softmax((h.double() @ w.double().T), -1)[:, 0].neg()  # float64, same inputs
    want = truth.mean().item()
    assert 0.9e-7 < want < 1.1e-7
    hh = h.clone().requires_grad_()
    got = {
        "mean+grad": fo.linear_objective_loss(hh, w, t, backend="cpu").item(),
        "mean": fo.linear_objective_loss(h, w, t, backend="cpu").item(),
        "sum+grad": fo.linear_objective_loss(hh, w, t, reduction="sum", backend="cpu").item() / 6,
        "none": fo.linear_objective_loss(hh, w, t, reduction="none", backend="cpu").mean().item(),
        "logprob": -fo.target_logprob(h, w, t, backend="cpu").mean().item(),
    }
    for name, value in got.items():
        assert value == pytest.approx(want, rel=1e-5), (name, got)


# ---------------------------------------------------------------- build cache (issue 12 item 11)

_BUILD = """
import sys
from pathlib import Path
from fused_objectives.backends import cpu
cpu._source_path = lambda: Path(sys.argv[1])
err = cpu._Loader._build()
print("OK" if err is None else "ERR " + err)
"""


def _builder(source, cache, quiet=False):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_OBJECTIVES_QUIET")}
    env["TORCH_EXTENSIONS_DIR"] = str(cache)
    if quiet:
        env["FUSED_OBJECTIVES_QUIET"] = "1"
    return subprocess.Popen([sys.executable, "-c", _BUILD, str(source)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
    out, err = proc.communicate(timeout=600)
    assert "OK" in out, out + err
    return err.count("fused_objectives: compiling the CPU kernels")


def test_build_cache_locked_reused_across_checkouts_and_quiet(tmp_path):
    # a tiny source stands in for the kernels (the loader's logic is the same, the compile is short)
    cache = tmp_path / "cache"
    one, two = tmp_path / "checkout1", tmp_path / "checkout2"
    for d in (one, two):
        d.mkdir()
        (d / "fused_objectives_cpu.cpp").write_text("extern \"C\" int fused_objectives_probe() { return 1; }\n")
    # two processes at once on an empty cache: one compiles (and says so once), the other waits, loads
    procs = [_builder(one / "fused_objectives_cpu.cpp", cache) for _ in range(2)]
    assert sum(_finish(p) for p in procs) == 1
    libs = list(cache.glob("fused_objectives_cpu_*/*.so"))
    assert len(libs) == 1
    stamp = libs[0].stat().st_mtime_ns
    # another checkout (another path, same content): the cached library, no compiler run
    assert _finish(_builder(two / "fused_objectives_cpu.cpp", cache)) == 0
    assert libs[0].stat().st_mtime_ns == stamp
    # changed content: a new build, silent under FUSED_OBJECTIVES_QUIET=1
    (two / "fused_objectives_cpu.cpp").write_text("extern \"C\" int fused_objectives_probe() { return 2; }\n")
    assert _finish(_builder(two / "fused_objectives_cpu.cpp", cache, quiet=True)) == 0
    assert len(list(cache.glob("fused_objectives_cpu_*/*.so"))) == 2


@pytest.mark.parametrize("half_gemm", ["1"], ids=["half-gemm"], indirect=True)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_target_logit_in_fp32_beats_eager_bf16(half_gemm, reduction):
    # confident tokens with large target logits (margins up to 24): a bf16 logits tile rounds them
    # by up to 2^-9 * 24 = 0.05, which eager bf16 turns into percent errors of the per-row
    # gradients; the target's logit taken apart in fp32 keeps the worst row several times better
    g = torch.Generator().manual_seed(6)
    N, H, V = 64, 128, 512
    w = torch.randn(V, H, generator=g) / H**0.5
    t = torch.randint(0, V, (N,), generator=g)
    x = torch.randn(N, H, generator=g)
    x += (torch.rand(N, generator=g) * 24 / w[t].pow(2).sum(1))[:, None] * w[t]
    h, w = x.bfloat16(), w.bfloat16()
    up = torch.rand(N, generator=g) if reduction == "none" else None
    kw = dict(objective="neg_p", reduction=reduction)
    fused = run(h, w, t, upstream=up, backend="cpu", **kw)
    base = naive_same_dtype(h, w, t, upstream=up, **kw)
    truth = _truth64(h, w, t, None, upstream=up, **kw)
    worst_row = lambda a, b: ((a.double() - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-30)).max().item()
    for key in ("dh", "dw"):
        ours, eager = worst_row(fused[key], truth[key]), worst_row(base[key], truth[key])
        assert ours < 0.5 * eager, (key, ours, eager)


def test_half_gemm_measures_real_tensors_while_tracing(monkeypatch):
    # first reached inside torch.compile's tracing (fake tensors): the timing must still run real
    # GEMMs, or a meaningless measurement would be cached for the whole process
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def probe(dtype):
        assert not isinstance(torch.randn(2), FakeTensor)
        return 0.1, 1.0

    monkeypatch.delenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", raising=False)
    monkeypatch.setattr(cpu, "_HALF_GEMM", {})
    monkeypatch.setattr(cpu, "_gemm_times", probe)
    with FakeTensorMode():
        assert cpu.half_gemm(torch.bfloat16) is True


# ---------------------------------------------------------------- backend contract v2 (issue 14)
# The backend object is called directly (no autograd layer): forward -> (logp, state, argmax,
# rows [3, N] = (lse, entropy, dotz)), backward with coef [N] | [2, N] | [3, N] = (c, b, g), and
# forward_with_grad with coef_fn(logp, lse, dotz, target, valid).  The truth is float64 from the
# definitions: z materialised, S = sum_i c_i logp_i + b_i lse_i + g_i dotz_i, autograd for dX, dW, db.

from fused_objectives.options import LogitOptions  # noqa: E402

TERMS = {"c": 1, "cb": 2, "cbg": 3}


def _v2_inputs(dtype, with_bias, seed=11, N=45, H=24, V=203):
    """Inputs, a valid mask (ignored tokens: target -100) and per-class coefficient tables [3, V]
    (some classes all zero, some with c = 0 but b != 0) and a positive dot vector [V]."""
    g = torch.Generator().manual_seed(seed)
    h, w, t, b = make_inputs(N=N, H=H, V=V, dtype=dtype, bias=with_bias, peaked=3.0, ignore_frac=0.25, seed=seed)
    tab = torch.randn(3, V, generator=g)
    tab[1:] *= 0.5
    classes = torch.randperm(V, generator=g)
    tab[:, classes[:V // 4]] = 0.0  # tokens of these classes: all coefficients zero
    tab[0, classes[V // 4:V // 2]] = 0.0  # c = 0 but b, g not (a z-loss on a token the gate dropped)
    dot = 0.5 + torch.rand(V, generator=g)
    t = t.clone()
    valid = t != -100
    t[valid] = torch.where(torch.rand(int(valid.sum()), generator=g) < 0.4,
                           classes[torch.randint(0, V // 2, (int(valid.sum()),), generator=g)], t[valid])
    return h, w, t, b, valid, tab, dot


def _coefs(tab, t, valid, k):
    """coef [N] | [k, N]: the class tables at each token's target, zero where not valid."""
    c = tab[:k, t.clamp(min=0)] * valid
    return (c[0] if k == 1 else c).contiguous()


def _truth_v2(h, w, b, t, valid, opts, coef, dot):
    """float64 logp, lse, entropy, dotz, argmax, S and dS/d(h, w, b) on the inputs' own values."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    z = h64 @ w64.T + (0 if b64 is None else b64)
    if opts.logit_scale is not None:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    lse = torch.logsumexp(z, -1)
    logp_all = z - lse[:, None]
    logp = logp_all.gather(1, t.clamp(min=0)[:, None])[:, 0]
    dotz = z @ dot.double()
    c = coef.double().reshape(-1, coef.shape[-1])
    s = (c[0] * logp).sum()
    if c.shape[0] > 1:
        s = s + (c[1] * lse).sum()
    if c.shape[0] > 2:
        s = s + (c[2] * dotz).sum()
    s.backward()
    top2 = z.detach().topk(2, dim=-1).values
    return {"logp": logp.detach(), "lse": lse.detach(), "dotz": dotz.detach(),
            "entropy": -(logp_all.exp() * logp_all).sum(-1).detach(), "argmax": z.detach().argmax(-1),
            "gap": top2[:, 0] - top2[:, 1], "zabs": z.detach().abs().max(-1).values,
            "uzabs": (z.detach().abs() * dot.double()).sum(-1), "total": s.detach(),
            "dh": h64.grad, "dw": w64.grad, "db": None if b64 is None else b64.grad}


def _close_rows(got, want, scale, rel, what):
    err = (got.double() - want).abs()
    bound = rel * scale + 1e-6
    bad = err > bound
    assert not bad.any(), f"{what}: worst {err.max().item():.3e} (bound {bound[bad][0].item():.3e})"


def _close_grad(got, want, rel, what):
    assert got is not None, what
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"{what}: error {err:.3e} > {rel:g} x max {scale:.3e}"


@pytest.fixture
def gemm_mode(request, monkeypatch):
    """(dtype, forced half-precision GEMMs or not) for one test."""
    dtype, half = request.param
    monkeypatch.setenv("FUSED_OBJECTIVES_CPU_HALF_GEMM", "1" if half else "0")
    return dtype


GEMM_MODES = [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)]
GEMM_IDS = ["fp32", "bf16-half-gemm", "bf16-fp32-gemm"]
TRANSFORMS = {"plain": (False, LogitOptions()), "bias-scale-softcap": (True, LogitOptions(logit_scale=1.7, softcap=6.0))}


def _tolerances(dtype):
    # (stats, relative to the row's logit size; gradients, relative to their largest entry):
    # fp32 epilogue and GEMMs; bf16 logits tiles / dz / results round at 2^-9
    return (2e-6, 2e-5) if dtype == torch.float32 else (8e-3, 3e-2)


def _check_stats(logp, argmax, rows, truth, valid, dtype, row_stats, with_dot):
    st_tol, _ = _tolerances(dtype)
    v = valid
    _close_rows(logp[v], truth["logp"][v], truth["zabs"][v], st_tol, "logp")
    _close_rows(rows[0][v], truth["lse"][v], truth["zabs"][v], st_tol, "lse")
    if row_stats:
        _close_rows(rows[1][v], truth["entropy"][v], truth["zabs"][v], st_tol, "entropy")
    else:  # not computed
        assert torch.all(rows[1] == 0)
    if with_dot:
        _close_rows(rows[2][v], truth["dotz"][v], truth["uzabs"][v], st_tol, "dotz")
    else:  # not computed
        assert torch.all(rows[2] == 0)
    clear = v & (truth["gap"] > 64 * st_tol * truth["zabs"])
    assert torch.equal(argmax[clear], truth["argmax"][clear])


@pytest.mark.parametrize("budget", [BUDGETS[0], BUDGETS[2]], ids=["one-tile", "tiny-tiles"], indirect=True)
@pytest.mark.parametrize("gemm_mode", GEMM_MODES, ids=GEMM_IDS, indirect=True)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("terms", list(TERMS))
def test_v2_per_token_forward_backward_match_float64(budget, gemm_mode, transform, terms):
    dtype, k = gemm_mode, TERMS[terms]
    with_bias, opts = TRANSFORMS[transform]
    h, w, t, b, valid, tab, dot = _v2_inputs(dtype, with_bias)
    be = resolve_backend("cpu", torch.device("cpu"))
    with_dot = k == 3
    row_stats = terms != "c"  # the entropy accumulator on and off
    logp, state, argmax, rows = be.forward(h, w, b, t, valid, opts, row_stats=row_stats,
                                           dot=dot if with_dot else None)
    assert rows.shape == (3, h.shape[0]) and rows.dtype == torch.float32
    coef = _coefs(tab, t, valid, k)
    truth = _truth_v2(h, w, b, t, valid, opts, coef, dot)
    _check_stats(logp, argmax, rows, truth, valid, dtype, row_stats, with_dot)
    dx, dw, db = be.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=dot if with_dot else None)
    _, g_tol = _tolerances(dtype)
    assert dx.dtype == dtype and dw.dtype == dtype
    _close_grad(dx, truth["dh"], g_tol, "dx")
    _close_grad(dw, truth["dw"], g_tol, "dw")
    if b is not None:
        _close_grad(db, truth["db"], g_tol, "db")


@pytest.mark.parametrize("budget", [BUDGETS[0], BUDGETS[2]], ids=["one-tile", "tiny-tiles"], indirect=True)
@pytest.mark.parametrize("gemm_mode", GEMM_MODES, ids=GEMM_IDS, indirect=True)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("terms", list(TERMS))
def test_v2_forward_with_grad_matches_float64(budget, gemm_mode, transform, terms):
    dtype, k = gemm_mode, TERMS[terms]
    with_bias, opts = TRANSFORMS[transform]
    h, w, t, b, valid, tab, dot = _v2_inputs(dtype, with_bias)
    be = resolve_backend("cpu", torch.device("cpu"))
    with_dot = k == 3
    row_stats = terms != "c"
    seen = []

    def coef_fn(lp, lse, dotz, tt, vv):
        # a loss in the three row statistics, its coefficients looked up by the chunk's targets
        assert (dotz is not None) == with_dot and tt.shape == lp.shape == lse.shape and vv.all()
        seen.append(lp.numel())
        cf = tab[:k, tt]
        total = (cf[0] * lp).sum()
        if k > 1:
            total = total + (cf[1] * lse).sum()
        if k > 2:
            total = total + (cf[2] * dotz).sum()
        return total, cf.ne(0).any(0), (cf[0] if k == 1 else cf).contiguous()

    out = be.forward_with_grad(h, w, b, t, valid, opts, coef_fn, (True, True, True), row_stats=row_stats,
                               dot=dot if with_dot else None)
    assert len(out) == 8
    total, logp, kept, argmax, dx, dw, db, rows = out
    assert sum(seen) == int(valid.sum())
    if budget < (1 << 20):
        assert len(seen) > 1  # forced several token chunks
    coef = _coefs(tab, t, valid, k)
    truth = _truth_v2(h, w, b, t, valid, opts, coef, dot)
    _check_stats(logp, argmax, rows, truth, valid, dtype, row_stats, with_dot)
    assert torch.equal(kept, (coef.reshape(k, -1) != 0).any(0))
    st_tol, g_tol = _tolerances(dtype)
    assert abs(total.item() - truth["total"].item()) <= st_tol * 4 * (
        (coef.reshape(k, -1).abs().double() * torch.stack([truth["zabs"], truth["zabs"], truth["uzabs"]][:k])).sum())
    _close_grad(dx, truth["dh"], g_tol, "dx")
    _close_grad(dw, truth["dw"], g_tol, "dw")
    if b is not None:
        _close_grad(db, truth["db"], g_tol, "db")


def test_v2_all_zero_coefficient_tokens_are_not_read():
    # the backward gathers tokens with all-zero coefficients away: their target and state are not read
    h, w, t, b, valid, tab, dot = _v2_inputs(torch.float32, True)
    be = resolve_backend("cpu", torch.device("cpu"))
    opts = LogitOptions(softcap=5.0)
    _, state, _, _ = be.forward(h, w, b, t, valid, opts, dot=dot)
    coef = _coefs(tab, t, valid, 3)
    zero = (coef == 0).all(0)
    assert 0 < zero.sum() < zero.numel()
    want = be.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=dot)
    t2, state2 = t.clone(), state.clone()
    t2[zero] = 10 ** 9
    state2[:, zero] = float("nan")
    got = be.backward(h, w, b, t2, state2, coef, opts, (True, True, True), dot=dot)
    for a, c in zip(got, want):
        assert torch.equal(a, c)


def test_v2_classic_coefficients_equal_two_row_form_with_zero_b():
    # coef [N] and coef [2, N] with b = 0 give the same gradients (the b term adds nothing)
    h, w, t, b, valid, tab, dot = _v2_inputs(torch.float32, True)
    be = resolve_backend("cpu", torch.device("cpu"))
    opts = LogitOptions(logit_scale=0.8)
    _, state, _, _ = be.forward(h, w, b, t, valid, opts)
    c = _coefs(tab, t, valid, 1)
    one = be.backward(h, w, b, t, state, c, opts, (True, True, True))
    two = be.backward(h, w, b, t, state, torch.stack([c, torch.zeros_like(c)]), opts, (True, True, True))
    for a, d in zip(one, two):
        torch.testing.assert_close(a, d, rtol=0, atol=1e-7)


@pytest.mark.parametrize("coef_shape,dot,match", [
    ((3, 45), None, "needs dot"),
    ((4, 45), "ok", r"coef must be \[N\], \[2, N\] or \[3, N\]"),
    ((2, 44), None, r"coef must be \[N\], \[2, N\] or \[3, N\]"),
    ((3, 45), "short", r"dot must be a contiguous fp32 CPU tensor \[V\]"),
])
def test_v2_bad_coefficients_and_dot_are_clear_errors(coef_shape, dot, match):
    h, w, t, b, valid, tab, good_dot = _v2_inputs(torch.float32, False)
    be = resolve_backend("cpu", torch.device("cpu"))
    _, state, _, _ = be.forward(h, w, b, t, valid, LogitOptions())
    d = {None: None, "ok": good_dot, "short": good_dot[:-1]}[dot]
    with pytest.raises(RuntimeError, match=match):
        be.backward(h, w, b, t, state, torch.zeros(coef_shape), LogitOptions(), (True, True, False), dot=d)


@pytest.mark.parametrize("path", ["per-token", "scalar"])
def test_v2_confident_token_target_gradient_accurate_with_lse_term(path):
    # 1 - p = 1e-7 at the target, coefficients c = -1, b = 3e-7: the target column's gradient is
    # c (1 - p) + b p ~ 2e-7, which 1 - p formed as 1 - exp(logp) in fp32 (or b - c folded into the
    # target) gets wrong by its whole size; the epilogue takes 1 - p = -expm1(logp)
    V, N = 5, 6
    w = torch.zeros(V, 1)
    w[1:, 0] = float(torch.log(torch.tensor(1e-7 / (V - 1), dtype=torch.float64)))
    h = torch.ones(N, 1)
    t = torch.zeros(N, dtype=torch.long)
    valid = torch.ones(N, dtype=torch.bool)
    coef = torch.stack([torch.full((N,), -1.0), torch.full((N,), 3e-7)])
    be = resolve_backend("cpu", torch.device("cpu"))
    opts = LogitOptions()
    if path == "per-token":
        _, state, _, _ = be.forward(h, w, None, t, valid, opts)
        _, dw, _ = be.backward(h, w, None, t, state, coef, opts, (True, True, False))
    else:
        out = be.forward_with_grad(h, w, None, t, valid, opts,
                                   lambda lp, lse, dz, tt, vv: ((-lp + 3e-7 * lse).sum(), vv, coef[:, :lp.numel()]),
                                   (True, True, False))
        dw = out[5]
    truth = _truth_v2(h, w, None, t, valid, opts, coef, torch.ones(V))
    assert 1.1e-6 < truth["dw"][0, 0].item() < 1.3e-6  # 6 tokens x 2e-7
    assert dw[0, 0].item() == pytest.approx(truth["dw"][0, 0].item(), rel=1e-4)
    torch.testing.assert_close(dw.double(), truth["dw"], rtol=1e-4, atol=0)
