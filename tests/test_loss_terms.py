"""z_loss, label_smoothing and class_weight (issue 14) on every backend and path against float64.

The truth (tests/truth.py) writes the terms from their definitions on materialised float64 logits;
it is itself checked against ``F.cross_entropy(weight=, label_smoothing=)`` here, so the package's
``nll`` with these options is torch's cross-entropy.  Each fused backend is exercised on both of
its paths: the scalar losses with gradients in the forward, and ``reduction="none"`` with per-token
upstream gradients (the per-token backward with ``dlse`` / ``ddotz`` coefficients).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fused_objectives as fo
from fused_objectives.functional import validate_options
import helpers
import truth as T
from helpers import assert_no_worse, device_for, ground_truth, make_inputs, naive_same_dtype, run

V = 37


def weights(seed=1, zero_some=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(V, generator=g) * 2.0 + 0.1
    if zero_some:
        w[::7] = 0.0
    return w


@pytest.fixture(params=["reference", "fused"])
def backend(request, fused_backend, monkeypatch):
    name = "reference" if request.param == "reference" else fused_backend
    monkeypatch.setitem(helpers.DEFAULT_DEVICE, "device", device_for(name))
    return name


def check(backend, h, w, t, b=None, *, k=2.0, upstream=None, **kw):
    if kw.get("class_weight") is not None:
        kw["class_weight"] = kw["class_weight"].to(h.device)
    fused = run(h, w, t, b, backend=backend, upstream=upstream, **kw)
    cw = kw.get("class_weight")
    base = naive_same_dtype(h, w, t, b, upstream=upstream, **kw)
    kw["class_weight"] = None if cw is None else cw.cpu()
    truth = ground_truth(h.cpu(), w.cpu(), t.cpu(), None if b is None else b.cpu(),
                         upstream=None if upstream is None else upstream.cpu(), **kw)
    fused = {k2: None if v is None else v.cpu() for k2, v in fused.items()}
    base = {k2: None if v is None else v.cpu() for k2, v in base.items()}
    assert_no_worse(fused, base, truth, k=k, what=f"[{backend}] ")
    return fused, truth


# ---- the truth is torch's cross-entropy -------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_truth_is_torch_cross_entropy(reduction, weighted):
    h, w, t, b = make_inputs(N=29, H=11, V=V, bias=True, peaked=3.0, device=torch.device("cpu"))
    cw = weights() if weighted else None
    got = T.truth(h, w, t, b, objective="nll", reduction=reduction, label_smoothing=0.15, class_weight=cw,
                  grads=False)
    z = T.logits64(h, w, b)
    want = F.cross_entropy(z, t, weight=None if cw is None else cw.double(), label_smoothing=0.15,
                           reduction=reduction, ignore_index=-100)
    torch.testing.assert_close(got["loss"], want, rtol=1e-12, atol=1e-12)
    # z-loss from its definition: mean of lse^2 over valid tokens
    zl = T.truth(h, w, t, b, objective="nll", z_loss=1e-2, grads=False)["loss"]
    nll = T.truth(h, w, t, b, objective="nll", grads=False)["loss"]
    valid = t != -100
    torch.testing.assert_close(zl - nll, 1e-2 * (torch.logsumexp(z, -1)[valid] ** 2).mean(), rtol=1e-12, atol=1e-12)


# ---- every backend, both paths ------------------------------------------------------------------

TERMS = {
    "zloss": dict(z_loss=1e-2),
    "smooth": dict(label_smoothing=0.1),
    "weight": dict(class_weight=weights()),
    "all": dict(z_loss=3e-3, label_smoothing=0.2, class_weight=weights()),
}


@pytest.mark.parametrize("terms", list(TERMS), ids=list(TERMS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_terms(backend, terms, reduction):
    h, w, t, b = make_inputs(N=23, H=16, V=V, bias=True, peaked=4.0)
    up = torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(t.device) if reduction == "none" else None
    check(backend, h, w, t, b, objective="nll", reduction=reduction, upstream=up, **TERMS[terms])


@pytest.mark.parametrize("spec", ["neg_p", "neg_p_top:0.3", "power:10"])
def test_other_objectives_with_all_terms(backend, spec):
    h, w, t, b = make_inputs(N=23, H=16, V=V, peaked=5.0)
    check(backend, h, w, t, b, objective=spec, normalize="kept", **TERMS["all"])


@pytest.mark.parametrize("opts", [dict(softcap=3.0), dict(logit_scale=0.5, softcap=4.0)], ids=["softcap", "scale+cap"])
def test_terms_with_transforms(backend, opts):
    h, w, t, b = make_inputs(N=19, H=16, V=V, bias=True, peaked=4.0)
    check(backend, h, w, t, b, objective="nll", z_loss=1e-2, label_smoothing=0.1, **opts)


def test_num_items_replaces_both_denominators(backend):
    h, w, t, _ = make_inputs(N=21, H=16, V=V, peaked=4.0)
    check(backend, h, w, t, objective="nll", num_items_in_batch=40, **TERMS["all"])


def test_all_ignored_and_single_token(backend):
    h, w, t, _ = make_inputs(N=6, H=16, V=V, peaked=2.0)
    t_ign = torch.full_like(t, -100)
    out = run(h, w, t_ign, backend=backend, **TERMS["all"])
    assert out["loss"].item() == 0.0 and torch.all(out["dh"] == 0) and torch.all(out["dw"] == 0)
    check(backend, h[:1], w, t[:1].clamp(min=0), objective="nll", **TERMS["all"])


# ---- stats ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_stats_report_the_z_loss_part(backend, reduction):
    h, w, t, b = make_inputs(N=17, H=16, V=V, bias=True, peaked=3.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, st = fo.linear_objective_loss(hh, ww, t, b, z_loss=0.02, reduction=reduction, return_stats=True,
                                        backend=backend)
    z = T.logits64(h.cpu(), w.cpu(), b.cpu())
    valid = t.cpu() != -100
    ztok = torch.where(valid, 0.02 * torch.logsumexp(z, -1) ** 2, torch.zeros(()).double())
    want = {"none": ztok, "sum": ztok.sum(), "mean": ztok.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(st.z_loss.cpu().double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(st.lse.cpu().double(), torch.where(valid, torch.logsumexp(z, -1), 0.0),
                               rtol=2e-6, atol=2e-6)
    plain = fo.linear_objective_loss(h, w, t, b, reduction=reduction, backend=backend)
    torch.testing.assert_close((loss.detach() - plain).cpu().double(), want, rtol=2e-4, atol=2e-5)
    _, st0 = fo.linear_objective_loss(h, w, t, b, reduction=reduction, return_stats=True, backend=backend)
    assert torch.all(st0.z_loss == 0)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,msg", [
    (dict(z_loss=-1e-3), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(z_loss="0.1"), TypeError, "z_loss"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=True), TypeError, "label_smoothing"),
    (dict(class_weight=[1.0] * V), TypeError, "class_weight"),
    (dict(class_weight=torch.ones(V, 2)), ValueError, "class_weight"),
    (dict(class_weight=torch.ones(V + 1)), ValueError, r"class_weight must have shape \[V\] = \(37,\)"),
    (dict(class_weight=torch.ones(V, dtype=torch.int64)), TypeError, "class_weight"),
    (dict(class_weight=torch.full((V,), -1.0)), ValueError, ">= 0"),
    (dict(class_weight=torch.full((V,), float("inf"))), ValueError, "finite"),
    (dict(class_weight=torch.ones(V, requires_grad=True)), ValueError, "require grad"),
    (dict(class_weight=torch.ones(V, device="meta")), ValueError, "meta"),
])
def test_bad_terms(kw, exc, msg):
    h, w, t, _ = make_inputs(N=5, H=8, V=V, device=torch.device("cpu"))
    with pytest.raises(exc, match=msg):
        fo.linear_objective_loss(h, w, t, backend="reference", **kw)
    if "shape" not in msg:  # the vocabulary size is known only at the call
        with pytest.raises(exc, match=msg):
            validate_options(**kw)


# ---- double backward and learnable objectives ---------------------------------------------------

def test_double_backward_with_terms(backend):
    """create_graph=True on the per-token path differentiates the lse / dotz terms too."""
    h, w, t, _ = make_inputs(N=9, H=8, V=V, peaked=2.0)
    cw = weights().to(h.device)
    kw = dict(z_loss=1e-2, label_smoothing=0.1, class_weight=cw, reduction="none")
    hh = h.clone().requires_grad_()
    loss = fo.linear_objective_loss(hh, w, t, backend=backend, **kw).sum()
    (g,) = torch.autograd.grad(loss, hh, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), hh)
    h64 = h.cpu().double().requires_grad_()
    # the truth detaches its loss: the definitions again, with a graph
    z = h64 @ w.cpu().double().T
    valid = t.cpu() != -100
    ls = torch.log_softmax(z, -1)
    tok = -(1 - 0.1) * cw.cpu().double()[t.cpu().clamp(min=0)] * ls.gather(1, t.cpu().clamp(min=0)[:, None])[:, 0]
    tok = tok - (0.1 / V) * (ls * cw.cpu().double()).sum(-1) + 1e-2 * torch.logsumexp(z, -1) ** 2
    total = torch.where(valid, tok, 0.0).sum()
    torch.testing.assert_close(loss.detach().cpu().double(), total.detach(), rtol=1e-5, atol=1e-5)
    (g64,) = torch.autograd.grad(total, h64, create_graph=True)
    (gg64,) = torch.autograd.grad(g64.pow(2).sum(), h64)
    torch.testing.assert_close(gg.cpu().double(), gg64, rtol=1e-4, atol=1e-5)


def test_learnable_objective_with_class_weight(fused_backend, monkeypatch):
    """An objective's own tensors (a learnable exponent) get the weighted, smoothed gradient on the
    gradients-in-forward path as on the reference."""
    grads = {}
    for name in ("reference", fused_backend):
        dev = device_for(name)
        h, w, t, _ = make_inputs(N=15, H=8, V=V, peaked=3.0, device=dev)
        a = torch.tensor(3.0, device=dev, requires_grad=True)
        obj = lambda l: -torch.expm1(a * l) / a
        ww = w.clone().requires_grad_()
        loss = fo.linear_objective_loss(h, ww, t, objective=obj, backend=name, label_smoothing=0.1,
                                        class_weight=weights().to(dev))
        loss.backward()
        grads[name] = a.grad.cpu()
    torch.testing.assert_close(grads[fused_backend], grads["reference"], rtol=1e-4, atol=1e-6)


def test_module_carries_the_terms():
    """LinearObjectiveLoss validates the terms at construction, keeps class_weight as a buffer (it
    follows .to() and the state_dict) and equals the functional call."""
    import pickle

    cw = weights()
    m = fo.LinearObjectiveLoss("nll", z_loss=1e-3, label_smoothing=0.1, class_weight=cw, backend="reference")
    h, w, t, _ = make_inputs(N=9, H=8, V=V, device=torch.device("cpu"))
    want = fo.linear_objective_loss(h, w, t, z_loss=1e-3, label_smoothing=0.1, class_weight=cw, backend="reference")
    assert torch.equal(m(h, w, t), want)
    assert torch.equal(pickle.loads(pickle.dumps(m))(h, w, t), want)
    assert "class_weight" in m.state_dict() and torch.equal(m.to(torch.float64).class_weight, cw.double())
    with pytest.raises(ValueError, match="label_smoothing"):
        fo.LinearObjectiveLoss("nll", label_smoothing=2.0)


def test_target_weights_never_index_out_of_range():
    """On CUDA a valid out-of-range target is not checked on the host (its log p is NaN); the class
    weight lookup must still stay inside [0, V) (on CPU an out-of-range index raises)."""
    from fused_objectives.autograd import target_weights

    cw = torch.arange(1.0, V + 1.0)
    t = torch.tensor([3, V, -5, -100, V - 1])
    valid = t != -100
    got = target_weights(cw, t, valid, torch.float32)
    assert got.tolist() == [4.0, 1.0, 1.0, 0.0, float(V)]


@pytest.mark.gpu
def test_out_of_range_target_with_class_weight_is_nan_on_cuda():
    h, w, t, _ = make_inputs(N=8, H=16, V=V, device=torch.device("cuda"))
    t[2] = V + 3
    loss = fo.linear_objective_loss(h, w, t, class_weight=weights().cuda(), label_smoothing=0.1)
    assert torch.isnan(loss)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_reference_backend_empty_batch(k):
    """The contract's executable specification takes an empty batch with any coefficient layout."""
    from fused_objectives.backends.reference import BACKEND
    from fused_objectives.options import LogitOptions

    w = torch.randn(5, 4, requires_grad=True)
    coef = torch.zeros(0) if k == 1 else torch.zeros(k, 0)
    dx, dw, db = BACKEND.backward(torch.zeros(0, 4), w, None, torch.zeros(0, dtype=torch.long), None, coef,
                                  LogitOptions(), (True, True, False), dot=torch.ones(5))
    assert dx.shape == (0, 4) and torch.equal(dw, torch.zeros(5, 4)) and db is None


def test_z_loss_mean_is_over_valid_tokens_whatever_normalize(backend):
    """normalize='kept' changes the objective's denominator only: the z-loss is on valid tokens and
    its mean is over them (a gate that keeps nothing leaves the z-loss whole)."""
    h, w, t, _ = make_inputs(N=12, H=16, V=V, peaked=1.0)
    got = run(h, w, t, backend=backend, objective="nll_top:0.999", normalize="kept", z_loss=1.0)
    z = T.logits64(h.cpu(), w.cpu())
    valid = t.cpu() != -100
    want = (torch.logsumexp(z, -1)[valid] ** 2).mean()
    torch.testing.assert_close(got["loss"].cpu().double(), want, rtol=1e-5, atol=0)
    assert got["dh"].abs().sum() > 0


def test_float64_reference_with_class_weights_is_float64():
    h, w, t, b = make_inputs(N=29, H=11, V=V, bias=True, peaked=3.0, dtype=torch.float64,
                             device=torch.device("cpu"))
    cw = weights().double()
    for eps in (0.0, 0.3):
        got = fo.linear_objective_loss(h, w, t, b, class_weight=cw, label_smoothing=eps, backend="reference")
        want = F.cross_entropy(T.logits64(h, w, b), t, weight=cw, label_smoothing=eps)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_double_backward_of_an_empty_batch(fused_backend):
    dev = device_for(fused_backend)
    h = torch.zeros(0, 8, device=dev, requires_grad=True)
    w = torch.randn(V, 8, device=dev)
    loss = fo.linear_objective_loss(h, w, torch.zeros(0, dtype=torch.long, device=dev), reduction="none",
                                    backend=fused_backend, z_loss=1e-2).sum()
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    assert g.shape == (0, 8)
