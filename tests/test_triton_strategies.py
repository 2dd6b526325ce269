"""The CUDA strategies under the Triton interpreter: ``triton_chunked`` (gradients in the forward,
atomic-free slab backward, sync-free mode, budgeted chunks), ``triton_fused`` and the ``triton``
dispatcher, each against a float64 truth written here from the definitions (no package code)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import triton
import triton.language as tl

import fused_objectives as fo
from fused_objectives.backends import triton as triton_dispatch
from fused_objectives.backends import triton_chunked
from fused_objectives.kernels import configs
from fused_objectives.kernels.common import tanh_sech2
from helpers import make_inputs, naive_same_dtype
from truth import logits64

# CPU tensors under the interpreter; tests/test_gpu.py runs the strategies on CUDA
pytestmark = pytest.mark.skipif(not configs.interpreting(), reason="needs TRITON_INTERPRET=1")

# ---------------------------------------------------------------- float64 truth, from the definitions


def _f(spec, l):
    """Per-token loss f(l) and the gate on p = exp(l) (objectives.md); float64."""
    name, _, raw = spec.partition(":")
    par = float(raw) if raw else None
    p = l.exp()
    gate = torch.ones_like(l, dtype=torch.bool)
    if name.endswith("_top"):
        gate = p.detach() >= par
    elif name.endswith("_bottom"):
        gate = p.detach() <= par
    base = name.replace("_top", "").replace("_bottom", "")
    f = {"nll": lambda: -l, "neg_p": lambda: 1 - p, "power": lambda: (1 - p ** par) / par,
         "neg_power": lambda: -(p ** par) / par, "unlikelihood": lambda: torch.log(1 - p + 1e-3),
         "dft": lambda: -p.detach() * l}[base]()
    return f, gate


def truth(h, w, t, b=None, *, objective="nll", reduction="mean", normalize="valid", softcap=None,
          logit_scale=None, upstream=None):
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    bb = b.double().requires_grad_() if b is not None else None
    z = logits64(hh, ww, bb, softcap=softcap, logit_scale=logit_scale)
    valid = t != -100
    l = torch.log_softmax(z, -1).gather(-1, torch.where(valid, t, 0)[:, None])[:, 0]
    f, gate = _f(objective, l)
    kept = valid & gate
    per_tok = torch.where(kept, f, torch.zeros_like(f))
    if reduction == "none":
        loss = per_tok
        (per_tok * upstream.double()).sum().backward()
    else:
        denom = kept.sum() if normalize == "kept" else valid.sum()
        if reduction == "sum":
            loss = per_tok.sum()
        else:
            loss = per_tok.sum() / denom if denom > 0 else per_tok.sum() * 0
        loss.backward()
    return {"loss": loss.detach(), "dh": hh.grad, "dw": ww.grad, "db": bb.grad if bb is not None else None}


def fused(backend, h, w, t, b=None, *, upstream=None, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = b.clone().requires_grad_() if b is not None else None
    loss = fo.linear_objective_loss(hh, ww, t, bb, backend=backend, **kw)
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()
    return {"loss": loss.detach(), "dh": hh.grad, "dw": ww.grad, "db": bb.grad if bb is not None else None}


def check(backend, h, w, t, b=None, k=2.0, **kw):
    """fused error <= k * same-dtype eager error + 4 eps * scale, per output, against float64."""
    got = fused(backend, h, w, t, b, **kw)
    want = truth(h, w, t, b, **kw)
    base = naive_same_dtype(h, w, t, b, **kw)
    for key, gt in want.items():
        if gt is None:
            assert got[key] is None, key
            continue
        assert got[key].dtype == (torch.float32 if key == "loss" else h.dtype), key
        err = (got[key].double() - gt).abs().max().item()
        err_b = (base[key].double() - gt).abs().max().item()
        bound = k * err_b + 4 * torch.finfo(h.dtype).eps * max(gt.abs().max().item(), 1e-30)
        assert err <= bound, f"[{backend}] {key}: error {err:.3e} > {bound:.3e} (eager {err_b:.3e})"
    return got


# ---------------------------------------------------------------- gradients in the forward

SPECS = ["nll", "neg_p", "power:10", "neg_power:2", "nll_top:0.2", "nll_bottom:0.5", "neg_p_top:0.3",
         "neg_p_bottom:0.7", "unlikelihood_top:0.4", "unlikelihood_bottom:0.6", "dft"]


@pytest.fixture
def forward_with_grad_only(monkeypatch):
    """Fail if a scalar loss leaves the gradients-in-the-forward path (forward/backward primitives)."""
    def refuse(*a, **k):
        raise AssertionError("a scalar loss used the per-token primitives")
    for cls in (triton_chunked.TritonChunkedBackend,):
        monkeypatch.setattr(cls, "forward", refuse)
        monkeypatch.setattr(cls, "backward", refuse)
    monkeypatch.setattr(triton_dispatch.TritonBackend, "forward", refuse)
    monkeypatch.setattr(triton_dispatch.TritonBackend, "backward", refuse)


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_in_forward_every_objective_with_every_option(forward_with_grad_only, spec):
    # bias, scale and a soft-cap that bites (|z| up to ~3x the cap), gated objectives keeping some tokens
    h, w, t, b = make_inputs(N=41, H=24, V=130, bias=True, peaked=6.0)
    got = check("triton_chunked", h, w, t, b, objective=spec, softcap=8.0, logit_scale=1.5)
    assert got["dh"].abs().sum() > 0
    if spec in ("nll_top:0.2", "neg_p_top:0.3"):
        # the soft-capped probabilities straddle the threshold: some valid tokens kept, some not
        z = 8.0 * torch.tanh((h.double() @ w.double().T + b.double()) * 1.5 / 8.0)
        p = torch.softmax(z, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
        valid = t != -100
        n_kept = (valid & (p >= float(spec.split(":")[1]))).sum()
        assert 0 < n_kept < valid.sum()


# backend='triton' sends fp16 scalar losses to the per-token path (tested on its own below)
@pytest.mark.parametrize("backend,dtype", [
    ("triton", torch.float32), ("triton", torch.bfloat16),
    ("triton_chunked", torch.float32), ("triton_chunked", torch.float16), ("triton_chunked", torch.bfloat16),
], ids=["triton-fp32", "triton-bf16", "triton_chunked-fp32", "triton_chunked-fp16", "triton_chunked-bf16"])
@pytest.mark.parametrize("normalize", ["valid", "kept"])
def test_gradients_in_forward_dtypes(forward_with_grad_only, backend, dtype, normalize):
    h, w, t, b = make_inputs(N=50, H=32, V=97, bias=True, peaked=5.0, dtype=dtype)
    check(backend, h, w, t, b, objective="nll_top:0.3", normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dw_mode", ["input", "fp32"])
def test_chunk_merges_forced(monkeypatch, dtype, dw_mode):
    # 6-row chunks: the 59 valid-or-not tokens take many chunks; dW and db add up across them
    h, w, t, b = make_inputs(N=59, H=16, V=150, bias=True, peaked=5.0, dtype=dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 6 * 150 * elt)
    monkeypatch.setattr(triton_chunked, "DW_ACCUMULATE", dw_mode)
    assert triton_chunked.chunk_rows(150, dtype) == 6
    check("triton_chunked", h, w, t, b, objective="neg_p", softcap=3.0)
    check("triton_chunked", h, w, t, b, objective="power:3", reduction="none", upstream=torch.randn(59))


def test_fp32_dw_buffer_is_no_less_accurate(monkeypatch):
    # many chunks of a half-precision weight: the fp32 buffer rounds once, in-place bf16 once per chunk
    h, w, t, _ = make_inputs(N=128, H=16, V=64, peaked=3.0, dtype=torch.bfloat16, ignore_frac=0.0)
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 4 * 64 * 2)
    want = truth(h, w, t)["dw"]
    errs = {}
    for mode in ("input", "fp32"):
        monkeypatch.setattr(triton_chunked, "DW_ACCUMULATE", mode)
        errs[mode] = (fused("triton_chunked", h, w, t)["dw"].double() - want).norm().item()
    assert errs["fp32"] < 0.9 * errs["input"], errs


def test_bad_dw_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_chunked, "DW_ACCUMULATE", "fp64")
    h, w, t, _ = make_inputs(dtype=torch.float16)
    with pytest.raises(ValueError, match="DW_ACCUMULATE"):
        fused("triton_chunked", h, w, t)


@pytest.mark.parametrize("knob", ["SYNC_FREE", "LOGITS_FP32"])
def test_bad_switches_are_clear_errors(monkeypatch, knob):
    # "false" / "off" must not silently switch a costly mode on
    env = f"FUSED_OBJECTIVES_{knob}"
    h, w, t, _ = make_inputs(dtype=torch.bfloat16)  # fp16 scalar losses run in fp32: no logits dtype to choose
    monkeypatch.setenv(env, "false")
    with pytest.raises(ValueError, match=env):
        fused("triton_chunked", h, w, t)
    monkeypatch.delenv(env)
    monkeypatch.setattr(triton_chunked, knob, "0")
    with pytest.raises(TypeError, match=f"triton_chunked.{knob}"):
        fused("triton_chunked", h, w, t)


# ---------------------------------------------------------------- per-token path: slabs, no atomics


def test_per_token_slabs_and_row_chunks(monkeypatch):
    # 3 vocabulary slabs of 128 columns (the last partial) and row chunks inside each slab
    monkeypatch.setattr(triton_chunked, "MIN_SLAB_COLS", 128)
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 10 * 128 * 4)
    h, w, t, b = make_inputs(N=45, H=16, V=300, bias=True, peaked=5.0)
    check("triton_chunked", h, w, t, b, objective="nll_top:0.2", reduction="none", upstream=torch.randn(45),
          softcap=5.0, logit_scale=0.8)


def _count_atomics(monkeypatch):
    import triton.runtime.interpreter as interp

    calls = []
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        original = getattr(interp.InterpreterBuilder, name)

        def counting(self, *args, _orig=original, **kwargs):
            calls.append(1)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(interp.InterpreterBuilder, name, counting)
    return calls


@pytest.mark.skipif(not configs.interpreting(), reason="counts the interpreter's atomics")
def test_chunked_strategy_uses_no_atomics(monkeypatch):
    calls = _count_atomics(monkeypatch)
    h, w, t, b = make_inputs(N=40, H=16, V=70, bias=True, peaked=3.0)
    fused("triton_chunked", h, w, t, b, objective="neg_p")                                   # gradients in forward
    fused("triton_chunked", h, w, t, b, objective="neg_p", reduction="none", upstream=torch.randn(40))  # slabs
    assert len(calls) == 0
    fused("triton_fused", h, w, t, b, objective="neg_p")  # the detector works: the fused backward adds atomically
    assert len(calls) > 0


# ---------------------------------------------------------------- sync-free mode


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# ops that read a device value on the host (a sync on CUDA)
SYNCING = {"nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "is_nonzero"}


def _record_backend_ops(monkeypatch):
    """ATen ops run inside the chunked backend's own methods (the CPU-only input checks of the
    functional layer read values on the host; on CUDA they do not run)."""
    ops = []
    cls = triton_chunked.TritonChunkedBackend
    for name in ("_forward", "_backward", "_forward_with_grad"):
        original = getattr(cls, name)

        def recorded(self, *a, _orig=original, **k):
            with AtenOps() as mode:
                out = _orig(self, *a, **k)
            ops.extend(mode.ops)
            return out

        monkeypatch.setattr(cls, name, recorded)
    return ops


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sync_free_mode_has_no_host_reads_and_same_numbers(monkeypatch, reduction):
    h, w, t, b = make_inputs(N=30, H=16, V=90, bias=True, peaked=4.0, ignore_frac=0.4)
    h[t == -100] = float("nan")  # ignored rows go through the GEMMs in this mode: must stay out
    up = torch.randn(30) if reduction == "none" else None
    kw = dict(objective="nll_top:0.2", reduction=reduction, upstream=up)
    ops = _record_backend_ops(monkeypatch)
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", False)
    compact = fused("triton_chunked", h, w, t, b, **kw)
    compact_ops = list(ops)
    ops.clear()
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", True)
    free = fused("triton_chunked", h, w, t, b, **kw)
    free_ops = list(ops)
    # the compacting mode reads the number of rows once per pass; the sync-free mode never
    assert compact_ops.count("nonzero") == (1 if reduction == "mean" else 2)
    assert not SYNCING & set(compact_ops) - {"nonzero"}
    assert not SYNCING & set(free_ops), SYNCING & set(free_ops)
    for key in compact:
        if compact[key] is not None:
            assert torch.isfinite(free[key]).all(), key
            torch.testing.assert_close(free[key], compact[key], rtol=1e-5, atol=1e-7)
    clean = torch.where((t != -100)[:, None], h, torch.zeros(()))
    want = truth(clean, w, t, b, objective="nll_top:0.2", reduction=reduction, upstream=up)
    for key in want:
        torch.testing.assert_close(free[key].double(), want[key], rtol=1e-4, atol=1e-6)


def test_sync_free_switch(monkeypatch):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", None)
    monkeypatch.delenv("FUSED_OBJECTIVES_SYNC_FREE", raising=False)
    assert not triton_chunked.sync_free(torch.device("cpu"))
    monkeypatch.setenv("FUSED_OBJECTIVES_SYNC_FREE", "1")
    assert triton_chunked.sync_free(torch.device("cpu"))
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", False)
    assert not triton_chunked.sync_free(torch.device("cpu"))


def test_all_ignored_sync_free(monkeypatch):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", True)
    h, w, t, b = make_inputs(N=9, H=8, V=40, bias=True)
    t = torch.full_like(t, -100)
    out = fused("triton_chunked", h, w, t, b)
    assert out["loss"].item() == 0 and all(torch.all(out[k] == 0) for k in ("dh", "dw", "db"))


# ---------------------------------------------------------------- accurate soft-cap tanh


@pytest.mark.parametrize("backend", ["triton_chunked", "triton_fused"])
def test_softcap_huge_is_the_identity(backend):
    # softcap=1e8: tanh(z / 1e8) * 1e8 == z to fp32 rounding; (1-e)/(1+e) lost 6% of the loss here
    h, w, t, b = make_inputs(N=20, H=16, V=60, bias=True, peaked=4.0)
    got = fused(backend, h, w, t, b, objective="neg_p", softcap=1e8)
    want = truth(h, w, t, b, objective="neg_p")
    for key in want:
        err = (got[key].double() - want[key]).abs().max().item()
        assert err <= 1e-5 * want[key].abs().max().item(), (key, err)


@pytest.mark.parametrize("backend", ["triton_chunked", "triton_fused"])
def test_softcap_30_against_float64(backend):
    h, w, t, b = make_inputs(N=24, H=16, V=80, bias=True, peaked=8.0)
    h = h * 4  # logits of tens: the soft-cap's whole range
    check(backend, h, w, t, b, objective="nll", softcap=30.0)


@triton.jit
def tanh_probe_kernel(x_ptr, t_ptr, d_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    t, d = tanh_sech2(tl.load(x_ptr + offs, mask=mask, other=0.0))
    tl.store(t_ptr + offs, t, mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)


def test_tanh_kernel_helper_is_accurate():
    mag = torch.logspace(-9, 1.3, 200, dtype=torch.float64)
    x = torch.cat([mag, -mag, torch.tensor([0.0, 0.2999, 0.3, 0.3001])]).float()
    xd = x
    t, d = torch.empty_like(xd), torch.empty_like(xd)
    tanh_probe_kernel[(1,)](xd, t, d, x.numel(), BLOCK=512)
    x64 = x.double()
    t_true, d_true = torch.tanh(x64), 1 / torch.cosh(x64) ** 2
    rel = lambda a, b: ((a.cpu().double() - b).abs() / b.abs().clamp_min(1e-300)).max().item()
    assert rel(t[x != 0], t_true[x != 0]) < 4 * 2.0 ** -24
    assert t[x == 0].abs().max() == 0
    assert rel(d, d_true) < 8 * 2.0 ** -24


# ---------------------------------------------------------------- the dispatcher


def test_dispatch_rule(monkeypatch):
    backend = triton_dispatch.TritonBackend()
    pick = lambda n, H, V: backend.per_token_strategy(torch.empty(n, H, dtype=torch.bfloat16),
                                                      torch.empty(V, H, dtype=torch.bfloat16)).name
    assert pick(64, 4096, 1000) == "triton_chunked"
    assert pick(64, 16, 1000) == "triton_fused"
    # per-token calls of "triton" go where the rule says; scalar losses always to the chunked path
    seen = []
    for cls in (triton_chunked.TritonChunkedBackend, triton_dispatch.TritonFusedBackend):
        original = cls.backward

        def spy(self, *a, _orig=original, **k):
            seen.append(self.name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "backward", spy)
    h, w, t, _ = make_inputs(N=12, H=16, V=50)
    check("triton", h, w, t, objective="neg_p", reduction="none", upstream=torch.randn(12))
    h, w, t, _ = make_inputs(N=12, H=320, V=50)
    check("triton", h, w, t, objective="neg_p", reduction="none", upstream=torch.randn(12))
    assert seen == ["triton_fused", "triton_chunked"]


def test_roofline_prediction_at_llama3_head():
    # the docstring's figures: chunked ~4 GEMMs at cuBLAS rate, fused several times slower
    chunked = triton_dispatch.predict_seconds("triton_chunked", 8192, 4096, 128256, 2)
    fused_s = triton_dispatch.predict_seconds("triton_fused", 8192, 4096, 128256, 2)
    gemm4 = 8 * 8192 * 4096 * 128256 / (0.75 * 989e12)
    assert gemm4 < chunked < 1.1 * gemm4 < 3 * chunked < fused_s
    assert math.isfinite(fused_s)


@pytest.mark.parametrize("backend", ["triton_chunked", "triton_fused"])
def test_narrow_vocabulary_with_argmax_in_column_zero(backend):
    # V below one row-kernel block: lanes that never see a column must not count in the sum
    h, w, t, _ = make_inputs(N=6, H=8, V=20, ignore_frac=0.0)
    w[0] = 4 * h.mean(0) / h.mean(0).norm()
    t[:3] = 0
    lp = fo.target_logprob(h, w, t, backend=backend)
    want = torch.log_softmax(h.double() @ w.double().T, -1).gather(1, t[:, None])[:, 0]
    assert (torch.log_softmax(h.double() @ w.double().T, -1).argmax(1) == 0).any()
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_logits_mode(monkeypatch, dtype):
    # half inputs, logits kept in fp32 (the gradient goes to a second, input-dtype buffer): closer
    # to float64 than eager's half logits, on the scalar and the per-token (slab) paths
    monkeypatch.setattr(triton_chunked, "LOGITS_FP32", True)
    monkeypatch.setattr(triton_chunked, "MIN_SLAB_COLS", 64)
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 7 * 150 * 6)
    assert triton_chunked.chunk_rows(150, dtype) == 7
    h, w, t, b = make_inputs(N=40, H=16, V=150, bias=True, peaked=6.0, dtype=dtype)
    check("triton_chunked", h, w, t, b, objective="neg_p", softcap=9.0)
    check("triton_chunked", h, w, t, b, objective="nll", reduction="none", upstream=torch.randn(40))
    # the logits are fp32 indeed: the loss matches fp32 logits of the same half inputs closely
    z = h.float() @ w.float().T + b.float()
    z = 9.0 * torch.tanh(z / 9.0)
    valid = t != -100
    lp = torch.log_softmax(z, -1).gather(1, t.clamp(min=0)[:, None])[:, 0]
    want = ((1 - lp.exp()) * valid).sum() / valid.sum()
    got = fo.linear_objective_loss(h, w, t, b, objective="neg_p", softcap=9.0, backend="triton_chunked")
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)


def test_triton_routes_fp16_scalar_losses_to_the_per_token_path(monkeypatch):
    """backend='triton' must not take the fp32-GEMM gradients-in-forward path for fp16 (the
    per-token backward sees the loss scale before forming dz); bf16/fp32 keep it."""
    from fused_objectives.backends import resolve_backend

    calls = []
    impl = resolve_backend("triton", torch.device("cpu"))
    real = impl.chunked.forward_with_grad
    monkeypatch.setattr(impl.chunked, "forward_with_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    for dtype, expect in ((torch.float16, 0), (torch.float32, 1)):
        calls.clear()
        h = torch.randn(6, 16, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(40, 16, generator=g) / 4).to(dtype).requires_grad_()
        t = torch.randint(0, 40, (6,), generator=g)
        loss = fo.linear_objective_loss(h, w, t, objective="neg_p", backend="triton")
        (loss * 1024.0).backward()
        assert len(calls) == expect, dtype
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        p = torch.log_softmax(h64 @ w64.T, -1).gather(1, t[:, None]).exp()
        ((1 - p).mean() * 1024.0).backward()
        tol = 2e-2 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=tol, atol=tol * h64.grad.abs().max().item())
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol * w64.grad.abs().max().item())


# ---------------------------------------------------------------- backend contract v2, called directly
# (coef [N] | [2, N] | [3, N] = (c, b, g) on (logp, lse, dotz); fused_objectives/backends/__init__.py)

from fused_objectives.backends import _FUSED  # noqa: E402
from fused_objectives.kernels import rows as row_kernels  # noqa: E402
from fused_objectives.options import LogitOptions  # noqa: E402

V2_OPTS = dict(softcap=6.0, logit_scale=1.3)


def _rows_truth(h, w, b, t, valid, dot, *, acc, coef=None, softcap=None, logit_scale=None):
    """logp, lse, entropy, dotz, argmax of the final logits and the gradients of
    ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i``.  ``acc=torch.float64``: the truth, every input
    in float64; ``acc=torch.float32``: what eager PyTorch does in the input dtype (logits ``h @ W^T``
    in the input dtype, then fp32), the same-dtype baseline."""
    cast = (lambda x: x.double()) if acc == torch.float64 else (lambda x: x)
    hh = cast(h.detach()).clone().requires_grad_()
    ww = cast(w.detach()).clone().requires_grad_()
    bb = cast(b.detach()).clone().requires_grad_() if b is not None else None
    z = hh @ ww.T
    if bb is not None:
        z = z + bb
    z = z.to(acc)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    ls = torch.log_softmax(z, -1)
    logp = ls.gather(1, safe_t[:, None])[:, 0]
    lse = torch.logsumexp(z, -1)
    dotz = z @ dot.to(acc) if dot is not None else None
    out = dict(logp=logp.detach(), lse=lse.detach(), ent=-(ls.exp() * ls).sum(-1).detach(),
               dotz=None if dotz is None else dotz.detach(), argmax=z.detach().argmax(-1))
    if coef is not None:
        coef = coef.reshape(-1, coef.shape[-1]).to(acc)
        total = (coef[0] * torch.where(valid, logp, torch.zeros_like(logp))).sum()
        if coef.shape[0] > 1:
            total = total + (coef[1] * lse).sum()
        if coef.shape[0] > 2:
            total = total + (coef[2] * dotz).sum()
        total.backward()
        out.update(dh=hh.grad, dw=ww.grad, db=None if bb is None else bb.grad)
    return out


def _close(name, got, want, base, dtype, k=2.0):
    """got's error against float64 <= k * the same-dtype baseline's + 4 eps * scale."""
    err = (got.double() - want).abs().max().item()
    err_b = (base.double() - want).abs().max().item()
    bound = k * err_b + 4 * torch.finfo(dtype).eps * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (eager {err_b:.3e})"


def _v2_inputs(dtype, N=37, V=150, H=16, seed=3):
    """Inputs with ignored tokens, a bias, a [V] fp32 dot vector (class-weight-like, positive)."""
    h, w, t, b = make_inputs(N=N, H=H, V=V, bias=True, peaked=5.0, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    dot = (0.5 + torch.rand(V, generator=g)).float()
    return h, w, t, b, dot


def _v2_coef(t, k, seed=0):
    """[N] / [2, N] / [3, N] coefficients: zero on ignored tokens; a few valid tokens with all-zero
    coefficients (skipped), with c = 0 but b or g non-zero (must NOT be skipped), and one token with
    c and b only."""
    g = torch.Generator().manual_seed(seed)
    N = t.shape[0]
    coef = torch.randn(k, N, generator=g)
    valid = t != -100
    coef[:, ~valid] = 0
    vi = valid.nonzero()[:, 0]
    coef[:, vi[0]] = 0              # valid, all-zero: skipped
    if k > 1:
        coef[0, vi[1]] = 0          # c = 0, b != 0 (and g): active
    if k > 2:
        coef[:2, vi[2]] = 0         # only g: active
        coef[2, vi[3]] = 0
    return coef[0].contiguous() if k == 1 else coef


@pytest.fixture
def small_chunks(monkeypatch):
    """Several token chunks in the forwards, several vocabulary slabs and row chunks in the backward."""
    monkeypatch.setattr(triton_chunked, "MIN_SLAB_COLS", 64)
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 4000)  # fp32, V = 150: 6-row chunks, 64-column slabs


# backend='triton' only delegates: test_v2_triton_chooser_hands_dot_and_coefficients_on covers its
# per-token routes and test_v2_triton_forward_with_grad its scalar path (the interpreter is slow)
DTYPES_V2 = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES_V2, ids=["fp32", "bf16"])
@pytest.mark.parametrize("sync", [False, True], ids=["compact", "sync_free"])
def test_v2_forward_rows(monkeypatch, small_chunks, dtype, sync):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", sync)
    h, w, t, b, dot = _v2_inputs(dtype)
    valid = t != -100
    impl = _FUSED["triton_chunked"]
    opts = LogitOptions(**V2_OPTS)
    logp, state, argmax, rows = impl.forward(h, w, b, t, valid, opts, row_stats=True, dot=dot)
    assert rows.shape == (3, t.shape[0]) and rows.dtype == torch.float32
    want = _rows_truth(h, w, b, t, valid, dot, acc=torch.float64, **V2_OPTS)
    base = _rows_truth(h, w, b, t, valid, dot, acc=torch.float32, **V2_OPTS)
    for name, got in (("logp", logp), ("lse", rows[0]), ("ent", rows[1]), ("dotz", rows[2])):
        _close(name, got[valid], want[name][valid], base[name][valid], dtype)
    # ties aside (none here), the argmax of the same-dtype logits
    assert torch.equal(argmax[valid], base["argmax"][valid])


def test_v2_forward_computes_only_what_is_asked(monkeypatch):
    # entropy and dotz are compile-time branches: the default call asks the kernel for neither
    seen = []
    real = row_kernels.row_stats
    monkeypatch.setattr(row_kernels, "row_stats",
                        lambda *a, **k: seen.append((k.get("entropy"), k.get("dot") is not None)) or real(*a, **k))
    h, w, t, b, dot = _v2_inputs(torch.float32, N=9, V=70)
    valid = t != -100
    impl = _FUSED["triton_chunked"]
    out = impl.forward(h, w, b, t, valid, LogitOptions())
    assert len(out) == 4 and seen == [(False, False)]
    want = _rows_truth(h, w, b, t, valid, None, acc=torch.float64)
    torch.testing.assert_close(out[3][0][valid].double(), want["lse"][valid], rtol=1e-5, atol=1e-5)
    seen.clear()
    impl.forward(h, w, b, t, valid, LogitOptions(), dot=dot)
    assert seen == [(False, True)]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES_V2, ids=["fp32", "bf16"])
@pytest.mark.parametrize("sync", [False, True], ids=["compact", "sync_free"])
def test_v2_backward_coefficients(monkeypatch, small_chunks, dtype, k, sync):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", sync)
    h, w, t, b, dot = _v2_inputs(dtype)
    valid = t != -100
    coef = _v2_coef(t, k)
    skipped = (coef.reshape(k, -1) == 0).all(0)
    # tokens with all-zero coefficients are never read: NaN hidden states there stay out
    h = h.clone()
    h[skipped] = float("nan")
    clean = torch.where(skipped[:, None], torch.zeros((), dtype=dtype), h)
    impl = _FUSED["triton_chunked"]
    opts = LogitOptions(**V2_OPTS)
    _, state, _, _ = impl.forward(h, w, b, t, valid & ~skipped, opts)
    dx, dw, db = impl.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=dot if k == 3 else None)
    want = _rows_truth(clean, w, b, t, valid, dot, acc=torch.float64, coef=coef, **V2_OPTS)
    base = _rows_truth(clean, w, b, t, valid, dot, acc=torch.float32, coef=coef, **V2_OPTS)
    for name, got in (("dh", dx), ("dw", dw), ("db", db)):
        assert got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        _close(name, got, want[name], base[name], dtype)
    assert (dx[skipped] == 0).all()
    # the backward needs what it is asked for only
    dx2, dw2, db2 = impl.backward(h, w, b, t, state, coef, opts, (False, True, False), dot=dot if k == 3 else None)
    assert dx2 is None and db2 is None and torch.equal(dw2, dw)


def test_v2_backward_classic_call_is_todays_kernel():
    # b = 0 (and g = 0 with a dot vector) adds exact zeros: the same bits as the [N] call
    h, w, t, b, dot = _v2_inputs(torch.float32, N=20, V=90)
    valid = t != -100
    opts = LogitOptions(**V2_OPTS)
    impl = _FUSED["triton_chunked"]
    _, state, _, _ = impl.forward(h, w, b, t, valid, opts)
    c = _v2_coef(t, 1)
    one = impl.backward(h, w, b, t, state, c, opts, (True, True, True))
    two = impl.backward(h, w, b, t, state, torch.stack([c, torch.zeros_like(c)]), opts, (True, True, True))
    three = impl.backward(h, w, b, t, state, torch.stack([c, torch.zeros_like(c), torch.zeros_like(c)]), opts,
                          (True, True, True), dot=dot)
    for a, x, y in zip(one, two, three):
        assert torch.equal(a, x) and torch.equal(a, y)


@pytest.mark.parametrize("sync", [False, True], ids=["compact", "sync_free"])
def test_v2_backward_single_token(monkeypatch, sync):
    # N = 1: a [3, 1] coefficient block (whose stride along N is arbitrary) with all three terms
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", sync)
    h, w, t, b, dot = _v2_inputs(torch.float32, N=1, V=70)
    t = t.clamp(min=0)
    valid = torch.ones(1, dtype=torch.bool)
    coef = torch.tensor([[0.7], [-0.4], [0.3]]).T.contiguous().T  # strides (1, 3)
    opts = LogitOptions(**V2_OPTS)
    impl = _FUSED["triton_chunked"]
    _, state, _, _ = impl.forward(h, w, b, t, valid, opts)
    got = impl.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=dot)
    want = _rows_truth(h, w, b, t, valid, dot, acc=torch.float64, coef=coef, **V2_OPTS)
    for name, g in zip(("dh", "dw", "db"), got):
        torch.testing.assert_close(g.double(), want[name], rtol=1e-5, atol=1e-6)


def test_v2_confident_tokens_keep_their_digits():
    # p(target) ~ 1 - 1e-6: c (1 - p) + b p at the target takes 1 - p from the forward's logp;
    # 1 - p recomputed in fp32 from p would be ~5% off here
    g = torch.Generator().manual_seed(0)
    V = H = 64
    N = 4
    # z_j ~ 0 except z_t ~ 18: 1 - p ~ 63 e^-18 ~ 1e-6
    w = torch.eye(V) + 0.01 * torch.randn(V, H, generator=g)
    t = torch.arange(N) * 3
    h = 18.0 * torch.eye(V)[t] + 0.3 * torch.randn(N, H, generator=g)
    valid = torch.ones(N, dtype=torch.bool)
    impl = _FUSED["triton_chunked"]
    opts = LogitOptions()
    _, state, _, _ = impl.forward(h, w, None, t, valid, opts)
    want = _rows_truth(h, w, None, t, valid, None, acc=torch.float64)
    omp = -torch.expm1(want["logp"])
    assert (omp < 1e-5).all() and (omp > 1e-8).all(), omp
    # b comparable to c (1 - p): the target column's gradient is c (1 - p) + b p ~ 2 (1 - p)
    coef = torch.stack([torch.ones(N), omp.float()])
    dx, _, _ = impl.backward(h, w, None, t, state, coef, opts, (True, False, False))
    want = _rows_truth(h, w, None, t, valid, None, acc=torch.float64, coef=coef)
    rel = ((dx.double() - want["dh"]).norm(dim=1) / want["dh"].norm(dim=1)).max().item()
    assert rel < 1e-3, rel


def _coef_fn_v2(kind, class_weight=None):
    """A loss of (logp, lse, dotz, target) like the lead's terms: nll weighted by class_weight[y],
    plus z-loss (kind 'z': [2, r]) or label smoothing (kind 'ls': [3, r]), on valid tokens."""
    def fn(logp, lse, dotz, target, valid):
        lp = logp.detach().double().requires_grad_()
        ls = lse.detach().double().requires_grad_()
        leaves = [lp, ls]
        wy = class_weight[target].double() if class_weight is not None else torch.ones_like(lp)
        per = -wy * lp + 0.1 * ls ** 2
        if kind == "ls":
            dz = dotz.detach().double().requires_grad_()
            leaves.append(dz)
            W = class_weight.double().sum() if class_weight is not None else float(class_weight_len[0])
            per = per + 0.2 / class_weight_len[0] * (W * ls - dz)
        per = torch.where(valid, per, torch.zeros_like(per))
        total = per.sum()
        grads = torch.autograd.grad(total, leaves)
        return total.float(), valid.clone(), torch.stack([gr.float() for gr in grads])
    return fn


class_weight_len = [0]


def _loss_truth(h, w, b, t, cw, kind, *, acc, softcap=None, logit_scale=None):
    """The same loss summed over the batch on materialised logits (see _rows_truth for ``acc``)."""
    cast = (lambda x: x.double()) if acc == torch.float64 else (lambda x: x)
    hh = cast(h.detach()).clone().requires_grad_()
    ww = cast(w.detach()).clone().requires_grad_()
    bb = cast(b.detach()).clone().requires_grad_()
    z = (hh @ ww.T + bb).to(acc)
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != -100
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    logp = torch.log_softmax(z, -1).gather(1, safe_t[:, None])[:, 0]
    lse = torch.logsumexp(z, -1)
    per = -cw.to(acc)[safe_t] * logp + 0.1 * lse ** 2
    if kind == "ls":
        per = per + 0.2 / z.shape[1] * (cw.to(acc).sum() * lse - z @ cw.to(acc))
    total = torch.where(valid, per, torch.zeros_like(per)).sum()
    total.backward()
    return dict(total=total.detach(), logp=logp.detach(), lse=lse.detach(), dh=hh.grad, dw=ww.grad, db=bb.grad)


@pytest.mark.parametrize("kind", ["z", "ls"])
@pytest.mark.parametrize("dtype", DTYPES_V2, ids=["fp32", "bf16"])
@pytest.mark.parametrize("sync", [False, True], ids=["compact", "sync_free"])
def test_v2_forward_with_grad(monkeypatch, small_chunks, dtype, kind, sync):
    _check_forward_with_grad(monkeypatch, "triton_chunked", dtype, kind, sync)


def test_v2_triton_forward_with_grad(monkeypatch, small_chunks):
    # backend='triton' takes the chunked strategy's gradients-in-the-forward path for scalar losses
    _check_forward_with_grad(monkeypatch, "triton", torch.bfloat16, "ls", False)


def _check_forward_with_grad(monkeypatch, backend, dtype, kind, sync):
    monkeypatch.setattr(triton_chunked, "SYNC_FREE", sync)
    h, w, t, b, cw = _v2_inputs(dtype, H=16)
    class_weight_len[0] = w.shape[0]
    valid = t != -100
    h = h.clone()
    h[~valid] = float("nan")  # ignored rows never reach the result
    clean = torch.where(valid[:, None], h, torch.zeros((), dtype=dtype))
    dot = cw if kind == "ls" else None
    calls = []
    fn = _coef_fn_v2(kind, cw)

    def coef_fn(logp, lse, dotz, target, v):
        calls.append((logp.shape[0], dotz is None))
        assert ((target >= 0) & (target < w.shape[0])).all()  # ignored rows' targets are safe to index
        # and their statistics zeros (sync-free mode hands them over; the hidden state there is NaN)
        assert all((x[~v] == 0).all() for x in (logp, lse) + ((dotz,) if dotz is not None else ()))
        return fn(logp, lse, dotz, target, v)

    out = _FUSED[backend].forward_with_grad(h, w, b, t, valid, LogitOptions(**V2_OPTS), coef_fn,
                                            (True, True, True), row_stats=True, dot=dot)
    assert len(out) == 8
    total, logp, kept, argmax, dx, dw, db, rows = out
    assert len(calls) > 1 and all(nodot == (dot is None) for _, nodot in calls)  # several chunks
    want = _loss_truth(clean, w, b, t, cw, kind, acc=torch.float64, **V2_OPTS)
    base = _loss_truth(clean, w, b, t, cw, kind, acc=torch.float32, **V2_OPTS)
    _close("total", total, want["total"], base["total"], dtype)
    _close("logp", logp[valid], want["logp"][valid], base["logp"][valid], dtype)
    _close("lse", rows[0][valid], want["lse"][valid], base["lse"][valid], dtype)
    assert torch.equal(kept, valid)
    for name, got in (("dh", dx), ("dw", dw), ("db", db)):
        assert torch.isfinite(got).all(), name
        _close(name, got, want[name], base[name], dtype)
    if kind == "ls":
        z64 = logits64(clean, w, b, **V2_OPTS)
        dotz_base = logits64(clean.float(), w.float(), b.float(), **V2_OPTS).float() @ cw
        _close("dotz", rows[2][valid], (z64 @ cw.double())[valid], dotz_base[valid], dtype, k=4.0)


def test_v2_bad_coefficients_are_clear_errors():
    h, w, t, b, dot = _v2_inputs(torch.float32, N=6, V=40)
    valid = t != -100
    impl = _FUSED["triton_chunked"]
    opts = LogitOptions()
    _, state, _, _ = impl.forward(h, w, b, t, valid, opts)
    with pytest.raises(ValueError, match=r"coef must have shape \[6\], \[2, 6\] or \[3, 6\]"):
        impl.backward(h, w, b, t, state, torch.ones(4, 6), opts, (True, True, True))
    with pytest.raises(ValueError, match="needs the dot vector"):
        impl.backward(h, w, b, t, state, torch.ones(3, 6), opts, (True, True, True))
    with pytest.raises(ValueError, match=r"dot must be a float32 tensor of shape \[V\] = \[40\]"):
        impl.forward(h, w, b, t, valid, opts, dot=dot[:-1])


@pytest.mark.parametrize("H,strategy", [(16, "triton_fused"), (320, "triton_chunked")])
def test_v2_triton_chooser_hands_dot_and_coefficients_on(monkeypatch, H, strategy):
    # backend='triton' passes row_stats, dot and [3, N] coefficients to the strategy it picks
    h, w, t, b, dot = _v2_inputs(torch.float32, N=12, V=70, H=H)
    valid = t != -100
    impl = _FUSED["triton"]
    assert impl.per_token_strategy(h, w).name == strategy
    seen = []
    for name in ("forward", "backward"):
        cls = type(getattr(impl, strategy.split("_")[1]))
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _r=real, _n=name, **k: seen.append(_n) or _r(self, *a, **k))
    opts = LogitOptions(**V2_OPTS)
    logp, state, _, rows = impl.forward(h, w, b, t, valid, opts, row_stats=True, dot=dot)
    coef = _v2_coef(t, 3)
    got = impl.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=dot)
    assert seen == ["forward", "backward"]
    want = _rows_truth(h, w, b, t, valid, dot, acc=torch.float64, coef=coef, **V2_OPTS)
    for name, g in (("lse", rows[0]), ("ent", rows[1]), ("dotz", rows[2])):
        torch.testing.assert_close(g[valid].double(), want[name][valid], rtol=1e-5, atol=1e-5)
    for name, g in zip(("dh", "dw", "db"), got):
        torch.testing.assert_close(g.double(), want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sync_free_mode_with_loss_terms(monkeypatch, reduction):
    # label smoothing, class weights (and a z-loss): [3, N] coefficients and a dot vector add no host
    # read in sync-free mode, and both modes equal the float64 definitions (tests/truth.py)
    import truth as T

    h, w, t, b = make_inputs(N=24, H=16, V=90, bias=True, peaked=4.0, ignore_frac=0.4)
    h[t == -100] = float("nan")
    cw = 0.5 + torch.rand(90)
    up = torch.randn(24) if reduction == "none" else None
    # (a mean with class weights AND a z-loss takes the per-token path: two denominators)
    terms = dict(z_loss=0.01 if reduction == "none" else 0.0, label_smoothing=0.1, class_weight=cw)
    ops = _record_backend_ops(monkeypatch)
    got = {}
    for mode in (False, True):
        ops.clear()
        monkeypatch.setattr(triton_chunked, "SYNC_FREE", mode)
        got[mode] = fused("triton_chunked", h, w, t, b, objective="nll", reduction=reduction, upstream=up, **terms)
        if mode:
            assert not SYNCING & set(ops), SYNCING & set(ops)
        else:
            assert ops.count("nonzero") == (1 if reduction == "mean" else 2)
    clean = torch.where((t != -100)[:, None], h, torch.zeros(()))
    want = T.truth(clean, w, t, b, objective="nll", reduction=reduction, upstream=up, **terms)
    for mode in (False, True):
        for key in ("loss", "dh", "dw", "db"):
            torch.testing.assert_close(got[mode][key].double(), want[key], rtol=1e-4, atol=1e-6)


def test_v2_malformed_coefficients_are_refused_clearly():
    """A [1, N] coefficient block is neither [N] nor [2|3, N]; [3, M] without a dot vector never
    reaches the kernel (it would read the coefficients as u)."""
    from fused_objectives.backends import registered_backend
    from fused_objectives.kernels import rows
    from fused_objectives.options import LogitOptions

    be = registered_backend("triton_chunked")
    h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    logp, state, _, _ = be.forward(h, w, None, t, torch.ones(4, dtype=torch.bool), LogitOptions())
    with pytest.raises(ValueError, match=r"\[4\], \[2, 4\] or \[3, 4\]"):
        be.backward(h, w, None, t, state, torch.randn(1, 4), LogitOptions(), (True, True, False))
    z = torch.randn(4, 11)
    with pytest.raises(ValueError, match="dot vector"):
        rows.softmax_grad_(z, None, t, state[0], state[1], (-torch.expm1(state[2])).contiguous(),
                           torch.randn(3, 4), LogitOptions())
