"""Gradients in the forward pass, for losses reduced to a scalar: three GEMMs instead of four.

A fused forward that keeps no logits must recompute them in the backward (4 GEMMs against the 3 of
an unfused forward + backward).  When the loss is a sum (or a mean: a sum times a scalar) the
per-token coefficient ``c_i = dSum/dlogp_i`` depends only on token i's own log-probability, so it
is known as soon as a token chunk's logits are: each chunk's ``[rows, V]`` logits are computed
once, turned in place into ``c_i * (onehot - softmax)`` and fed to the dX / dW GEMMs right away.
The backward then only scales the stored gradients by the upstream scalar.

The chunk buffer is bounded by a byte budget (never ``N * V``); ignored tokens are gathered away
before any GEMM.  All work is ATen (MKL/oneDNN GEMMs, vectorised elementwise passes).  The
reduction and the objective stay where they always are: ``coef_fn`` evaluates the objective on
each chunk's ``[rows]`` vectors, through autograd.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..options import LogitOptions

CoefFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def forward_with_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    valid: torch.Tensor,
    opts: LogitOptions,
    coef_fn: CoefFn,
    needs: Tuple[bool, bool, bool],
    budget_bytes: int,
):
    """``(total, logp, kept, argmax, dx32, dw32, db32)``: the summed objective, per-token
    statistics, and the gradients of ``total`` (fp32; None where not needed).  Host-side loop over
    token chunks: meant for CPU tensors, where reading the number of valid tokens is free."""
    # fp32 math whatever autocast region the caller is in (Trainer's bf16 runs under autocast)
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, budget_bytes)


def _forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, budget_bytes):
    need_dx, need_dw, need_db = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    logp = torch.zeros(N, dtype=f32, device=dev)
    kept = torch.zeros(N, dtype=torch.bool, device=dev)
    argmax = torch.zeros(N, dtype=torch.int64, device=dev)
    dx = torch.zeros(N, H, dtype=f32, device=dev) if need_dx else None
    dw = torch.zeros(V, H, dtype=f32, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else None
    total = torch.zeros((), dtype=f32, device=dev)
    idx = valid.nonzero().squeeze(1)
    if idx.numel() == 0:
        return total, logp, kept, argmax, dx, dw, db

    # fp32 math whatever the input dtype: one upcast weight copy (gradient-sized) for bf16/fp16
    w32 = weight if weight.dtype == f32 else weight.to(f32)
    b32 = None if bias is None else bias.to(f32)
    softcap, scale = opts.softcap, opts.logit_scale
    bufs = 2 if softcap is not None else 1  # the soft-cap's derivative needs tanh kept beside the logits
    rows = max(1, min(idx.numel(), budget_bytes // (4 * V * bufs)))
    buf = torch.empty(rows, V, dtype=f32, device=dev)
    tbuf = torch.empty(rows, V, dtype=f32, device=dev) if softcap is not None else None

    for start in range(0, idx.numel(), rows):
        ii = idx[start:start + rows]
        n = ii.numel()
        x = hidden.index_select(0, ii).to(f32)
        t = target.index_select(0, ii)[:, None]
        z = torch.mm(x, w32.T, out=buf[:n])
        if b32 is not None:
            z.add_(b32)
        if scale is not None:
            z.mul_(scale)
        if softcap is not None:
            th = torch.tanh(z.div_(softcap), out=tbuf[:n])
            z.copy_(th).mul_(softcap)
        m, am = z.max(dim=1)
        zt = z.gather(1, t)[:, 0]
        # e = exp(z - m); rest = sum over every column but the target, so 1 - p = rest / s exactly
        e = z.sub_(m[:, None]).exp_()
        et = torch.exp(zt - m)
        e.scatter_(1, t, 0.0)
        rest = e.sum(dim=1)
        s = rest + et
        lp = (zt - m) - torch.log(s)
        tot, kp, c = coef_fn(lp, torch.ones_like(lp, dtype=torch.bool))
        logp.index_copy_(0, ii, lp)
        kept.index_copy_(0, ii, kp)
        argmax.index_copy_(0, ii, am)
        total += tot
        if not (need_dx or need_dw or need_db):
            continue
        # dz = c * (onehot - softmax), in place: -c p_j off the target, c (1 - p_t) = c rest / s at it
        dz = e.mul_((-c / s)[:, None])
        dz.scatter_(1, t, (c * rest / s)[:, None])
        if softcap is not None:
            dz.mul_(1.0 - tbuf[:n].square_())
        if scale is not None:
            dz.mul_(scale)
        if need_dx:
            dx.index_copy_(0, ii, torch.mm(dz, w32))
        if need_dw:
            dw.addmm_(dz.T, x)
        if need_db:
            db.add_(dz.sum(dim=0))
    return total, logp, kept, argmax, dx, dw, db
