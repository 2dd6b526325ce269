"""linear_objective_loss / target_logprob on every backend against the float64 ground truth.

The fused backends (Triton under the interpreter on CPU; the C++ CPU backend when built) must be no
worse than same-dtype PyTorch plus a small epsilon, for the loss and every gradient.
"""
import math

import pytest
import torch

import fused_objectives as fo
import helpers
from helpers import assert_no_worse, device_for, ground_truth, make_inputs, naive_same_dtype, run

ALL_SPECS = ["nll", "neg_p", "power:10", "neg_power:2", "nll_top:0.2", "nll_bottom:0.5", "neg_p_top:0.3",
             "neg_p_bottom:0.7", "unlikelihood_top:0.4", "unlikelihood_bottom:0.6", "dft"]


def check(backend, hidden, weight, target, bias=None, *, k=2.0, upstream=None, **kw):
    fused = run(hidden, weight, target, bias, backend=backend, upstream=upstream, **kw)
    base = naive_same_dtype(hidden, weight, target, bias, upstream=upstream, **kw)
    truth = ground_truth(hidden, weight, target, bias, upstream=upstream, **kw)
    assert_no_worse(fused, base, truth, k=k, what=f"[{backend}] ")
    return fused, truth


@pytest.fixture(params=["reference", "fused"])
def backend(request, fused_backend, monkeypatch):
    name = "reference" if request.param == "reference" else fused_backend
    # make_inputs' tensors: CUDA for the Triton backends on a CUDA machine, else CPU
    monkeypatch.setitem(helpers.DEFAULT_DEVICE, "device", device_for(name))
    return name


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_objective(backend, spec):
    h, w, t, _ = make_inputs(peaked=6.0)
    check(backend, h, w, t, objective=spec)


@pytest.mark.parametrize("reduction,normalize", [("mean", "valid"), ("mean", "kept"), ("sum", "valid"), ("none", "valid")])
def test_reductions(backend, reduction, normalize):
    h, w, t, b = make_inputs(bias=True, peaked=6.0)
    up = torch.randn(t.shape) if reduction == "none" else None
    check(backend, h, w, t, b, objective="nll_top:0.3", reduction=reduction, normalize=normalize, upstream=up)


@pytest.mark.parametrize("opts", [dict(softcap=2.0), dict(logit_scale=0.37), dict(softcap=5.0, logit_scale=3.0)],
                         ids=["softcap", "scale", "scale+softcap"])
def test_logit_transforms(backend, opts):
    h, w, t, b = make_inputs(bias=True, peaked=4.0)
    check(backend, h, w, t, b, objective="neg_p", **opts)


def test_shift_with_leading_dims(backend):
    h, w, t, b = make_inputs(lead=(3, 11), bias=True, peaked=5.0)
    check(backend, h, w, t, b, objective="power:10", shift=True)
    per_tok = fo.linear_objective_loss(h, w, t, b, shift=True, reduction="none", backend=backend)
    assert per_tok.shape == t.shape and torch.all(per_tok[:, -1] == 0)


def test_per_token_upstream_gradient(backend):
    h, w, t, _ = make_inputs(lead=(2, 9), peaked=3.0)
    up = torch.randn(t.shape)
    check(backend, h, w, t, objective="neg_p", reduction="none", upstream=up)


@pytest.mark.parametrize("num_items", [7, torch.tensor(23)], ids=["int", "tensor"])
def test_num_items_in_batch(backend, num_items):
    h, w, t, _ = make_inputs()
    fused, _ = check(backend, h, w, t, objective="nll", num_items_in_batch=num_items)
    total = run(h, w, t, backend=backend, objective="nll", reduction="sum", grads=False)["loss"]
    torch.testing.assert_close(fused["loss"], total / float(num_items))


def test_gradient_accumulation_equals_one_batch(backend):
    h, w, t, _ = make_inputs(lead=(4, 8), ignore_frac=0.4)
    n_items = int((t != -100).sum())
    W = w.clone().requires_grad_()
    total = 0.0
    for i in range(4):
        loss = fo.linear_objective_loss(h[i], W, t[i], objective="neg_p", num_items_in_batch=n_items, backend=backend)
        loss.backward()
        total += loss.detach()
    one = run(h, w, t, backend=backend, objective="neg_p")
    torch.testing.assert_close(total, one["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, one["dw"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["hidden", "weight", "bias", "none"])
def test_partial_requires_grad(backend, which):
    h, w, t, b = make_inputs(bias=True)
    hh = h.clone().requires_grad_(which == "hidden")
    ww = w.clone().requires_grad_(which == "weight")
    bb = b.clone().requires_grad_(which == "bias")
    loss = fo.linear_objective_loss(hh, ww, t, bb, objective="neg_p", backend=backend)
    if which == "none":
        assert not loss.requires_grad
        return
    loss.backward()
    truth = ground_truth(h, w, t, b, objective="neg_p")
    got = {"hidden": hh.grad, "weight": ww.grad, "bias": bb.grad}[which]
    want = truth[{"hidden": "dh", "weight": "dw", "bias": "db"}[which]]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    for name, tensor in (("hidden", hh), ("weight", ww), ("bias", bb)):
        if name != which:
            assert tensor.grad is None


@pytest.mark.parametrize("reduction,normalize", [("mean", "valid"), ("mean", "kept"), ("sum", "valid")])
def test_all_tokens_ignored(backend, reduction, normalize):
    h, w, t, b = make_inputs(bias=True)
    t = torch.full_like(t, -100)
    out = run(h, w, t, b, backend=backend, reduction=reduction, normalize=normalize, objective="nll")
    assert out["loss"].item() == 0.0
    for key in ("dh", "dw", "db"):
        assert torch.all(out[key] == 0), key


def test_gate_keeps_nothing_gives_zero_not_nan(backend):
    h, w, t, _ = make_inputs()
    out = run(h, w, t, backend=backend, objective="nll_top:1.0", normalize="kept")
    assert out["loss"].item() == 0.0 and torch.all(out["dh"] == 0) and torch.all(out["dw"] == 0)


def test_zero_num_items_gives_zero(backend):
    h, w, t, _ = make_inputs()
    out = run(h, w, t, backend=backend, num_items_in_batch=0)
    assert out["loss"].item() == 0.0 and torch.all(out["dw"] == 0)


@pytest.mark.parametrize("N,H,V", [(1, 19, 100), (5, 16, 32), (40, 33, 257), (3, 1, 5)],
                         ids=["N1", "exact-blocks", "odd-H-V", "H1"])
def test_awkward_shapes(backend, N, H, V):
    h, w, t, b = make_inputs(N=N, H=H, V=V, bias=True, ignore_frac=0.0, peaked=3.0)
    check(backend, h, w, t, b, objective="neg_p")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(backend, dtype):
    # bf16 tiles are upcast to fp32 before tl.dot under the Triton interpreter (its bf16 dot is broken)
    h, w, t, b = make_inputs(dtype=dtype, bias=True, peaked=5.0)
    fused, _ = check(backend, h, w, t, b, objective="neg_p")
    assert fused["loss"].dtype == torch.float32
    assert fused["dh"].dtype == dtype and fused["dw"].dtype == dtype and fused["db"].dtype == dtype


def test_non_contiguous_inputs(backend):
    h, w, t, b = make_inputs(lead=(4, 6), bias=True)
    h_nc = h.transpose(0, 1).contiguous().transpose(0, 1)  # [4, 6, H] view with swapped strides
    w_nc = w.T.contiguous().T
    t_nc = t.T.contiguous().T
    b_nc = torch.stack([b, b], 1)[:, 0]
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous() or b_nc.is_contiguous())
    a = run(h, w, t, b, backend=backend, objective="neg_p")
    c = run(h_nc, w_nc, t_nc, b_nc, backend=backend, objective="neg_p")
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-7)
    # 1-D strided views: every other token
    h2, t2 = h.reshape(-1, h.shape[-1]), t.reshape(-1)
    a = run(h2[::2].contiguous(), w, t2[::2].contiguous(), b, backend=backend)
    c = run(h2[::2], w, t2[::2], b, backend=backend)
    for key in a:
        torch.testing.assert_close(a[key], c[key], rtol=1e-5, atol=1e-7)


def test_extreme_logits_stay_finite(backend):
    h, w, t, _ = make_inputs(N=9, H=8, V=50, ignore_frac=0.0)
    h = h * 3e3  # |z| ~ 1e4
    out = run(h, w, t, backend=backend, objective="nll")
    assert all(torch.isfinite(v).all() for v in out.values() if v is not None)
    check(backend, h, w, t, objective="neg_p")


def test_nan_input_gives_nan(backend):
    h, w, t, _ = make_inputs(ignore_frac=0.0)
    h[3, 2] = float("nan")
    for spec in ("nll", "nll_top:0.9"):
        assert torch.isnan(run(h, w, t, backend=backend, objective=spec, grads=False)["loss"])


def test_nan_at_ignored_position_is_masked(backend):
    h, w, t, _ = make_inputs(ignore_frac=0.0)
    t[3] = -100
    h[3] = float("nan")
    out = run(h, w, t, backend=backend, objective="nll")
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["dw"]).all()


def test_target_logprob_composes_exactly(backend):
    h, w, t, b = make_inputs(bias=True, peaked=4.0)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = fo.target_logprob(hh, ww, t, b, backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == t.shape
    valid = t != -100
    loss = ((1 - lp.exp()) * valid).sum() / valid.sum()
    loss.backward()
    direct = run(h, w, t, b, backend=backend, objective="neg_p")
    # a scalar loss may take the backend's gradient-in-forward path (summed per chunk): same
    # math, equal up to fp32 rounding
    torch.testing.assert_close(loss.detach(), direct["loss"], rtol=1e-6, atol=1e-9)
    for got, want in ((hh.grad, direct["dh"]), (ww.grad, direct["dw"])):
        torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * want.abs().max().item())
    truth = ground_truth(h, w, t, b, objective="nll", reduction="none", grads=False)["loss"]
    torch.testing.assert_close(lp.double(), -truth, rtol=1e-5, atol=1e-6)
    assert torch.all(lp[~valid] == 0)


def test_stats(backend):
    h, w, t, b = make_inputs(bias=True, peaked=8.0, N=60)
    loss, stats = fo.linear_objective_loss(h, w, t, b, objective="nll_top:0.3", backend=backend, return_stats=True)
    d = lambda x: None if x is None else x.double()
    z = d(h) @ d(w).T + d(b)
    valid = t != -100
    logp = torch.where(valid, torch.log_softmax(z, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0)
    hits = (z.argmax(-1) == t) & valid
    assert 0 < hits.sum() < valid.sum(), "test inputs should give a non-trivial accuracy"
    torch.testing.assert_close(stats.logp.double(), logp, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.valid, valid)
    assert stats.n_valid.item() == valid.sum().item()
    assert stats.n_kept.item() == (valid & (logp.exp() >= 0.3)).sum().item()
    assert torch.equal(stats.hit, hits)
    assert stats.accuracy.item() == pytest.approx(hits.sum().item() / valid.sum().item())
    assert stats.mean_p.item() == pytest.approx(logp.exp()[valid].mean().item(), rel=1e-5)
    assert stats["n_kept"] is stats.n_kept and set(stats.as_dict()) >= {"logp", "valid", "n_valid", "n_kept", "accuracy"}
    assert not stats.logp.requires_grad


def test_argmax_ties_take_first_index(backend):
    # identical weight rows: every tie resolves to the lowest index, as torch.argmax does
    h, w, t, _ = make_inputs(N=6, H=8, V=70, ignore_frac=0.0)
    w = w[:1].repeat(70, 1)
    t = torch.tensor([0, 1, 2, 0, 69, 0], device=h.device)
    _, stats = fo.linear_objective_loss(h, w, t, backend=backend, return_stats=True)
    assert stats.accuracy.item() == pytest.approx(3 / 6)


def test_module(backend):
    h, w, t, b = make_inputs(lead=(2, 7), bias=True)
    mod = fo.LinearObjectiveLoss("power:10", shift=True, backend=backend)
    assert "power:10" in repr(mod)
    torch.testing.assert_close(mod(h, w, t, b), fo.linear_objective_loss(h, w, t, b, objective="power:10", shift=True, backend=backend))
    n = mod(h, w, t, b, num_items_in_batch=5)
    s = fo.linear_objective_loss(h, w, t, b, objective="power:10", shift=True, reduction="sum", backend=backend)
    torch.testing.assert_close(n, s / 5)


def test_autocast_keeps_fp32_logits(backend):
    # inside an autocast region (Trainer's bf16) the logits math stays fp32: same numbers as outside
    h, w, t, b = make_inputs(bias=True, peaked=4.0)
    plain = run(h, w, t, b, backend=backend, objective="neg_p")
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    with torch.autocast(h.device.type, dtype=torch.bfloat16):  # the forward, as a Trainer runs it
        loss = fo.linear_objective_loss(hh, ww, t, bb, backend=backend, objective="neg_p")
    loss.backward()
    auto = {"loss": loss.detach(), "dh": hh.grad, "dw": ww.grad, "db": bb.grad}
    for key in plain:
        assert auto[key].dtype == plain[key].dtype, key
        torch.testing.assert_close(auto[key], plain[key], rtol=1e-5, atol=1e-7)
