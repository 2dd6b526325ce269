"""``LossStats.lse`` / ``entropy`` / ``predicted``: row statistics of the final logits from the same
pass as the loss, on every backend and call path, against float64 truth on materialised logits.

Matrix: backend (reference + every fused backend) x chunking (default; merges forced as in
tests/test_paths.py: tiny CPU budgets, one Triton vocabulary split / 8-token chunks) x call path
(scalar loss with gradients: the gradients-in-forward path where the backend has one; per-token
loss with gradients; no-grad forward) x logit case (plain; bias + logit scale + soft-cap with a
shifted 2-D target).  Ignored tokens (0 / ignore_index there) and exact ties (a zero hidden state:
all logits equal, or equal to a bias with a repeated maximum) are in every case.
"""
import pytest
import torch

import fused_objectives as fo
from fused_objectives.backends import cpu as cpu_backend
from fused_objectives.kernels import configs
from helpers import make_inputs
from truth import logits64, shifted

KB = 1024
BACKENDS = ["reference", "cpu", "triton", "triton_chunked", "triton_fused"]
CASES = {
    "plain": dict(inputs=dict(N=14), kw=dict()),
    "bias-scale-cap": dict(inputs=dict(lead=(2, 7), bias=True), kw=dict(logit_scale=0.7, softcap=4.0, shift=True)),
}
MODES = ["scalar", "none", "nograd"]
IGNORE = -7  # not the default, so the 'predicted' fill value is the caller's


@pytest.fixture(params=["default", "merges"])
def chunking(request, monkeypatch):
    if request.param == "merges":
        monkeypatch.setattr(cpu_backend.BACKEND, "budget_bytes", 2 * KB)
        monkeypatch.setattr(cpu_backend.BACKEND, "tile_bytes", 256)
        for knob, value in (("TARGET_PROGRAMS", 1), ("CHUNK_BUDGET_BYTES", 8 * 100 * 4)):
            if hasattr(configs, knob):
                monkeypatch.setattr(configs, knob, value)
    return request.param


def _inputs(case):
    spec = CASES[case]
    h, w, t, b = make_inputs(H=8, V=100, peaked=6.0, **spec["inputs"])
    t = torch.where(t == -100, torch.full_like(t, IGNORE), t)
    h2 = h.view(-1, h.shape[-1])
    t2 = t.view(-1)
    # an exact tie: a zero hidden state has equal logits, or the bias's repeated maximum
    h2[1] = 0.0
    if b is not None:
        b[7] = b[40] = b.max() + 1.0
    t2[1] = 3
    t2[2] = 5  # position 1's target after a shift
    t2[4] = IGNORE
    return h, w, t, b, spec["kw"]


def _truth(h, w, t, b, logit_scale=None, softcap=None, shift=False, ignore=IGNORE):
    """float64 ``(lse, entropy, argmax, valid, z)`` per position, on materialised logits."""
    z = logits64(h, w, b, softcap=softcap, logit_scale=logit_scale)
    if shift:
        t = shifted(t, ignore)
    logq = torch.log_softmax(z, dim=-1)
    entropy = -(logq.exp() * logq).sum(dim=-1)
    return torch.logsumexp(z, dim=-1), entropy, z.argmax(dim=-1), t != ignore, z


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stats(backend, chunking, mode, case):
    h, w, t, b, kw = _inputs(case)
    lse, ent, amax, valid, z = _truth(h, w, t, b, **kw)
    grads = mode != "nograd"
    hh = h.clone().requires_grad_(grads)
    ww = w.clone().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        loss, st = fo.linear_objective_loss(hh, ww, t, b, objective="neg_p", ignore_index=IGNORE, backend=backend,
                                            reduction="none" if mode == "none" else "mean", return_stats=True, **kw)
    for name in ("lse", "entropy", "predicted"):
        assert getattr(st, name).shape == t.shape, name
        assert not getattr(st, name).requires_grad
    assert st["entropy"] is st.entropy
    assert torch.equal(st.valid, valid)
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(st.lse.double(), torch.where(valid, lse, zero), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(st.entropy.double(), torch.where(valid, ent, zero), rtol=1e-5, atol=5e-6)
    if case == "plain":  # confident rows (1 - p tiny) and flat ones; the soft-cap bounds the logits
        assert (st.entropy[valid] < 0.05).any() and (st.entropy[valid] > 1.0).any()
    # argmax: the first index of an exact tie (position 1); elsewhere float64's unless two logits are
    # closer than fp32 can tell apart, where the chosen one must be within that gap of the max
    assert torch.equal(st.predicted[~valid], torch.full_like(st.predicted[~valid], IGNORE))
    pred = st.predicted.view(-1)
    flat_valid = valid.view(-1)
    assert bool(flat_valid[1]) and int(pred[1]) == int(amax.view(-1)[1]) == (7 if b is not None else 0)
    z2 = z.view(-1, z.shape[-1])
    safe = torch.where(flat_valid, pred, torch.zeros_like(pred))
    gap = z2.max(dim=-1).values - z2.gather(1, safe[:, None])[:, 0]
    assert torch.all(~flat_valid | (pred == amax.view(-1)) | (gap < 1e-5)), (pred, amax)
    if grads:
        # the statistics change neither the loss nor the gradients
        h0 = h.clone().requires_grad_()
        w0 = w.clone().requires_grad_()
        loss0 = fo.linear_objective_loss(h0, w0, t, b, objective="neg_p", ignore_index=IGNORE, backend=backend,
                                         reduction="none" if mode == "none" else "mean", **kw)
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        loss.sum().backward()
        loss0.sum().backward()
        torch.testing.assert_close(hh.grad, h0.grad, rtol=0, atol=0)
        torch.testing.assert_close(ww.grad, w0.grad, rtol=0, atol=0)


def test_row_stats_no_valid_token():
    h, w, t, b = make_inputs(N=4, H=8, V=100)
    t = torch.full_like(t, -100)
    for backend in ("reference", "cpu", "triton_fused"):
        _, st = fo.linear_objective_loss(h, w, t, b, backend=backend, return_stats=True)
        assert torch.equal(st.lse, torch.zeros(4)) and torch.equal(st.entropy, torch.zeros(4))
        assert torch.equal(st.predicted, torch.full((4,), -100))


def test_trl_fused_lm_head_entropy_is_the_real_entropy():
    """TRL's SFTTrainer reads ``entropy`` from ``model(..., fused_lm_head=True)`` and logs
    ``entropy.sum() / label_mask.sum()``: under the patch it is each token's softmax entropy
    (0 where the label is ignored, as TRL's own fused head gives), not NaN."""
    pytest.importorskip("transformers")
    from test_hf_patch import batch, tiny

    m = tiny()
    inputs = batch()
    fo.patch_model(m, objective="neg_p")
    out = m(**inputs, fused_lm_head=True)
    with torch.no_grad():
        logits = m(input_ids=inputs["input_ids"]).logits.double()[:, :-1]
    logq = torch.log_softmax(logits, -1)
    ent = -(logq.exp() * logq).sum(-1)
    valid = inputs["labels"][:, 1:] != -100
    assert out.entropy.shape == (2, 7) and not out.entropy.isnan().any()
    torch.testing.assert_close(out.entropy.double(), torch.where(valid, ent, torch.zeros_like(ent)),
                               rtol=1e-5, atol=1e-6)
    metric = out.entropy.sum() / out.label_mask.sum()
    torch.testing.assert_close(metric.double(), ent[valid].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted({k for k, v in vars(configs).items() if k.startswith("FORWARD_ENTROPY_")}))
def test_entropy_forward_gpu_configs(monkeypatch, name):
    """The entropy forward's own GPU tile configs (configs.ENTROPY_FORWARD_CONFIGS), run by the
    interpreter: masking at the real block sizes (N, V, H not multiples of a block)."""
    cfg = getattr(configs, name)
    assert cfg in configs.ENTROPY_FORWARD_CONFIGS.values()
    monkeypatch.setattr(configs, "forward_config", lambda *a, **k: cfg)
    h, w, t, b = make_inputs(N=70, H=40, V=150, bias=True, peaked=4.0)
    lse, ent, amax, valid, _z = _truth(h, w, t, b, softcap=6.0, ignore=-100)
    _, st = fo.linear_objective_loss(h, w, t, b, softcap=6.0, backend="triton_fused", return_stats=True)
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(st.lse.double(), torch.where(valid, lse, zero), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(st.entropy.double(), torch.where(valid, ent, zero), rtol=1e-5, atol=5e-6)
    assert torch.equal(st.predicted, torch.where(valid, amax, torch.full_like(amax, -100)))
