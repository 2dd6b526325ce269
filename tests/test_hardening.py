"""Adversarial cases (issue 12): double backward, objectives with parameters, confident tokens,
``num_items_in_batch`` tensors, pickling, construction-time validation, clear errors, the reference
backend under autocast, fp16 gradient underflow.

The truth here is float64 PyTorch on materialised logits, written from the definitions.
"""
import io
import math
import pickle

import pytest
import torch

import fused_objectives as fo
from fused_objectives import functional as fn_mod


def _inputs(N=6, H=8, V=20, dtype=torch.float32, seed=0, ignore=(1,)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    t = torch.randint(0, V, (N,), generator=g)
    for i in ignore:
        t[i] = -100
    return h.to(dtype), w.to(dtype), t


def _truth_logp(h, w, t, b=None):
    """float64 target log-probabilities (0 at ignored tokens), differentiable."""
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    valid = t != -100
    lp = torch.log_softmax(z, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return torch.where(valid, lp, torch.zeros_like(lp)), valid


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _dev(backend):
    """CUDA for the Triton backends on a CUDA machine; else the CPU (Triton under its interpreter)."""
    return "cuda" if backend.startswith("triton") and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- 1. double backward

def _gradient_penalty(loss_fn, h, w):
    """``d/d(h, w) of sum((dLoss/dh)^2)``: needs the gradient itself to be differentiable."""
    h, w = _leaf(h), _leaf(w)
    (gh,) = torch.autograd.grad(loss_fn(h, w), h, create_graph=True)
    gh.square().sum().backward()
    return h.grad, w.grad


def _truth_penalty(h, w, t, reduction):
    def loss_fn(h, w):
        lp, valid = _truth_logp(h, w, t)
        per_tok = torch.where(valid, -lp, torch.zeros_like(lp))
        if reduction == "none":
            return per_tok.sum()
        return per_tok.sum() / valid.sum() if reduction == "mean" else per_tok.sum()

    return _gradient_penalty(loss_fn, h.double(), w.double())


def _fused_penalty(backend, reduction):
    h, w, t = _inputs()
    dev = _dev(backend)

    def loss_fn(h, w):
        loss = fo.linear_objective_loss(h, w, t.to(dev), reduction=reduction, backend=backend)
        return loss.sum() if reduction == "none" else loss

    dh, dw = _gradient_penalty(loss_fn, h.to(dev), w.to(dev))
    return (dh.cpu(), dw.cpu()), _truth_penalty(h, w, t, reduction)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_double_backward_is_right_or_refused(fused_backend, reduction):
    # a gradient penalty: never a silently wrong number (it vanished on the gradients-in-forward path)
    try:
        (dh, dw), (th, tw) = _fused_penalty(fused_backend, reduction)
    except RuntimeError as exc:
        msg = str(exc)
        assert "double backward" in msg and "backend='reference'" in msg, msg
        # only the gradients-in-forward path may refuse; the per-token path supports it
        assert reduction != "none"
        return
    torch.testing.assert_close(dh.double(), th, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), tw, rtol=1e-4, atol=1e-6)


def test_double_backward_refused_on_gradients_in_forward_path():
    with pytest.raises(RuntimeError, match="double backward"):
        _fused_penalty("cpu", "sum")


def test_double_backward_per_token_path_and_reference():
    for backend in ("cpu", "reference"):
        (dh, dw), (th, tw) = _fused_penalty(backend, "none")
        torch.testing.assert_close(dh.double(), th, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw.double(), tw, rtol=1e-4, atol=1e-6)
    (dh, dw), (th, tw) = _fused_penalty("reference", "mean")
    torch.testing.assert_close(dh.double(), th, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), tw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transforms", [False, True], ids=["plain", "bias-scale-cap"])
def test_target_logprob_double_backward(fused_backend, transforms):
    h, w, t = _inputs()
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1)) if transforms else None
    kw = dict(logit_scale=1.5, softcap=4.0) if transforms else {}
    dev = _dev(fused_backend)
    leaves = [_leaf(x.to(dev)) for x in (h, w) + ((b,) if transforms else ())]
    lp = fo.target_logprob(leaves[0], leaves[1], t.to(dev), *leaves[2:], backend=fused_backend, **kw)
    (gh,) = torch.autograd.grad((lp * lp).sum(), leaves[0], create_graph=True)
    gh.square().sum().backward()

    l64 = [_leaf(x.double()) for x in (h, w) + ((b,) if transforms else ())]
    z = l64[0] @ l64[1].T
    if transforms:
        z = 4.0 * torch.tanh((z + l64[2]) * 1.5 / 4.0)
    valid = t != -100
    tl = torch.log_softmax(z, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    tl = torch.where(valid, tl, torch.zeros_like(tl))
    (tgh,) = torch.autograd.grad((tl * tl).sum(), l64[0], create_graph=True)
    tgh.square().sum().backward()
    for got, want in zip(leaves, l64):
        torch.testing.assert_close(got.grad.cpu().double(), want.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- 2. objectives with parameters

@pytest.mark.parametrize("backend", fo.available_backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_objective_parameters_get_gradients(backend, reduction):
    # a focal objective with a learnable gamma, on the gradients-in-forward path (mean / sum on the
    # backends that have one) as on the per-token path
    h, w, t = _inputs(N=9, seed=3)
    dev = _dev(backend)
    gamma = torch.tensor(2.0, requires_grad=True, device=dev)
    focal = lambda l: -(-torch.expm1(l)) ** gamma * l
    hh, ww = _leaf(h.to(dev)), _leaf(w.to(dev))
    loss = fo.linear_objective_loss(hh, ww, t.to(dev), objective=focal, reduction=reduction, backend=backend)
    loss.sum().backward()

    g64 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    lp, valid = _truth_logp(h, w, t)
    per_tok = torch.where(valid, -(1 - lp.exp()) ** g64 * lp, torch.zeros_like(lp))
    total = per_tok.sum() / valid.sum() if reduction == "mean" else per_tok.sum()
    total.backward()
    assert gamma.grad is not None, "the objective's own parameter got no gradient"
    torch.testing.assert_close(gamma.grad.cpu().double(), g64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.sum().cpu().double(), total.detach(), rtol=1e-5, atol=1e-7)


def test_parameter_term_keeps_an_infinite_loss_infinite():
    # the zero-valued term that carries the parameters' gradient must not turn inf into NaN
    h, w, t = _inputs()
    gamma = torch.tensor(1.0, requires_grad=True)
    obj = lambda l: gamma * (float("inf") - l)
    loss = fo.linear_objective_loss(_leaf(h), _leaf(w), t, objective=obj, reduction="sum", backend="cpu")
    assert loss.item() == float("inf"), loss


# ---------------------------------------------------------------- 5. confident tokens

@pytest.mark.parametrize("spec,truth", [
    ("neg_p", lambda l: -torch.expm1(l)),
    ("power:2", lambda l: -torch.expm1(2 * l) / 2),
    ("power:1e-9", lambda l: -torch.expm1(1e-9 * l) / 1e-9),
    ("neg_p_top:0.5", lambda l: -torch.expm1(l)),
    ("neg_p_bottom:1", lambda l: -torch.expm1(l)),
    ("unlikelihood_top:0.5", lambda l: torch.log(1 - l.exp() + 1e-3)),
])
def test_objective_values_of_confident_tokens(spec, truth):
    # 1 - p from 1e-7 to 1e-2: 1 - exp(l) in float32 is 19% off at 1 - p = 1e-7
    one_minus_p = torch.tensor([1e-7, 3e-7, 1e-6, 1e-4, 1e-2], dtype=torch.float64)
    l32 = torch.log1p(-one_minus_p).float()
    got = fo.get_objective(spec)(l32).double()
    want = truth(l32.double())
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel < 1e-5, f"{spec}: relative error {rel:.2e}"


@pytest.mark.parametrize("spec,a", [("neg_p", 1.0), ("power:2", 2.0), ("power:0.5", 0.5), ("neg_p_top:0", 1.0)])
def test_objective_gradients_of_unlikely_tokens(spec, a):
    # dLoss/dl = -p^a must stay accurate where p^a is tiny (an expm1-based value must not cost this)
    l64 = torch.tensor([1e-14, 1e-10, 1e-7, 1e-3, 0.5], dtype=torch.float64).log()
    l32 = l64.float().requires_grad_()
    fo.get_objective(spec)(l32).sum().backward()
    want = -torch.exp(a * l32.detach().double())
    rel = ((l32.grad.double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-5, f"{spec}: relative gradient error {rel:.2e}"


def test_power_tends_to_nll():
    l = torch.tensor([-3.0, -0.5, -1e-3])
    torch.testing.assert_close(fo.get_objective("power:1e-9")(l), -l, rtol=1e-6, atol=0)


@pytest.mark.parametrize("spec", ["nll", "neg_p", "nll_top:0.05", "power:3"])
def test_loss_value_independent_of_path(spec):
    # per-token path ("none", or no gradients) and gradients-in-forward path (scalar + grad)
    h, w, t = _inputs(N=40, V=50, seed=5, ignore=(0, 7))
    h = h * 2
    with_grad = fo.linear_objective_loss(_leaf(h), _leaf(w), t, objective=spec, reduction="sum", backend="cpu")
    no_grad = fo.linear_objective_loss(h, w, t, objective=spec, reduction="sum", backend="cpu")
    per_tok = fo.linear_objective_loss(_leaf(h), _leaf(w), t, objective=spec, reduction="none", backend="cpu")
    torch.testing.assert_close(with_grad.detach(), no_grad, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(per_tok.detach().sum(), no_grad, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["nll", "neg_p", "power:1e-9"])
def test_confident_token_losses_on_every_path(fused_backend, spec):
    # exactly representable logits (z_t - z_j = gap, V - 1 rivals): 1 - p from 7e-7 to 6e-10, where
    # a log(rest + e_t) or 1 - exp(l) form loses most digits; every path must give the same value
    gaps = torch.tensor([16.0, 17.0, 20.0, 23.0, 5.0])
    N, V = len(gaps), 7
    h = torch.stack([gaps, torch.ones(N)], 1)
    w = torch.zeros(V, 2)
    w[1:, 0] = -1.0
    t = torch.zeros(N, dtype=torch.long)
    lp = -torch.log1p((V - 1) * torch.exp(-gaps.double()))
    h, w, t = (x.to(_dev(fused_backend)) for x in (h, w, t))
    truth = {"nll": -lp, "neg_p": -torch.expm1(lp), "power:1e-9": -torch.expm1(1e-9 * lp) / 1e-9}[spec]
    per_tok = fo.linear_objective_loss(_leaf(h), w, t, objective=spec, reduction="none", backend=fused_backend)
    assert ((per_tok.detach().cpu().double() - truth).abs() / truth).max() < 1e-6
    for i in range(N):  # scalar losses one token at a time: with gradients (in the forward) and without
        for x in (_leaf(h[i:i + 1]), h[i:i + 1]):
            got = fo.linear_objective_loss(x, w, t[i:i + 1], objective=spec, reduction="sum", backend=fused_backend)
            assert abs(got.item() - truth[i].item()) / truth[i].item() < 1e-6, (i, x.requires_grad, got.item())


@pytest.mark.parametrize("spec,softcap,logit_scale", [("nll", None, None), ("neg_p", 30.0, None), ("nll", 5.0, 3.0)],
                         ids=["nll", "neg_p-cap30", "nll-cap5-scale3"])
def test_gradients_independent_of_path(fused_backend, spec, softcap, logit_scale):
    # reduction="sum" (gradients in the forward where the backend has that path) and "none"
    # (per-token backward) give the float64 truth's gradients to fp32 accuracy
    g = torch.Generator().manual_seed(11)
    N, H, V = 24, 16, 50
    h, w = torch.randn(N, H, generator=g) * 2, torch.randn(V, H, generator=g) / 4
    b, t = torch.randn(V, generator=g), torch.randint(0, V, (N,), generator=g)
    t[3] = -100
    x64 = [_leaf(x.double()) for x in (h, w, b)]
    z = x64[0] @ x64[1].T + x64[2]
    z = z * logit_scale if logit_scale else z
    z = softcap * torch.tanh(z / softcap) if softcap else z
    valid = t != -100
    lp = torch.log_softmax(z, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    per_tok = -lp if spec == "nll" else 1 - lp.exp()
    torch.where(valid, per_tok, torch.zeros_like(per_tok)).sum().backward()
    dev = _dev(fused_backend)
    for reduction in ("sum", "none"):
        xs = [_leaf(x.to(dev)) for x in (h, w, b)]
        loss = fo.linear_objective_loss(xs[0], xs[1], t.to(dev), xs[2], objective=spec, reduction=reduction,
                                        softcap=softcap, logit_scale=logit_scale, backend=fused_backend)
        loss.sum().backward()
        for name, x, x_64 in zip(("dh", "dw", "db"), xs, x64):
            rel = ((x.grad.cpu().double() - x_64.grad).abs().max() / x_64.grad.abs().max()).item()
            assert rel < 2e-6, f"{reduction} {name}: relative error {rel:.2e}"


# ---------------------------------------------------------------- 6. num_items_in_batch tensors

@pytest.mark.parametrize("value,exc,match", [
    (torch.tensor(-4), ValueError, ">= 0"),
    (torch.tensor(-4.0), ValueError, ">= 0"),
    (torch.tensor(True), TypeError, "bool"),
    (torch.tensor(float("nan")), ValueError, "finite"),
    (torch.tensor(float("inf")), ValueError, "finite"),
    (torch.tensor(3 + 0j), TypeError, "complex"),
    (torch.tensor(4, device="meta"), ValueError, "meta"),
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
])
def test_num_items_in_batch_validated(value, exc, match):
    h, w, t = _inputs()
    with pytest.raises(exc, match=match):
        fo.linear_objective_loss(h, w, t, num_items_in_batch=value, backend="cpu")


def test_num_items_in_batch_device_check_without_sync():
    # the on-device (CUDA) rule, exercised on CPU tensors: an invalid count makes the loss NaN
    for bad in (torch.tensor(-4), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        d = fn_mod._count_tensor(bad, torch.device("cpu"), host_check=False)
        assert torch.isnan(d), (bad, d)
    for good, want in ((torch.tensor(4), 4.0), (torch.tensor([2.5]), 2.5), (torch.tensor(0), 0.0)):
        assert fn_mod._count_tensor(good, torch.device("cpu"), host_check=False).item() == want


@pytest.mark.gpu
def test_num_items_in_batch_cuda_tensor_checked_without_sync():
    dev = torch.device("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        good = fn_mod._num_items(torch.tensor(7, device=dev), dev)
        bad = fn_mod._num_items(torch.tensor(-4, device=dev), dev)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert good.item() == 7.0 and torch.isnan(bad).item()


def test_num_items_in_batch_cpu_tensor_read_before_moving(monkeypatch):
    # the host check reads the CPU tensor itself, never a copy already on the loss's device
    reads = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append(t.device.type) or real(t))
    fn_mod._num_items(torch.tensor(7), torch.device("meta"))
    assert reads == ["cpu"]


def test_num_items_in_batch_tensor_matches_int():
    h, w, t = _inputs()
    a = fo.linear_objective_loss(h, w, t, num_items_in_batch=7, backend="cpu")
    b = fo.linear_objective_loss(h, w, t, num_items_in_batch=torch.tensor(7), backend="cpu")
    assert a.item() == b.item()


# ---------------------------------------------------------------- 7. pickling

@pytest.mark.parametrize("spec", ["nll", "nll_top:0.2", "power:10", "neg_power:2", "neg_p_bottom:0.5",
                                  "unlikelihood_top:0.3", "dft"])
def test_module_pickles(spec):
    h, w, t = _inputs(N=12, seed=4)
    h = h * 3  # a spread of p across the gates
    mod = fo.LinearObjectiveLoss(spec, backend="cpu", softcap=20.0)
    want = mod(h, w, t)
    for loaded in (pickle.loads(pickle.dumps(mod)), _torch_roundtrip(mod)):
        assert loaded.objective.name == mod.objective.name
        assert loaded(h, w, t).item() == want.item()


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_registered_parametric_objective_pickles(monkeypatch):
    from fused_objectives import objectives as objectives_mod

    monkeypatch.setattr(objectives_mod, "_USER", {})
    fo.register_objective("hard_focal", _focal_loss, gate=_below, takes_param=True)
    obj = fo.get_objective("hard_focal:0.7")
    back = pickle.loads(pickle.dumps(obj))
    l = torch.tensor([-0.1, -2.0])
    assert torch.equal(back(l), obj(l))


def _focal_loss(l, g):
    return -(-torch.expm1(l)) ** g * l


def _below(p, g):
    return p < g


# ---------------------------------------------------------------- 8. validation at construction

@pytest.mark.parametrize("kw,exc,match", [
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
    (dict(backend=3), TypeError, "backend must be a string"),
    (dict(softcap=-1), ValueError, "softcap must be"),
    (dict(logit_scale=float("nan")), ValueError, "logit_scale must be"),
    (dict(ignore_index="x"), TypeError, "ignore_index must be an int"),
    (dict(ignore_index=2**70), ValueError, "int64"),
    (dict(shift="yes"), TypeError, "shift must be a bool"),
    (dict(return_stats=1), TypeError, "return_stats must be a bool"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
])
def test_module_validates_everything_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        fo.LinearObjectiveLoss("nll", **kw)


def test_validate_options_helper():
    fo.functional.validate_options(backend="cpu", softcap=30.0, ignore_index=-1, objective="neg_p")
    with pytest.raises(ValueError, match="unknown backend 'cpux'"):
        fo.functional.validate_options(backend="cpux")
    with pytest.raises(ValueError, match="unknown objective"):
        fo.functional.validate_options(objective="nope_not_registered")


# ---------------------------------------------------------------- 9. clear errors

def test_gate_returning_floats():
    obj = fo.Objective("float_gate", lambda l: -l, gate=lambda p: (p > 0.5).float())
    h, w, t = _inputs()
    with pytest.raises(TypeError, match="gate of objective 'float_gate' must return a bool tensor"):
        fo.linear_objective_loss(h, w, t, objective=obj, backend="cpu")


def test_gate_of_wrong_shape():
    obj = fo.Objective("short_gate", lambda l: -l, gate=lambda p: p[:2] > 0.5)
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="gate of objective 'short_gate' must return .* shaped like"):
        fo.linear_objective_loss(h, w, t, objective=obj, backend="reference")


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_meta_inputs(which):
    h, w, t = _inputs()
    if which == "hidden":
        h, w, t = h.to("meta"), w.to("meta"), t.to("meta")
    else:
        w = w.to("meta")
    for backend in ("auto", "reference", "cpu"):
        with pytest.raises(ValueError, match="meta tensor"):
            fo.linear_objective_loss(h, w, t, backend=backend)


def test_huge_ignore_index():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="ignore_index .* int64"):
        fo.linear_objective_loss(h, w, t, ignore_index=2**70, backend="cpu")


# ---------------------------------------------------------------- 10. reference backend under autocast

def test_reference_backward_is_fp32_under_autocast():
    h, w, t = _inputs(N=32, H=64, V=300, seed=2, ignore=())
    hh, ww = _leaf(h), _leaf(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fo.linear_objective_loss(hh, ww, t, backend="reference")
        loss.backward()
    h64, w64 = _leaf(h.double()), _leaf(w.double())
    lp, _ = _truth_logp(h64, w64, t)
    (-lp.mean()).backward()
    for got, want in ((hh.grad, h64.grad), (ww.grad, w64.grad)):
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert rel < 1e-5, f"relative gradient error {rel:.2e} (bf16 backward GEMMs?)"


# ---------------------------------------------------------------- 12. fp16 needs a loss scaler

@pytest.mark.parametrize("backend", fo.available_backends())
def test_fp16_small_gradients_need_a_loss_scale(backend):
    # unlikely targets (p ~ 1e-9) averaged over the tokens: dLoss/dh ~ p / N * |w| lies below
    # fp16's smallest subnormal (6e-8) and rounds to 0 unless the loss is scaled (as GradScaler does)
    N, H, V = 16, 16, 32
    h, w, _ = _inputs(N=N, H=H, V=V, seed=7, ignore=())
    h16, w16 = (h * 5).half(), w.half()
    t = (h16.double() @ w16.double().T).argmin(dim=1)
    scale = 2.0**24
    grads = {}
    dev = _dev(backend)
    for s in (1.0, scale):
        hh = _leaf(h16.to(dev))
        (fo.linear_objective_loss(hh, w16.to(dev), t.to(dev), objective="neg_p", backend=backend) * s).backward()
        grads[s] = hh.grad.cpu().double() / s
    h64 = _leaf(h16.double())
    lp, _ = _truth_logp(h64, w16.double(), t)
    (1 - lp.exp()).mean().backward()  # float64; expm1's autograd derivative would round here
    truth = h64.grad
    # below half of fp16's smallest subnormal (6e-8): every correctly rounded fp16 gradient is 0
    assert 0 < truth.abs().max() < 2.9e-8, truth.abs().max()
    assert grads[1.0].abs().max() == 0  # all lost to underflow without a scale
    err = ((grads[scale] - truth).abs().max() / truth.abs().max()).item()
    assert err < 2e-3, err


@pytest.mark.parametrize("backend", ["cpu", "triton_chunked"])
def test_gradients_in_forward_scaled_in_place_once(backend):
    """The stored gradients are scaled in place (no gradient-sized copy): right for one backward
    with any upstream scalar, and a second backward through the same loss is refused by name."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (9,), generator=g)
    loss = fo.linear_objective_loss(h, w, t, objective="neg_p", backend=backend)
    (loss * -2.5).backward(retain_graph=True)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    p = torch.log_softmax(h64 @ w64.T, -1).gather(1, t[:, None]).exp()
    ((1 - p).mean() * -2.5).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
