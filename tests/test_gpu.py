"""The three Triton strategies compiled on a CUDA GPU (skipped without one): bf16 tensor-core paths at
realistic block sizes, fp32 with TF32 allowed, no host sync (the fused strategy always, the chunked
one in its sync-free mode), CUDA-side bad targets, memory, CUDA-graph capture.

Written without a GPU (none was available when these were written): correct by reading only.
The truth is the float64 one of test_triton_strategies.py, computed on CPU copies."""
import contextlib

import pytest
import torch

import fused_objectives as fo
from fused_objectives.backends import triton_chunked
from helpers import make_inputs, naive_same_dtype
from test_triton_strategies import truth

pytestmark = pytest.mark.gpu

STRATEGIES = ["triton", "triton_chunked", "triton_fused"]


def cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def run_cuda(backend, h, w, t, b=None, *, upstream=None, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    loss = fo.linear_objective_loss(hh, ww, t, bb, backend=backend, **kw)
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return {"loss": loss.detach(), "dh": hh.grad, "dw": ww.grad, "db": bb.grad if bb is not None else None}


def check_cuda(backend, h, w, t, b=None, *, k=2.0, upstream=None, **kw):
    """Inputs on CPU; fused and same-dtype eager on CUDA, float64 truth on CPU."""
    hc, wc, tc, bc = cuda(h, w, t, b)
    upc = upstream.cuda() if upstream is not None else None
    got = run_cuda(backend, hc, wc, tc, bc, upstream=upc, **kw)
    base = naive_same_dtype(hc, wc, tc, bc, upstream=upc, **kw)
    want = truth(h, w, t, b, upstream=upstream, **kw)
    for key, gt in want.items():
        if gt is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == (torch.float32 if key == "loss" else h.dtype), key
        err = (got[key].double().cpu() - gt).abs().max().item()
        err_b = (base[key].double().cpu() - gt).abs().max().item()
        bound = k * err_b + 4 * torch.finfo(h.dtype).eps * max(gt.abs().max().item(), 1e-30)
        assert err <= bound, f"[cuda {backend}] {key}: error {err:.3e} > {bound:.3e} (eager {err_b:.3e})"


@contextlib.contextmanager
def tf32_on():
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", STRATEGIES)
@pytest.mark.parametrize("dtype,spec", [(torch.bfloat16, "nll"), (torch.bfloat16, "neg_p"),
                                        (torch.bfloat16, "nll_top:0.2"), (torch.float16, "neg_p")],
                         ids=["bf16-nll", "bf16-neg_p", "bf16-nll_top", "fp16-neg_p"])
def test_half_precision_against_float64(backend, dtype, spec):
    # sizes that are not multiples of the 128-wide tiles, with a real H
    h, w, t, b = make_inputs(N=517, H=320, V=5003, dtype=dtype, bias=True, peaked=6.0)
    check_cuda(backend, h, w, t, b, objective=spec)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_fp32_with_tf32_on(backend):
    h, w, t, b = make_inputs(N=300, H=256, V=3001, bias=True, peaked=5.0)
    with tf32_on():
        # eager runs its fp32 matmul in TF32 too, so the same-dtype bound is TF32's
        check_cuda(backend, h, w, t, b, objective="neg_p")


@pytest.mark.parametrize("backend", STRATEGIES)
def test_fp32_ieee(backend):
    h, w, t, _ = make_inputs(N=200, H=192, V=2001, peaked=5.0)
    check_cuda(backend, h, w, t, objective="nll")


@pytest.mark.parametrize("backend", STRATEGIES)
@pytest.mark.parametrize("opts", [dict(softcap=30.0), dict(logit_scale=0.0625)], ids=["softcap", "scale"])
def test_options(backend, opts):
    h, w, t, b = make_inputs(N=513, H=256, V=4099, dtype=torch.bfloat16, bias=True, peaked=5.0)
    check_cuda(backend, h, w, t, b, objective="neg_p", **opts)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_per_token_upstream(backend):
    h, w, t, _ = make_inputs(N=300, H=128, V=3000, dtype=torch.bfloat16, peaked=4.0)
    check_cuda(backend, h, w, t, objective="nll_top:0.3", reduction="none", upstream=torch.randn(300))


def test_chunked_forced_chunks_and_fp32_dw(monkeypatch):
    from fused_objectives.kernels import configs

    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 64 * 4099 * 2)  # 64-row chunks
    h, w, t, b = make_inputs(N=700, H=256, V=4099, dtype=torch.bfloat16, bias=True, peaked=5.0)
    for mode in ("input", "fp32"):
        monkeypatch.setattr(triton_chunked, "DW_ACCUMULATE", mode)
        check_cuda("triton_chunked", h, w, t, b, objective="neg_p")


def _no_sync_call(backend, reduction):
    h, w, t, b = cuda(*make_inputs(N=256, H=128, V=2000, dtype=torch.bfloat16, bias=True))
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    up = torch.randn(256, device="cuda") if reduction == "none" else 1.0
    kw = dict(objective="nll_top:0.2", normalize="kept", reduction=reduction, backend=backend)
    (fo.linear_objective_loss(h, w, t, b, **kw) * up).sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (fo.linear_objective_loss(h, w, t, b, **kw) * up).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_fused(reduction):
    _no_sync_call("triton_fused", reduction)


@pytest.mark.parametrize("backend", ["triton", "triton_chunked"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_chunked_sync_free_mode(monkeypatch, backend, reduction):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", True)
    _no_sync_call(backend, reduction)


def test_chunked_default_mode_does_sync():
    # the compacting mode reads the number of valid rows once: the sync-free test above is not vacuous
    with pytest.raises(RuntimeError):
        _no_sync_call("triton_chunked", "mean")


def test_cuda_graph_capture_uses_sync_free_mode():
    h, w, t, _ = cuda(*make_inputs(N=128, H=64, V=1000, dtype=torch.bfloat16))
    want = fo.linear_objective_loss(h, w, t, backend="triton_chunked")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fo.linear_objective_loss(h, w, t, backend="triton_chunked")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fo.linear_objective_loss(h, w, t, backend="triton_chunked")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", STRATEGIES)
def test_out_of_range_target_gives_nan_on_cuda(backend):
    h, w, t, _ = cuda(*make_inputs(N=64, H=64, V=500, dtype=torch.bfloat16, ignore_frac=0.0))
    t[5] = 500
    t[6] = -7
    lp = fo.target_logprob(h, w, t, backend=backend)
    assert torch.isnan(lp[5]) and torch.isnan(lp[6]) and torch.isfinite(lp[:5]).all()
    assert torch.isnan(fo.linear_objective_loss(h, w, t, backend=backend))
    hh = h.clone().requires_grad_()
    assert torch.isnan(fo.linear_objective_loss(hh, w, t, backend=backend))


@pytest.mark.parametrize("backend", STRATEGIES)
def test_memory_far_below_logits(backend):
    from fused_objectives.kernels import configs

    N, H, V = 4096, 1024, 32000
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / H**0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    fo.linear_objective_loss(h, w, t, backend=backend).backward()  # compile
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fo.linear_objective_loss(h, w, t, backend=backend).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = h.numel() * 2 + w.numel() * 2
    logits_fp32 = N * V * 4
    if backend == "triton_fused":
        # fp32 dX and the fp32 dW slab, far below one logits copy
        assert extra - grads < logits_fp32 / 2, (extra, grads, logits_fp32)
    else:
        # the chunk buffer (the budget), X / dX chunks and [N] vectors; the autograd layer's
        # scaled copy of the stored gradients is gradient-sized
        assert extra - 2 * grads < configs.CHUNK_BUDGET_BYTES + 64 * 2**20, (extra, grads)


def test_tanh_helper_compiled():
    # the compiled tl.exp is an approximation (ex2.approx): the soft-cap tanh must still hold a few ulps
    from test_triton_strategies import tanh_probe_kernel

    mag = torch.logspace(-9, 1.3, 200, dtype=torch.float64)
    x = torch.cat([mag, -mag, torch.tensor([0.0, 0.2999, 0.3, 0.3001], dtype=torch.float64)]).float()
    xd = x.cuda()
    t, d = torch.empty_like(xd), torch.empty_like(xd)
    tanh_probe_kernel[(1,)](xd, t, d, x.numel(), BLOCK=512)
    x64 = x.double()
    nz = x != 0
    rel_t = ((t.cpu().double() - torch.tanh(x64)).abs()[nz] / torch.tanh(x64).abs()[nz]).max().item()
    # 1 - tanh^2 inherits exp's error, which grows with |x| (ex2.approx of x * log2(e)): checked
    # where the derivative is not negligible
    d_true = 1 / torch.cosh(x64) ** 2
    near = x64.abs() <= 4
    rel_d = ((d.cpu().double() - d_true).abs()[near] / d_true[near]).max().item()
    assert rel_t < 16 * 2.0 ** -24 and rel_d < 32 * 2.0 ** -24, (rel_t, rel_d)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_fp32_logits_mode(monkeypatch, reduction):
    # cuBLAS with out_dtype=float32 (or the fp32-weight fallback on torch without it)
    monkeypatch.setattr(triton_chunked, "LOGITS_FP32", True)
    h, w, t, b = make_inputs(N=400, H=256, V=4099, dtype=torch.bfloat16, bias=True, peaked=6.0)
    up = torch.randn(400) if reduction == "none" else None
    check_cuda("triton_chunked", h, w, t, b, objective="neg_p", reduction=reduction, upstream=up, k=1.0)


# ---------------------------------------------------------------- backend contract v2 on CUDA
# The z-loss / label-smoothing / class-weight terms at the backend level: forward rows (lse, entropy,
# dotz = sum_j u_j z_j) and the gradients of sum_i c_i logp_i + b_i lse_i + g_i dotz_i, compiled at
# the real tile sizes (bf16 tensor cores, the 64-row HAS_DOT forward, the HAS_B / HAS_DOT backward),
# against float64 on CPU copies; the gradients' bound is the same-dtype eager error (as check_cuda).

def _terms_truth(h, w, b, t, softcap, u, coef, dtype=None):
    """(logp, lse, entropy, dotz) and (dx, dw, db) of the coefficient loss: float64 when ``dtype`` is
    None, else eager in ``dtype`` (logits in that dtype, the rest in fp32) on the inputs' device."""
    cast = (lambda x: x.double()) if dtype is None else (lambda x: x.to(dtype))
    hd, wd, bd = (cast(x).detach().requires_grad_() if x is not None else None for x in (h, w, b))
    z = hd @ wd.T
    if bd is not None:
        z = z + bd
    z = z.double() if dtype is None else z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    logp = z.gather(1, t.clamp(min=0)[:, None])[:, 0] - lse
    entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    dotz = z @ u.to(z.dtype)
    c = coef.to(z.dtype)
    (c[0] * logp + c[1] * lse + (c[2] * dotz if c.shape[0] > 2 else 0)).sum().backward()
    grads = tuple(x.grad if x is not None else None for x in (hd, wd, bd))
    return (logp.detach(), lse.detach(), entropy.detach(), dotz.detach()), grads


# smoothing ([3, N]) switches on both terms; z-loss alone ([2, N]) is another specialisation, compiled
# for the fused strategy only (the GPU check's test step has a time limit; the chooser reuses the others)
@pytest.mark.parametrize("backend,terms", [("triton_fused", 2), ("triton_fused", 3), ("triton_chunked", 3),
                                           ("triton", 3)],
                         ids=["fused-z-loss", "fused-smoothing", "chunked-smoothing", "triton-smoothing"])
def test_coefficient_terms_against_float64(backend, terms):
    from fused_objectives.backends import _FUSED
    from fused_objectives.options import LogitOptions

    h, w, t, b = make_inputs(N=517, H=320, V=5003, dtype=torch.bfloat16, bias=True, peaked=6.0)
    N, V = t.shape[0], w.shape[0]
    valid = t != -100
    g = torch.Generator().manual_seed(1)
    u = torch.rand(V, generator=g) + 0.5  # class weights
    # z-loss-like b = 2 zl lse on valid tokens; smoothing-like c, b, g; all zero where ignored
    coef = torch.randn(terms, N, generator=g) * valid
    softcap = 30.0
    opts = LogitOptions(softcap=softcap)
    be = _FUSED[backend]
    hc, wc, tc, bc, vc = cuda(h, w, t, b, valid)
    dot = u.cuda() if terms == 3 else None
    logp, state, argmax, rows = be.forward(hc, wc, bc, tc, vc, opts, row_stats=True, dot=dot)
    rows64, grads64 = _terms_truth(h, w, b, t, softcap, u, coef)
    # eager with bf16 logits: the chunked strategies' logits buffer is bf16 too
    rows_eager, eager = _terms_truth(hc, wc, bc, tc, softcap, u.cuda(), coef.cuda(), dtype=torch.bfloat16)
    names = ("logp", "lse", "entropy", "dotz")[: 4 if terms == 3 else 3]
    for name, got, base, want in zip(names, (logp, rows[0], rows[1], rows[2]), rows_eager, rows64):
        err = (got.cpu().double()[valid] - want[valid]).abs().max().item()
        err_b = (base.cpu().double()[valid] - want[valid]).abs().max().item()
        bound = 2 * err_b + 1e-5 * max(1.0, want[valid].abs().max().item())
        assert err <= bound, f"[{backend}] {name}: error {err:.3e} > {bound:.3e} (eager {err_b:.3e})"
    dx, dw, db = be.backward(hc, wc, bc, tc, state, coef.cuda(), opts, (True, True, True), dot=dot)
    for name, got, base, want in zip(("dx", "dw", "db"), (dx, dw, db), eager, grads64):
        assert got.dtype == torch.bfloat16, name
        err = (got.double().cpu() - want).abs().max().item()
        err_b = (base.double().cpu() - want).abs().max().item()
        bound = 2 * err_b + 4 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()
        assert err <= bound, f"[{backend}] {name}: error {err:.3e} > {bound:.3e} (eager {err_b:.3e})"
    if backend == "triton_fused":
        # the same calls again, compiled now: no host sync (the activity test of [K, N] coefficients
        # stays on the device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, state, _, _ = be.forward(hc, wc, bc, tc, vc, opts, row_stats=True, dot=dot)
            be.backward(hc, wc, bc, tc, state, coef.cuda(), opts, (True, True, True), dot=dot)
        finally:
            torch.cuda.set_sync_debug_mode("default")
