"""The tests' float64 truth, written from the definitions in design/objectives.md.

Independent of the package on purpose: nothing here imports ``fused_objectives``, so a bug in its
objectives, gates, reductions, normalisation, shift or logit transforms cannot move the truth
along with the result under test.  Everything is computed on materialised float64 logits and
differentiated by float64 autograd.

    z   = (hidden @ weight.T + bias) * logit_scale, then softcap * tanh(z / softcap)
    l_i = log_softmax(z_i)[y_i],  p_i = exp(l_i)
    loss_i = f(l_i) on kept tokens (valid and passing the objective's gate on the current p_i), else 0
    mean = sum_i loss_i / (num_items_in_batch | #valid | #kept), 0 when that denominator is 0

Loss terms (z_loss, label_smoothing = eps, class_weight = w [V]), from their definitions:
    loss_i = (1 - eps) * w[y_i] * f(l_i) - (eps / V) * sum_j u_j log_softmax(z_i)_j   on kept tokens
           + z_loss * logsumexp(z_i)**2                                              on valid tokens
    with u = w (ones without); mean: the first part / sum of w[y_i] over valid (or kept) tokens,
    the z part / the count of valid tokens; num_items_in_batch replaces both.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Union

import torch

UNLIKELIHOOD_EPS = 1e-3

# name -> (kind of parameter, gate direction): "a" exponent > 0, "t" threshold in [0, 1]
_SPECS = {
    "nll": (None, None), "neg_p": (None, None), "dft": (None, None),
    "power": ("a", None), "neg_power": ("a", None),
    "nll_top": ("t", "top"), "nll_bottom": ("t", "bottom"),
    "neg_p_top": ("t", "top"), "neg_p_bottom": ("t", "bottom"),
    "unlikelihood_top": ("t", "top"), "unlikelihood_bottom": ("t", "bottom"),
}

Spec = Union[str, Callable[[torch.Tensor], torch.Tensor], Tuple[Callable, Optional[Callable]]]


def parse(spec: str) -> Tuple[str, Optional[float]]:
    """``"power:10"`` -> ``("power", 10.0)``; only the canonical built-in spellings."""
    name, _, raw = spec.strip().partition(":")
    if name not in _SPECS:
        raise KeyError(f"the test truth knows no objective {spec!r}; pass a callable instead")
    kind, _ = _SPECS[name]
    if (kind is None) != (raw == ""):
        raise KeyError(f"objective {spec!r}: parameter {'unexpected' if kind is None else 'missing'}")
    return name, (float(raw) if raw else None)


def _base_loss(name: str, param: Optional[float], l: torch.Tensor) -> torch.Tensor:
    """f(l) of the table in objectives.md (any float dtype; the truth passes float64)."""
    if name in ("nll", "nll_top", "nll_bottom"):
        return -l
    if name in ("neg_p", "neg_p_top", "neg_p_bottom"):
        return -torch.expm1(l)  # 1 - p
    if name == "power":
        return -torch.expm1(param * l) / param  # (1 - p^a) / a
    if name == "neg_power":
        return -torch.exp(param * l) / param  # -p^a / a
    if name in ("unlikelihood_top", "unlikelihood_bottom"):
        return torch.log(-torch.expm1(l) + UNLIKELIHOOD_EPS)  # log(1 - p + 1e-3)
    if name == "dft":
        return -torch.exp(l).detach() * l  # -sg(p) log p
    raise AssertionError(name)


def per_token(spec: Spec, l: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, 0 where not kept; kept mask) for log-probabilities ``l`` (any float dtype).

    ``spec``: a built-in spec string, a callable ``f(l)`` (no gate), or ``(f, gate)`` with
    ``gate(p) -> bool mask``."""
    if isinstance(spec, str):
        name, param = parse(spec)
        fn = lambda x: _base_loss(name, param, x)
        direction = _SPECS[name][1]
        gate = None if direction is None else (
            (lambda p: p >= param) if direction == "top" else (lambda p: p <= param))
    elif isinstance(spec, tuple):
        fn, gate = spec
    else:
        fn, gate = spec, None
    kept = valid.clone()
    if gate is not None:
        kept = valid & gate(torch.exp(l.detach()))
    # a benign argument where the token is dropped, so a singular f cannot leak NaN gradients
    safe = torch.where(kept, l, torch.full_like(l, math.log(0.5)))
    return torch.where(kept, fn(safe), torch.zeros_like(l)), kept


def shifted(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """hidden[..., t, :] predicts target[..., t + 1]; the last position predicts nothing."""
    pad = torch.full_like(target[..., :1], ignore_index)
    return torch.cat([target[..., 1:], pad], dim=-1)


def logits64(hidden, weight, bias=None, *, softcap=None, logit_scale=None) -> torch.Tensor:
    """Materialised float64 logits [..., V], transforms applied."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def truth(hidden, weight, target, bias=None, *, objective: Spec = "nll", reduction="mean", normalize="valid",
          num_items_in_batch=None, shift=False, softcap=None, logit_scale=None, ignore_index=-100,
          upstream=None, grads=True, details=False, z_loss=0.0, label_smoothing=0.0,
          class_weight=None) -> Dict[str, Optional[torch.Tensor]]:
    """Loss (float64) and float64 gradients ``dh, dw, db`` of the objective's loss.

    ``upstream`` (shaped like the loss) gives ``d(sum(loss * upstream))``; ``details=True`` adds
    ``logp``, ``valid`` and ``kept`` (shaped like ``target``)."""
    h = hidden.detach().double().requires_grad_(grads)
    w = weight.detach().double().requires_grad_(grads)
    b = bias.detach().double().requires_grad_(grads) if bias is not None else None
    t = target.long()
    if shift:
        t = shifted(t, ignore_index)
    valid = t != ignore_index
    # ignored rows take no part (a NaN hidden state there must not reach anything)
    h_used = torch.where(valid[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
    z = logits64(h_used, w, b, softcap=softcap, logit_scale=logit_scale)
    V = z.shape[-1]
    if bool(((t < 0) | (t >= V))[valid].any()):
        raise ValueError("truth: a valid target is outside [0, V)")
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    l = torch.log_softmax(z, dim=-1).gather(-1, safe_t[..., None])[..., 0]
    l = torch.where(valid, l, torch.zeros_like(l))
    loss_tok, kept = per_token(objective, l, valid)
    cw = None if class_weight is None else class_weight.detach().double().to(z.device)
    w_tok = torch.ones_like(l) if cw is None else torch.where(valid, cw[safe_t], torch.zeros_like(l))
    loss_tok = loss_tok * w_tok
    if label_smoothing:
        u = torch.ones(V, dtype=torch.float64, device=z.device) if cw is None else cw
        smooth = -(label_smoothing / V) * (torch.log_softmax(z, dim=-1) * u).sum(-1)
        loss_tok = (1 - label_smoothing) * loss_tok + torch.where(kept, smooth, torch.zeros_like(smooth))
    z_tok = torch.where(valid, z_loss * torch.logsumexp(z, dim=-1) ** 2, torch.zeros_like(l))
    if reduction == "none":
        loss = loss_tok + z_tok
    elif reduction == "sum":
        loss = loss_tok.sum() + z_tok.sum()
    elif reduction == "mean":
        mask = valid if normalize == "valid" else kept
        if num_items_in_batch is not None:
            denom = z_denom = float(num_items_in_batch)
        else:
            denom = float((w_tok * mask).sum())
            z_denom = float(valid.sum())
        loss = loss_tok.sum() / denom if denom != 0 else loss_tok.sum() * 0.0
        loss = loss + (z_tok.sum() / z_denom if z_denom != 0 else z_tok.sum() * 0.0)
    else:
        raise ValueError(reduction)
    out = {"loss": loss.detach()}
    if grads:
        (loss * upstream.to(loss.device, torch.float64)).sum().backward() if upstream is not None else loss.backward()
        out.update(dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)
    if details:
        out.update(logp=l.detach(), valid=valid, kept=kept)
    return out


def target_logprob(hidden, weight, target, bias=None, *, ignore_index=-100, shift=False, softcap=None,
                   logit_scale=None) -> torch.Tensor:
    """float64 ``log p(target)`` shaped like ``target`` (0 at ignored positions)."""
    return truth(hidden, weight, target, bias, objective="nll", reduction="none", shift=shift, softcap=softcap,
                 logit_scale=logit_scale, ignore_index=ignore_index, grads=False, details=True)["logp"]
