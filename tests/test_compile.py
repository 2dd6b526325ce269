"""torch.compile(fullgraph=True) around the fused loss on CPU (issue 13, item 2).

The compiled loss and its gradients equal eager and a float64 truth written here from the
definition; the CPU target-range check still raises inside a compiled graph; a fresh process can
compile before any eager call (the C++ kernels' loader runs once at trace time, not in the graph).
"""
import os
import subprocess
import sys

import pytest
import torch

import fused_objectives as fo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def truth64(hidden, weight, target, bias, objective, reduction, softcap, logit_scale, ignore_index=-100):
    """The definition in float64: log_softmax of the (scaled, soft-capped) logits at the target."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    lp = torch.log_softmax(z, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    per = -lp if objective == "nll" else 1 - lp.exp()  # neg_p: 1 - p
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    return per.sum() / valid.sum() if reduction == "mean" else per.sum()


def inputs(seed=0, B=2, T=7, H=24, V=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :2] = -100
    return h, w, b, t


def grads_of(fn, h, w, b, t, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    hh, ww = leaves[:2]
    bb = leaves[2] if b is not None else None
    loss = fn(hh, ww, bb, t)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [x.grad for x in leaves]


CASES = [  # backend, objective, reduction, bias, softcap, logit_scale
    ("auto", "neg_p", "mean", False, None, None),  # CPU: 'auto' -> 'cpu', eager takes gradients-in-forward
    ("auto", "nll", "none", True, 3.0, 0.7),
    ("reference", "neg_p", "sum", False, None, None),
]


@pytest.mark.parametrize("backend,objective,reduction,bias,softcap,logit_scale", CASES)
def test_fullgraph_loss_equals_eager_and_truth(backend, objective, reduction, bias, softcap, logit_scale):
    torch._dynamo.reset()
    h, w, b, t = inputs(bias=bias)
    kw = dict(objective=objective, reduction=reduction, softcap=softcap, logit_scale=logit_scale, backend=backend)

    def loss_fn(h, w, b, t):
        return fo.linear_objective_loss(h, w, t, b, **kw)

    upstream = torch.linspace(0.5, 1.5, t.numel()).reshape(t.shape) if reduction == "none" else torch.tensor(1.0)
    compiled = grads_of(torch.compile(loss_fn, fullgraph=True), h, w, b, t, upstream)
    eager = grads_of(loss_fn, h, w, b, t, upstream)
    exact = grads_of(lambda h, w, b, t: truth64(h.double(), w.double(), t, None if b is None else b.double(),
                                                objective, reduction, softcap, logit_scale),
                     h.double(), w.double(), None if b is None else b.double(), t, upstream.double())
    for c, e, x in zip(compiled, eager, exact):
        assert c.dtype == e.dtype
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.double(), x, rtol=1e-4, atol=1e-6)


def test_range_check_raises_inside_compiled_graph():
    torch._dynamo.reset()
    h, w, b, t = inputs()
    fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t, objective="neg_p"), fullgraph=True)
    fn(h, w, t)  # compiles; in range
    bad = t.clone()
    bad[1, 3] = w.shape[0]  # V: one past the vocabulary
    with pytest.raises(ValueError, match=r"target holds 50 at flat position 10, outside \[0, 50\)"):
        fn(h, w, bad)
    bad[1, 3] = -7
    with pytest.raises(ValueError, match=r"target holds -7 at flat position 10"):
        fn(h.requires_grad_(), w, bad)


FRESH = r"""
import torch, fused_objectives as fo
g = torch.Generator().manual_seed(0)
h = torch.randn(3, 16, generator=g, requires_grad=True); w = torch.randn(40, 16, generator=g, requires_grad=True)
t = torch.randint(0, 40, (3,), generator=g)
fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t), fullgraph=True, backend="aot_eager")
loss = fn(h, w, t); loss.backward()
ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, t)
assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
print("ok", loss.item())
"""


def test_fullgraph_in_fresh_process_before_any_eager_call():
    # the first use of backend 'cpu' happens while tracing: the loader must not end up in the graph
    env = dict(os.environ, FUSED_OBJECTIVES_QUIET="1")
    res = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")
