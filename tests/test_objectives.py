"""The objective registry: formulas, gradient weights, gates, spec parsing, user objectives."""
import math

import pytest
import torch

import fused_objectives as fo
from fused_objectives import objectives as objectives_mod

EPS_U = 1e-3
# spec -> (loss(p) on kept tokens, gradient weight s(p) = -dloss/dlogp, gate(p) or None)
FORMULAS = {
    "nll": (lambda p: -torch.log(p), lambda p: torch.ones_like(p), None),
    "neg_p": (lambda p: 1 - p, lambda p: p, None),
    "power:10": (lambda p: (1 - p**10) / 10, lambda p: p**10, None),
    "power:0.5": (lambda p: (1 - p**0.5) / 0.5, lambda p: p**0.5, None),
    "neg_power:3": (lambda p: -(p**3) / 3, lambda p: p**3, None),
    "nll_top:0.2": (lambda p: -torch.log(p), lambda p: torch.ones_like(p), lambda p: p >= 0.2),
    "nll_bottom:0.3": (lambda p: -torch.log(p), lambda p: torch.ones_like(p), lambda p: p <= 0.3),
    "neg_p_top:0.4": (lambda p: 1 - p, lambda p: p, lambda p: p >= 0.4),
    "neg_p_bottom:0.6": (lambda p: 1 - p, lambda p: p, lambda p: p <= 0.6),
    "unlikelihood_top:0.5": (lambda p: torch.log(1 - p + EPS_U), lambda p: p / (1 - p + EPS_U), lambda p: p >= 0.5),
    "unlikelihood_bottom:0.5": (lambda p: torch.log(1 - p + EPS_U), lambda p: p / (1 - p + EPS_U), lambda p: p <= 0.5),
    "dft": (lambda p: -p * torch.log(p), lambda p: p, None),
}


@pytest.mark.parametrize("spec", list(FORMULAS))
def test_formula_and_gradient_weight(spec):
    loss_fn, weight_fn, gate_fn = FORMULAS[spec]
    p = torch.tensor([1e-6, 0.01, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.999, 1.0], dtype=torch.float64)
    logp = p.log().requires_grad_()
    valid = torch.ones_like(p, dtype=torch.bool)
    per_tok, kept = fo.get_objective(spec).per_token(logp, valid)
    want_kept = gate_fn(p) if gate_fn else valid
    assert torch.equal(kept, want_kept)
    want = torch.where(want_kept, loss_fn(p), torch.zeros_like(p))
    torch.testing.assert_close(per_tok.detach(), want, rtol=1e-12, atol=1e-12)
    per_tok.sum().backward()
    want_grad = torch.where(want_kept, -weight_fn(p), torch.zeros_like(p))
    torch.testing.assert_close(logp.grad, want_grad, rtol=1e-9, atol=1e-12)


# dft's stop-gradient makes its analytic gradient differ from the numeric one by design; its
# gradient weight is checked in test_formula_and_gradient_weight.
@pytest.mark.parametrize("spec", [s for s in FORMULAS if s != "dft"])
def test_gradcheck_float64(spec):
    obj = fo.get_objective(spec)
    # away from the gate thresholds, where the gated function is smooth
    logp = torch.tensor([0.07, 0.15, 0.35, 0.45, 0.55, 0.8, 0.95], dtype=torch.float64).log().requires_grad_()
    valid = torch.tensor([True, True, True, False, True, True, True])
    assert torch.autograd.gradcheck(lambda l: obj.per_token(l, valid)[0], (logp,))


def test_gates_are_inclusive():
    p = torch.tensor([0.2, 0.2 - 1e-9, 0.2 + 1e-9], dtype=torch.float64)
    assert fo.get_objective("nll_top:0.2").gate(p).tolist() == [True, False, True]
    assert fo.get_objective("nll_bottom:0.2").gate(p).tolist() == [True, True, False]


def test_invalid_tokens_are_zero_and_gradient_free_even_for_singular_functions():
    # log(1 - p) is singular at p = 1 (logp = 0, the value stored at invalid positions)
    obj = fo.Objective("singular", lambda l: torch.log1p(-l.exp()))
    logp = torch.tensor([0.0, math.log(0.3)], requires_grad=True)
    per_tok, kept = obj.per_token(logp, torch.tensor([False, True]))
    per_tok.sum().backward()
    assert per_tok[0].item() == 0.0 and torch.isfinite(logp.grad).all() and logp.grad[0].item() == 0.0


def test_nan_is_kept_by_gates():
    logp = torch.tensor([float("nan"), math.log(0.5)])
    per_tok, kept = fo.get_objective("nll_top:0.9").per_token(logp, torch.tensor([True, True]))
    assert kept.tolist() == [True, False]
    assert torch.isnan(per_tok[0])


@pytest.mark.parametrize("alias,canonical", [
    ("original", "nll"), ("logp", "nll"), ("p", "neg_p"), ("GeneralFamily-10", "power:10"),
    ("convexity-2", "neg_power:2"), ("OnlyTopP-0.2", "neg_p_top:0.2"), ("OnlyBottomP-0.3", "neg_p_bottom:0.3"),
    ("OnlyTopLogP-0.2", "nll_top:0.2"), ("OnlyBottomLogP-0.1", "nll_bottom:0.1"),
    ("UnlikehoodTop-0.5", "unlikelihood_top:0.5"), ("UnlikehoodBottom-0.5", "unlikelihood_bottom:0.5"),
    ("power:1e-1", "power:0.1"), (" neg_p ", "neg_p"),
])
def test_aliases(alias, canonical):
    assert fo.get_objective(alias).name == canonical


@pytest.mark.parametrize("spec,match", [
    ("power:-1", "must be > 0"), ("power:0", "must be > 0"), ("nll_top:1.5", r"in \[0, 1\]"),
    ("nll_top:-0.1", r"in \[0, 1\]"), ("power:abc", "not a number"), ("power:nan", "finite"),
    ("power", "needs a parameter"), ("power:", "needs a parameter"), ("nll:3", "takes no parameter"),
    ("no_such_objective", "unknown objective"), ("GeneralFamily-x", "not a number"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        fo.get_objective(spec)


def test_bad_spec_type():
    with pytest.raises(TypeError, match="objective must be"):
        fo.get_objective(3)


def test_register_objective(monkeypatch):
    monkeypatch.setattr(objectives_mod, "_USER", {})
    fo.register_objective("focal", lambda l, g: -((1 - l.exp()) ** g) * l, takes_param=True)
    fo.register_objective("sq", lambda l: l**2, gate=lambda p: p < 0.5)
    obj = fo.get_objective("focal:2")
    l = torch.tensor([math.log(0.5)])
    assert obj.name == "focal:2" and torch.allclose(obj(l), torch.tensor([0.25 * math.log(2)]))
    assert fo.get_objective("sq").gate(torch.tensor([0.4, 0.6])).tolist() == [True, False]
    assert "focal:x" in fo.list_objectives() and "sq" in fo.list_objectives()
    with pytest.raises(ValueError, match="already registered"):
        fo.register_objective("sq", lambda l: l)
    fo.register_objective("sq", lambda l: -l, overwrite=True)
    with pytest.raises(ValueError, match="built-in"):
        fo.register_objective("nll", lambda l: l)
    with pytest.raises(ValueError, match="built-in"):
        fo.register_objective("GeneralFamily", lambda l: l)
    with pytest.raises(ValueError, match="identifier"):
        fo.register_objective("my-obj", lambda l: l)
    with pytest.raises(TypeError, match="callable"):
        fo.register_objective("x", 3)
    with pytest.raises(ValueError, match="takes a parameter"):
        fo.get_objective("focal")
    with pytest.raises(ValueError, match="takes no parameter"):
        fo.get_objective("sq:1")


def test_callable_objective_and_bad_return():
    obj = fo.get_objective(lambda l: -l)
    assert torch.equal(obj(torch.tensor([-1.0, -2.0])), torch.tensor([1.0, 2.0]))
    bad = fo.get_objective(lambda l: l.sum())
    with pytest.raises(ValueError, match="shaped like its input"):
        bad(torch.tensor([-1.0, -2.0]))


def test_repr_states_formula():
    assert "p^10" in repr(fo.get_objective("power:10"))
    assert "1[p >= 0.2]" in repr(fo.get_objective("nll_top:0.2"))


# ---- the tests' own float64 truth (tests/truth.py) against independent computations ----------
import torch.nn.functional as F  # noqa: E402

import truth as T  # noqa: E402
from helpers import make_inputs, naive_same_dtype  # noqa: E402


@pytest.mark.parametrize("spec", list(FORMULAS))
def test_truth_objectives_follow_the_formula_table(spec):
    """The truth's objectives against this file's p-based formulas (values, kept mask, dLoss/dl)."""
    loss_fn, weight_fn, gate_fn = FORMULAS[spec]
    p = torch.tensor([1e-6, 0.01, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.999], dtype=torch.float64)
    l = p.log().requires_grad_()
    per_tok, kept = T.per_token(spec, l, torch.ones_like(p, dtype=torch.bool))
    want_kept = gate_fn(p) if gate_fn else torch.ones_like(p, dtype=torch.bool)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(per_tok.detach(), torch.where(want_kept, loss_fn(p), 0.0), rtol=1e-12, atol=1e-12)
    per_tok.sum().backward()
    torch.testing.assert_close(l.grad, torch.where(want_kept, -weight_fn(p), 0.0), rtol=1e-9, atol=1e-12)


def test_truth_nll_equals_cross_entropy_with_transforms():
    """nll mean/sum/none with bias, scale, soft-cap and shift: F.cross_entropy on logits built by hand."""
    h, w, t, b = make_inputs(lead=(3, 9), bias=True, peaked=4.0, device="cpu")
    z = ((h.double() @ w.double().T + b.double()) * 0.7)
    z = 5.0 * torch.tanh(z / 5.0)
    tt = torch.cat([t[:, 1:], torch.full_like(t[:, :1], -100)], 1)
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(z.reshape(-1, z.shape[-1]), tt.reshape(-1), ignore_index=-100, reduction=reduction)
        got = T.truth(h, w, t, b, objective="nll", reduction=reduction, softcap=5.0, logit_scale=0.7, shift=True,
                      grads=False)["loss"]
        torch.testing.assert_close(got.reshape(-1) if reduction == "none" else got,
                                   want.reshape(-1) if reduction == "none" else want, rtol=1e-12, atol=1e-12)


def test_truth_normalisations_and_gradients_by_hand():
    """kept / valid / num_items denominators, the empty case, and dLoss/dz = c (onehot - softmax)."""
    h, w, t, _ = make_inputs(N=30, peaked=6.0, device="cpu")
    d = T.truth(h, w, t, objective="nll_top:0.3", reduction="none", grads=False, details=True)
    per, kept, valid = d["loss"], d["kept"], d["valid"]
    assert 0 < kept.sum() < valid.sum()
    for normalize, denom in (("valid", valid.sum()), ("kept", kept.sum())):
        got = T.truth(h, w, t, objective="nll_top:0.3", normalize=normalize, grads=False)["loss"]
        torch.testing.assert_close(got, per.sum() / denom, rtol=1e-14, atol=0)
    got = T.truth(h, w, t, objective="nll_top:0.3", num_items_in_batch=7, grads=False)["loss"]
    torch.testing.assert_close(got, per.sum() / 7, rtol=1e-14, atol=0)
    empty = T.truth(h, w, t, objective="nll_top:1.0", normalize="kept")
    assert empty["loss"].item() == 0 and torch.all(empty["dw"] == 0)
    # gradient on the logits by the formula: dh = sum_j dz_j w_j with dz = c (onehot - softmax) / n
    out = T.truth(h, w, t, objective="neg_p")
    z = h.double() @ w.double().T
    sm = torch.softmax(z, -1)
    tv = torch.where(valid, t, 0)
    p = sm.gather(1, tv[:, None])[:, 0]
    c = torch.where(valid, -p, 0.0) / valid.sum()  # d(1 - p)/dl = -p
    dz = c[:, None] * (F.one_hot(tv, z.shape[1]).double() - sm)
    torch.testing.assert_close(out["dh"], dz @ w.double(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out["dw"], dz.T @ h.double(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("spec", ["nll", "neg_p", "power:10", "neg_power:2", "nll_top:0.3", "neg_p_bottom:0.6",
                                  "unlikelihood_top:0.4", "dft"])
@pytest.mark.parametrize("opts", [dict(), dict(reduction="sum", softcap=12.0), dict(normalize="kept", logit_scale=0.6),
                                  dict(reduction="none", shift=True)], ids=["mean", "sum-softcap", "kept-scale",
                                                                             "none-shift"])
def test_truth_agrees_with_naive_fp32(spec, opts):
    """Where both apply (fp32 inputs, tokens not at a gate's edge), the float64 truth and the naive
    same-dtype computation agree to fp32 accuracy: neither has a formula the other lacks."""
    h, w, t, b = make_inputs(lead=(2, 17), bias=True, peaked=5.0, device="cpu")
    if opts.get("shift"):
        # hidden[t] is peaked toward target[t]: move the targets one step later, so that after the
        # shift each position predicts its own peaked target again (gates then keep tokens)
        t = torch.cat([torch.full_like(t[:, :1], -100), t[:, :-1]], 1)
    up = torch.randn(t.shape) if opts.get("reduction") == "none" else None
    want = T.truth(h, w, t, b, objective=spec, upstream=up, **opts)
    got = naive_same_dtype(h, w, t, b, objective=spec, upstream=up, **opts)
    for key in ("loss", "dh", "dw", "db"):
        scale = want[key].abs().max().item()
        assert scale > 0, key
        err = (got[key].double() - want[key]).abs().max().item()
        # naive fp32 loses digits near p = 1 (1 - p by subtraction; unlikelihood divides by 1 - p + 1e-3):
        # measured up to 1.2e-4 of the scale; a wrong formula or reduction is off by far more
        assert err <= 5e-4 * scale, f"{key}: naive fp32 vs truth {err:.2e} (scale {scale:.2e})"


def test_truth_imports_nothing_from_the_package():
    """tests/truth.py must stay independent: no import of fused_objectives, directly or by name."""
    import ast

    tree = ast.parse(open(T.__file__).read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] in ("fused_objectives", "helpers")], names
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "__import__" not in calls and "importlib" not in names
