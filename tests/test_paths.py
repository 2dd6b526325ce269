"""Every fused backend's code paths against the independent float64 truth (tests/truth.py).

Matrix: backend (conftest.FUSED_BACKENDS) x call path x logit case x chunking.
- call paths: a scalar loss with gradients (the CPU backend computes them in its forward), a
  per-token loss with per-token upstream gradients and ``target_logprob`` with upstream gradients
  (both through the backend's backward), and a no-grad forward;
- logit cases: a bias; bias + logit scale + shift; bias + soft-cap with tokens kept by a gate; a
  gate that keeps some tokens and drops others (normalised over kept tokens);
- chunking: the default, and settings that force merges (CPU: tiny byte budgets, so many token and
  vocabulary tiles; Triton: one vocabulary split, so the fused forward merges every tile in its
  loop, where the default under the interpreter's small blocks is one split per tile merged by the
  launcher; 8-token chunks for the chunked strategy, whose row kernel already walks 2 vocabulary
  blocks under the interpreter).
Each case checks the loss and every gradient: no worse than same-dtype PyTorch (itself independent
of the package) plus 4 fp32 eps of the largest entry.
"""
import pytest
import torch

import fused_objectives as fo
from fused_objectives.backends import cpu as cpu_backend
from fused_objectives.kernels import configs
from helpers import assert_no_worse, device_for, make_inputs, naive_same_dtype, run, to_cpu, to_device
from truth import truth

KB = 1024
MODES = ["scalar", "per_token", "logprob", "nograd"]
CASES = {
    "bias": dict(inputs=dict(bias=True, peaked=4.0), kw=dict(objective="neg_p")),
    "scale-shift": dict(inputs=dict(bias=True, peaked=4.0, lead=(3, 13)),
                        kw=dict(objective="power:3", logit_scale=0.6, shift=True)),
    "softcap-kept": dict(inputs=dict(bias=True, peaked=6.0), kw=dict(objective="nll_top:0.2", softcap=8.0)),
    "gate-kept": dict(inputs=dict(peaked=6.0), kw=dict(objective="neg_p_bottom:0.5", normalize="kept")),
}
GATED = {"softcap-kept", "gate-kept"}


def _identity(l):
    return l


@pytest.fixture(params=["default", "merges"])
def chunking(request, fused_backend, monkeypatch):
    if request.param == "merges":
        if fused_backend == "cpu":
            # 2 KB budget, 256-byte tiles: several token rows and vocabulary columns per pass
            monkeypatch.setattr(cpu_backend.BACKEND, "budget_bytes", 2 * KB)
            monkeypatch.setattr(cpu_backend.BACKEND, "tile_bytes", 256)
        elif fused_backend.startswith("triton"):
            # fused tiles: one vocabulary split, so the forward merges its online state over every
            # tile in its loop (the default under the interpreter's small blocks is one split per
            # tile, merged by the launcher); chunked: 8-token chunks (a 3,200-byte buffer at V = 100)
            for knob, value in (("TARGET_PROGRAMS", 1), ("CHUNK_BUDGET_BYTES", 8 * 100 * 4)):
                if hasattr(configs, knob):
                    monkeypatch.setattr(configs, knob, value)
    return request.param


def _assert_chunks_merge(backend, h, w, t):
    """The 'merges' settings really split the work (else the case would test one tile)."""
    if backend != "cpu":
        return
    n = int((t != -100).sum())
    V, H = w.shape
    rows, cols = cpu_backend.plan_chunks(n, V, H, True, True, cpu_backend.BACKEND.budget_bytes,
                                         cpu_backend.BACKEND.tile_bytes)
    assert rows < n and cols < V, (rows, cols, n, V)
    assert cpu_backend.BACKEND.budget_bytes // (4 * V * 2) < n  # the gradient-in-forward chunks too


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_path(fused_backend, chunking, mode, case):
    spec = CASES[case]
    h, w, t, b = make_inputs(N=37, H=19, V=100, **spec["inputs"])
    kw = dict(spec["kw"])
    if chunking == "merges":
        _assert_chunks_merge(fused_backend, h, w, t)
    if case in GATED:
        d = truth(h, w, t, b, grads=False, details=True, **kw)
        n_kept, n_valid = int(d["kept"].sum()), int(d["valid"].sum())
        assert 0 < n_kept < n_valid, f"the gate should keep some tokens and drop some: {n_kept}/{n_valid}"
    up = None
    if mode in ("per_token", "logprob"):
        up = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    if mode == "per_token":
        kw.update(reduction="none")
    if mode == "logprob":
        # d(sum(up * log p)): the backend's backward with arbitrary per-token coefficients
        kw = {k: v for k, v in kw.items() if k in ("softcap", "logit_scale", "shift")}
        dev = device_for(fused_backend)
        hd, wd, bd, td = to_device(dev, h, w, b, t)
        hh, ww = hd.clone().requires_grad_(), wd.clone().requires_grad_()
        bb = bd.clone().requires_grad_() if bd is not None else None
        lp = fo.target_logprob(hh, ww, td, bb, backend=fused_backend, **kw)
        (lp * up.to(dev)).sum().backward()
        fused = to_cpu({"loss": lp.detach(), "dh": hh.grad, "dw": ww.grad, "db": None if bb is None else bb.grad})
        kw.update(objective=_identity, reduction="none")
    else:
        dev = device_for(fused_backend)
        hd, wd, td, bd = to_device(dev, h, w, t, b)
        with torch.set_grad_enabled(mode != "nograd"):
            fused = to_cpu(run(hd, wd, td, bd, backend=fused_backend, upstream=None if up is None else up.to(dev),
                               grads=mode != "nograd", **kw))
    grads = mode != "nograd"
    base = naive_same_dtype(h, w, t, b, upstream=up, **kw)
    want = truth(h, w, t, b, upstream=up, grads=grads, **kw)
    if not grads:
        base = {"loss": base["loss"]}
    assert want["loss"].abs().max() > 0
    assert_no_worse(fused, base, want, what=f"[{fused_backend} {mode} {case} {chunking}] ")
