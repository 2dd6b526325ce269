"""Shared test helpers: float64 ground truth, same-dtype PyTorch baseline, error comparison.

The truth (tests/truth.py) and the same-dtype baseline share no code with the package: the
baseline evaluates objectives with the truth's own definitions, in float32, so a bug in the
package's objectives cannot widen the tolerance it is measured with either.
"""
from typing import Dict, Optional

import torch

import fused_objectives as fo
import truth as _truth


# Where make_inputs puts its tensors unless told: a test file's backend fixture sets it (through
# monkeypatch) to device_for(backend), so the Triton cases get CUDA tensors on a CUDA machine.
DEFAULT_DEVICE = {"device": torch.device("cpu")}


def make_inputs(N=37, H=19, V=100, dtype=torch.float32, bias=False, lead=None, ignore_frac=0.2,
                peaked=0.0, seed=0, device=None):
    """hidden [*lead, H] (or [N, H]), weight [V, H], target, bias; ``peaked`` > 0 makes logits
    concentrate on the target (so p spans the thresholds and argmax often hits).  Generated on the
    CPU (same values everywhere), then moved to ``device`` (default ``DEFAULT_DEVICE``)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(lead) if lead is not None else (N,)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    target = torch.randint(0, V, shape, generator=g)
    if peaked:
        # push the hidden state toward its target's weight row: p(target) varies from ~0 to ~1
        strength = peaked * torch.rand(*shape, 1, generator=g)
        hidden = hidden + strength * weight[target] * H**0.5
    ignore = torch.rand(shape, generator=g) < ignore_frac
    target = torch.where(ignore, torch.full_like(target, -100), target)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    dev = device if device is not None else DEFAULT_DEVICE["device"]
    cast = lambda t: None if t is None else t.to(device=dev, dtype=dtype)
    return cast(hidden), cast(weight), target.to(dev), cast(b)


def run(hidden, weight, target, bias=None, *, upstream=None, grads=True, **kw) -> Dict[str, Optional[torch.Tensor]]:
    """Loss and gradients of ``linear_objective_loss`` on fresh leaf copies of the inputs."""
    h = hidden.detach().clone().requires_grad_(grads)
    w = weight.detach().clone().requires_grad_(grads)
    b = bias.detach().clone().requires_grad_(grads) if bias is not None else None
    loss = fo.linear_objective_loss(h, w, target, b, **kw)
    out = {"loss": loss.detach()}
    if grads:
        (loss * upstream.to(loss.device)).sum().backward() if upstream is not None else loss.backward()
        out.update(dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)
    return out


def naive_same_dtype(hidden, weight, target, bias=None, *, upstream=None, objective="nll", reduction="mean",
                     normalize="valid", shift=False, softcap=None, logit_scale=None, ignore_index=-100,
                     num_items_in_batch=None, z_loss=0.0, label_smoothing=0.0, class_weight=None):
    """What a user writes without this library: logits in the input dtype, then fp32 log-softmax
    (and the loss terms on those fp32 log-probabilities)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z.float() if z.dtype != torch.float64 else z
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = target
    if shift:
        t = torch.cat([t[..., 1:], torch.full_like(t[..., :1], ignore_index)], dim=-1)
    valid = t != ignore_index
    lp = torch.log_softmax(z, -1).gather(-1, torch.where(valid, t, 0)[..., None])[..., 0]
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    per_tok, kept = _truth.per_token(objective, lp.reshape(-1), valid.reshape(-1))
    V = z.shape[-1]
    z2, t1, valid1 = z.reshape(-1, V), torch.where(valid, t, 0).reshape(-1), valid.reshape(-1)
    cw = None if class_weight is None else class_weight.to(z.dtype)
    w_tok = torch.ones_like(per_tok) if cw is None else torch.where(valid1, cw[t1], 0.0)
    per_tok = per_tok * w_tok
    if label_smoothing:
        u = torch.ones(V, dtype=z.dtype, device=z.device) if cw is None else cw
        smooth = -(label_smoothing / V) * (torch.log_softmax(z2, -1) * u).sum(-1)
        per_tok = (1 - label_smoothing) * per_tok + torch.where(kept, smooth, 0.0)
    z_tok = torch.where(valid1, z_loss * torch.logsumexp(z2, -1) ** 2, 0.0)
    if reduction == "none":
        loss = (per_tok + z_tok).reshape(t.shape)
    elif reduction == "sum":
        loss = per_tok.sum() + z_tok.sum()
    else:
        mask = valid1 if normalize == "valid" else kept
        if num_items_in_batch is not None:
            denom = z_denom = torch.as_tensor(num_items_in_batch, dtype=per_tok.dtype)
        else:
            denom, z_denom = (w_tok * mask).sum(), valid1.sum().to(per_tok.dtype)
        loss = per_tok.sum() / denom if denom > 0 else per_tok.sum() * 0
        loss = loss + (z_tok.sum() / z_denom if z_denom > 0 else z_tok.sum() * 0)
    (loss * upstream.to(loss.device)).sum().backward() if upstream is not None else loss.backward()
    return {"loss": loss.detach(), "dh": h.grad, "dw": w.grad, "db": b.grad if b is not None else None}


def ground_truth(hidden, weight, target, bias=None, **kw):
    """The independent float64 truth (tests/truth.py) on the same values: loss, dh, dw, db."""
    kw.pop("backend", None)
    return _truth.truth(hidden, weight, target, bias, **kw)


def assert_no_worse(fused, baseline, truth, k=2.0, rel_eps=None, what=""):
    """``max|fused - truth| <= k * max|baseline - truth| + rel_eps * max|truth|`` per tensor."""
    for key, gt in truth.items():
        if gt is None:
            assert fused.get(key) is None, f"{what}{key}: expected no gradient"
            continue
        f, base = fused[key], baseline[key]
        assert f is not None, f"{what}{key}: missing"
        assert f.shape == gt.shape, f"{what}{key}: shape {tuple(f.shape)} != {tuple(gt.shape)}"
        eps = rel_eps if rel_eps is not None else (
            4 * torch.finfo(f.dtype).eps if f.dtype != torch.float64 else 1e-12)
        scale = gt.abs().max().item() if gt.numel() else 0.0
        err_f = (f.double() - gt).abs().max().item() if gt.numel() else 0.0
        err_b = (base.double() - gt).abs().max().item() if gt.numel() else 0.0
        bound = k * err_b + eps * max(scale, 1e-30)
        assert err_f <= bound, (f"{what}{key}: fused error {err_f:.3e} > bound {bound:.3e} "
                                f"(same-dtype torch error {err_b:.3e}, scale {scale:.3e})")


def device_for(backend: str) -> torch.device:
    """Where a backend's test tensors live: CUDA for the Triton backends on a CUDA machine, else the
    CPU (Triton then runs under its interpreter, set up by conftest.py)."""
    if isinstance(backend, str) and backend.startswith("triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def to_device(device, *tensors):
    """The tensors (None stays None) on ``device``."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def to_cpu(result: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    return {k: None if v is None else v.cpu() for k, v in result.items()}
