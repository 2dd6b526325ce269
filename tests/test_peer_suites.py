"""The case matrices of three peer test suites, ported to this API (our own code):

- Liger-Kernel's fused linear cross entropy tests: ``(B, T, H, V)`` in {(8, 128, 1024, 4096),
  (4, 47, 31, 123)}, weights ``torch.rand`` (all-positive), mean / sum / none reductions in fp32 and
  bf16 with Liger's tolerances, bias, ``ignore_index=42`` with ``softcap=30``, a forward-only run,
  the functional shapes (2, 2, 8, 8) / (9, 7, 41, 41), autocast (AMP), and its token scaling
  (``ce * sg(p)``, our ``dft`` objective);
- Apple Cut Cross-Entropy's loss forward / backward tests: ``(N, V, D)`` in {(256, 512, 128),
  (252, 507, 128), (252, 507, 123)}, fp32 / fp16 / bf16, soft-cap 20, shift, 20% ignored targets,
  every reduction, ``e`` viewed as ``[4, N/4, D]``, the bias of its lse test, each error no larger
  than same-dtype PyTorch's plus CCE's tolerance;
- PyTorch's ``F.linear_cross_entropy`` tests: its shapes (vocabulary 6000 / 5000 with tiny H, 1500
  tokens over V = 64, a ``[3, 4]`` batch with bias and ``ignore_index=-1``), every reduction.

Liger's extras are ported too: class weights (``ce_weight``), z-loss (``lse_square_scale``, its
z-loss divided by the count of non-ignored tokens) and label smoothing, alone and together with
``ignore_index=42`` and ``softcap=30``; PyTorch's ``weight`` / ``label_smoothing`` options likewise.
The truth is float64 PyTorch on materialised
logits, written here from the definitions.  Everything runs on the ``cpu`` backend; the Triton
backends run a small-shape subset (under the interpreter without a GPU) and, on a GPU, Liger's whole
matrix at its large shape.  PyTorch's float64 gradcheck is not ported: the fused backends take
fp32 / fp16 / bf16 only (float64 runs on the reference backend, the truth's own math).
"""
import pytest
import torch
import torch.nn.functional as F

import fused_objectives as fo

HAS_CUDA = torch.cuda.is_available()
TRITON_BACKENDS = [b for b in fo.available_backends() if b.startswith("triton")]


def _device(backend):
    return "cuda" if HAS_CUDA and backend.startswith("triton") else "cpu"


def _truth(h, w, t, b=None, *, reduction="mean", ignore_index=-100, softcap=None, shift=False,
           objective="nll", upstream=None, z_loss=0.0, label_smoothing=0.0, class_weight=None):
    """float64 loss and gradients (of ``loss`` or ``(loss * upstream).sum()``) from the definitions."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    z = h64 @ w64.T
    if b64 is not None:
        z = z + b64
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if shift:
        t = torch.cat([t[..., 1:], torch.full_like(t[..., :1], ignore_index)], dim=-1)
    valid = t != ignore_index
    lp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, t, 0)[..., None])[..., 0]
    per_tok = -lp if objective == "nll" else -lp * lp.detach().exp()
    per_tok = torch.where(valid, per_tok, torch.zeros_like(per_tok))
    if reduction == "none":
        loss = per_tok
    elif reduction == "sum":
        loss = per_tok.sum()
    else:
        n = valid.sum()
        loss = per_tok.sum() / n if n > 0 else per_tok.sum() * 0
    if objective == "nll" and (label_smoothing or class_weight is not None):
        # torch's own definition of the weighted, smoothed cross-entropy
        V = z.shape[-1]
        cw = None if class_weight is None else class_weight.double()
        loss = F.cross_entropy(z.reshape(-1, V), t.reshape(-1), weight=cw, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
        loss = loss.reshape(t.shape) if reduction == "none" else loss
    if z_loss:
        zt = torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, torch.zeros((), dtype=z.dtype))
        n = valid.sum()
        loss = loss + (zt if reduction == "none" else zt.sum() if reduction == "sum" else zt.sum() / max(int(n), 1))
    if upstream is None and loss.dim():
        upstream = torch.ones(loss.shape)
    (loss if upstream is None else (loss * upstream.double()).sum()).backward()
    return loss.detach(), (h64.grad, w64.grad, None if b64 is None else b64.grad)


def _ours(backend, h, w, t, b=None, *, upstream=None, **kw):
    dev = _device(backend)
    leaf = lambda x: None if x is None else x.detach().to(dev).clone().requires_grad_()
    hh, ww, bb = leaf(h), leaf(w), leaf(b)
    loss = fo.linear_objective_loss(hh, ww, t.to(dev), bb, backend=backend, **kw)
    if upstream is None and loss.dim():
        upstream = torch.ones(loss.shape)
    (loss if upstream is None else (loss * upstream.to(dev)).sum()).backward()
    grads = tuple(None if x is None else x.grad.cpu() for x in (hh, ww, bb))
    return loss.detach().cpu(), grads


def _close(got, want, atol, rtol, what):
    assert got is not None, f"{what}: missing"
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- Liger-Kernel

LIGER_TOLERANCES = [  # reduction, dtype, atol, rtol (Liger's own)
    ("mean", torch.bfloat16, 5e-3, 5e-2),
    ("mean", torch.float32, 1e-5, 5e-4),
    ("sum", torch.bfloat16, 5.0, 50.0),
    ("sum", torch.float32, 1e-3, 5e-2),
    ("none", torch.bfloat16, 5.0, 50.0),
    ("none", torch.float32, 1e-3, 5e-2),
]
# (ignore_index, softcap, lse_square_scale, label_smoothing, ce_weight), as in Liger's matrix
LIGER_OPTIONS = [(-100, None, 0.0, 0.0, False), (42, 30.0, 0.0, 0.0, False), (42, 30.0, 1e-4, 0.1, True),
                 (-100, None, 1e-4, 0.0, False), (-100, None, 0.0, 0.1, False), (-100, None, 0.0, 0.0, True)]
LIGER_IDS = ["default", "ii42-cap30", "ii42-cap30-z-smooth-weight", "z", "smooth", "weight"]


def _liger_inputs(B, T, H, V, dtype, bias, ignore_index, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(V, H, generator=g).to(dtype)
    b = torch.rand(V, generator=g).to(dtype) if bias else None
    h = torch.randn(B * T, H, generator=g).to(dtype)
    t = torch.randint(0, V, (B * T,), generator=g)
    n_ignored = int(torch.randint(1, B * T // 2, (1,), generator=g))
    t[torch.randperm(B * T, generator=g)[:n_ignored]] = ignore_index
    return h, w, t, b


def _liger_case(backend, shape, reduction, dtype, atol, rtol, bias, ignore_index, softcap, z_loss=0.0,
                label_smoothing=0.0, weighted=False):
    h, w, t, b = _liger_inputs(*shape, dtype, bias, ignore_index)
    kw = dict(reduction=reduction, ignore_index=ignore_index, softcap=softcap, z_loss=z_loss,
              label_smoothing=label_smoothing)
    if weighted:  # Liger's ce_weight: torch.rand(V) * 10
        kw["class_weight"] = torch.rand(shape[-1], generator=torch.Generator().manual_seed(5)) * 10
    loss, grads = _ours(backend, h, w, t, b, **kw)
    want, want_grads = _truth(h, w, t, b, **kw)
    if weighted:
        kw["class_weight"] = kw["class_weight"].to(_device(backend))
    _close(loss, want, atol, rtol, "loss")
    for name, g, wg in zip(("dh", "dw", "db"), grads, want_grads):
        if wg is None:
            assert g is None
        else:
            _close(g, wg, atol, rtol, name)
    # forward only (no gradients needed): the same loss, and nothing to differentiate
    with torch.no_grad():
        loss_ng = fo.linear_objective_loss(h.to(_device(backend)), w.to(_device(backend)), t.to(_device(backend)),
                                           None if b is None else b.to(_device(backend)), backend=backend, **kw)
    _close(loss_ng.cpu(), want, atol, rtol, "forward-only loss")
    assert not loss_ng.requires_grad


@pytest.mark.parametrize("ignore_index,softcap,z_loss,smoothing,weighted", LIGER_OPTIONS, ids=LIGER_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction,dtype,atol,rtol", LIGER_TOLERANCES,
                         ids=[f"{r}-{str(d)[6:]}" for r, d, _, _ in LIGER_TOLERANCES])
def test_liger_correctness_random_shape(reduction, dtype, atol, rtol, bias, ignore_index, softcap, z_loss,
                                        smoothing, weighted):
    _liger_case("cpu", (4, 47, 31, 123), reduction, dtype, atol, rtol, bias, ignore_index, softcap, z_loss,
                smoothing, weighted)


@pytest.mark.parametrize("reduction,dtype,atol,rtol", [LIGER_TOLERANCES[0], LIGER_TOLERANCES[1]],
                         ids=["mean-bfloat16", "mean-float32"])
def test_liger_correctness_large_shape(reduction, dtype, atol, rtol):
    _liger_case("cpu", (8, 128, 1024, 4096), reduction, dtype, atol, rtol, False, 42, 30.0)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("reduction,dtype,atol,rtol,bias,ignore_index,softcap,extras", [
    ("mean", torch.float32, 1e-5, 5e-4, True, 42, 30.0, False),
    ("sum", torch.bfloat16, 5.0, 50.0, False, -100, None, False),
    ("none", torch.float32, 1e-3, 5e-2, True, -100, None, False),
    ("mean", torch.float32, 1e-5, 5e-4, True, 42, 30.0, True),
], ids=["mean-f32-bias-ii42-cap30", "sum-bf16", "none-f32-bias", "mean-f32-ii42-cap30-z-smooth-weight"])
def test_liger_correctness_triton(backend, reduction, dtype, atol, rtol, bias, ignore_index, softcap, extras):
    # a smaller sibling of Liger's random shape (the interpreter is slow); V still not a block multiple
    more = (1e-4, 0.1, True) if extras else ()
    _liger_case(backend, (2, 23, 31, 123), reduction, dtype, atol, rtol, bias, ignore_index, softcap, *more)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("ignore_index,softcap,z_loss,smoothing,weighted", LIGER_OPTIONS, ids=LIGER_IDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction,dtype,atol,rtol", LIGER_TOLERANCES,
                         ids=[f"{r}-{str(d)[6:]}" for r, d, _, _ in LIGER_TOLERANCES])
def test_liger_correctness_large_shape_gpu(backend, reduction, dtype, atol, rtol, bias, ignore_index, softcap,
                                           z_loss, smoothing, weighted):
    # Liger's full matrix at its large shape on the compiled kernels (where a soft-cap tanh that
    # loses precision once missed Liger's own fp32 tolerance)
    _liger_case(backend, (8, 128, 1024, 4096), reduction, dtype, atol, rtol, bias, ignore_index, softcap, z_loss,
                smoothing, weighted)


@pytest.mark.parametrize("shape", [(2, 2, 8, 8), (9, 7, 41, 41)], ids=["2x2x8x8", "9x7x41x41"])
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)],
                         ids=["bfloat16", "float32"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_liger_functional(shape, dtype, atol, rtol, bias):
    B, T, H, V = shape
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B * T, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (B * T,), generator=g)
    up = torch.randn((), generator=g)
    loss, grads = _ours("cpu", h, w, t, b, upstream=up, softcap=30.0)
    want, want_grads = _truth(h, w, t, b, softcap=30.0, upstream=up)
    _close(loss, want, atol, rtol, "loss")
    _close(grads[0], want_grads[0], atol, rtol, "dh")


@pytest.mark.parametrize("cast_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_liger_amp(cast_dtype, bias):
    # fp32 inputs inside an autocast region, forward and backward: fp32 math either way
    h, w, t, b = _liger_inputs(4, 47, 31, 123, torch.float32, bias, -100, seed=2)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=cast_dtype):
        loss = fo.linear_objective_loss(hh, ww, t, b, backend="cpu")
        loss.backward()
    want, (wh, ww64, _) = _truth(h, w, t, b)
    _close(loss.detach(), want, 5e-3, 5e-2, "loss")
    _close(hh.grad, wh, 5e-3, 5e-2, "dh")
    _close(ww.grad, ww64, 5e-3, 5e-2, "dw")


@pytest.mark.parametrize("backend", ["cpu"] + TRITON_BACKENDS)
def test_liger_token_scaling_is_dft(backend):
    # Liger's use_token_scaling: per-token cross-entropy times the detached target probability
    g = torch.Generator().manual_seed(3)
    h, w, b = torch.randn(8, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    t = torch.randint(0, 16, (8,), generator=g)
    up = torch.ones(8)
    loss, grads = _ours(backend, h, w, t, b, upstream=up, objective="dft", reduction="none")
    want, want_grads = _truth(h, w, t, b, objective="dft", reduction="none", upstream=up)
    _close(loss, want, 1e-4, 1e-4, "loss")
    _close(grads[0], want_grads[0], 1e-4, 1e-4, "dh")


# ----------------------------------------------------------------------------- Apple CCE

CCE_SHAPES = [(256, 512, 128), (252, 507, 128), (252, 507, 123)]  # (N, V, D)
CCE_DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)]  # CCE's tolerances


def _cce_inputs(N, V, D, dtype, invalids, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = (torch.randn(N, D, generator=g) / D**0.5).to(dtype)
    c = torch.randn(V, D, generator=g).to(dtype)
    k = min(N, V) // 2
    c[:k] = e[:k]  # a block of confident tokens
    b = (torch.randn(V, generator=g) * 0.02).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    if invalids:
        t[torch.randperm(N, generator=g)[: int(0.2 * N)]] = -100
    return e.view(4, -1, D), c, t.view(4, -1), b


def _same_dtype(e, c, t, b, *, softcap, shift, reduction, upstream=None):
    """What a user writes in the inputs' dtype (logits and soft-cap in that dtype, fp32 cross-entropy)."""
    ee, cc = e.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    z = ee @ cc.T
    if bb is not None:
        z = z + bb
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    tt = torch.cat([t[..., 1:], torch.full_like(t[..., :1], -100)], dim=-1) if shift else t
    per_tok = F.cross_entropy(z.float().flatten(0, -2), tt.flatten(), reduction="none").view(tt.shape)
    if reduction == "none":
        loss = per_tok
    elif reduction == "sum":
        loss = per_tok.sum()
    else:
        loss = per_tok.sum() / (tt != -100).sum()
    if upstream is None and loss.dim():
        upstream = torch.ones(loss.shape)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), (ee.grad, cc.grad, None if bb is None else bb.grad)


def _no_worse(got, base, gt, tol, what):
    """CCE's elementwise rule ``|ours - gt| <= |same-dtype torch - gt| + tol``, its absolute ``tol``
    scaled by the tensor's magnitude where that exceeds 1 (sums, per-token upstream gradients)."""
    tol = tol * max(1.0, gt.abs().max().item())
    err, base_err = (got.double() - gt).abs(), (base.double() - gt).abs()
    excess = (err - base_err - tol).max().item()
    assert excess <= 0, f"{what}: error exceeds same-dtype PyTorch's + {tol:.3g} by {excess:.3e}"


def _cce_backward_case(backend, shape, dtype, tol, softcap, shift, invalids, reduction, bias=False):
    e, c, t, b = _cce_inputs(*shape, dtype, invalids, bias)
    g = torch.Generator().manual_seed(9)
    up = torch.randn(t.shape, generator=g) if reduction == "none" else None
    kw = dict(softcap=softcap, shift=shift, reduction=reduction)
    loss, (de, dc, db) = _ours(backend, e, c, t, b, upstream=up, **kw)
    assert loss.shape == (t.shape if reduction == "none" else ())
    gt, (gde, gdc, gdb) = _truth(e, c, t, b, upstream=up, **kw)
    base, (bde, bdc, bdb) = _same_dtype(e, c, t, b, upstream=up, **kw)
    _no_worse(loss, base, gt, tol, "loss")
    _no_worse(de, bde, gde, tol, "d_e")
    _no_worse(dc, bdc, gdc, tol, "d_c")
    if b is not None:
        _no_worse(db, bdb, gdb, tol, "d_bias")


# CCE's forward test is the reduction="none" row (its per-token losses are compared first).  The full
# matrix runs on its most awkward shape; the other two shapes on a cross-section (time on 2 cores).
@pytest.mark.parametrize("dtype,tol", CCE_DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "cap20"])
@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("invalids", [False, True], ids=["all", "invalids"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cce_loss_forward_backward(dtype, tol, softcap, shift, invalids, reduction):
    _cce_backward_case("cpu", CCE_SHAPES[2], dtype, tol, softcap, shift, invalids, reduction)


@pytest.mark.parametrize("shape", CCE_SHAPES[:2], ids=["x".join(map(str, s)) for s in CCE_SHAPES[:2]])
@pytest.mark.parametrize("dtype,tol", CCE_DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "cap20"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cce_loss_forward_backward_other_shapes(shape, dtype, tol, softcap, reduction):
    # with the bias of CCE's lse test
    _cce_backward_case("cpu", shape, dtype, tol, softcap, True, True, reduction, bias=True)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("dtype,tol,softcap,shift,invalids,reduction", [
    (torch.float32, 1e-5, 20.0, True, True, "mean"),
    (torch.float16, 1e-3, None, False, True, "none"),
    (torch.bfloat16, 1e-2, 20.0, True, False, "sum"),
], ids=["f32-cap20-shift-invalids-mean", "f16-invalids-none", "bf16-cap20-shift-sum"])
def test_cce_loss_backward_triton(backend, dtype, tol, softcap, shift, invalids, reduction):
    # CCE's awkward shape scaled down for the interpreter: N = 60 (4 x 15), V = 127, D = 123
    _cce_backward_case(backend, (60, 127, 123), dtype, tol, softcap, shift, invalids, reduction)


# ----------------------------------------------------------------------------- PyTorch

TORCH_CASES = {  # name: (input shape, V, bias, ignore_index)
    "auto-2x3x32-V6000-bias": ((2, 3, 32), 6000, True, -100),
    "vocab-4x16-V5000": ((4, 16), 5000, False, -100),
    "batch-1500x8-V64": ((1500, 8), 64, False, -100),
    "options-3x4x8-V16-bias-ii-1": ((3, 4, 8), 16, True, -1),
}
# torch.testing's float32 tolerances, which PyTorch's own test applies (against its fp32 reference)
FP32_RTOL, FP32_ATOL = 1.3e-6, 1e-5


@pytest.mark.parametrize("terms", ["plain", "weight-smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_linear_cross_entropy_cases(case, reduction, terms):
    shape, V, bias, ignore_index = TORCH_CASES[case]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, generator=g)
    w = torch.randn(V, shape[-1], generator=g)
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, shape[:-1], generator=g)
    up = torch.ones(t.shape) if reduction == "none" else None
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    if terms != "plain":  # F.linear_cross_entropy's weight= and label_smoothing=
        kw.update(class_weight=torch.rand(V, generator=g) + 0.5, label_smoothing=0.25)
    loss, grads = _ours("cpu", h, w, t, b, upstream=up, **kw)
    want, want_grads = _truth(h, w, t, b, upstream=up, **kw)
    if reduction == "none":
        assert loss.shape == t.shape
    # relative to each tensor's scale: a sum over 1500 tokens is not an O(1) number
    for name, got, gt in zip(("loss", "dh", "dw", "db"), (loss,) + grads, (want,) + want_grads):
        if gt is None:
            assert got is None
            continue
        scale = max(gt.abs().max().item(), 1.0)
        _close(got, gt, FP32_ATOL * scale, FP32_RTOL, name)
