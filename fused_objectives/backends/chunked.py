"""Gradients in the forward pass, for losses reduced to a scalar: three GEMMs instead of four.

A fused forward that keeps no logits must recompute them in the backward (4 GEMMs against the 3 of
an unfused forward + backward).  When the loss is a sum (or a mean: a sum times a scalar) of
per-token terms in token i's own row statistics (``logp_i``, ``lse_i``, ``dotz_i = sum_j u_j z_ij``:
backend contract v2), the coefficients ``c_i, b_i, g_i`` of its gradient are known as soon as a
token chunk's logits are: each chunk's ``[rows, V]`` logits are computed once, turned in place into
``c_i (onehot - softmax) + b_i softmax + g_i u`` and fed to the dX / dW GEMMs right away.
The backward then only scales the stored gradients by the upstream scalar.

The chunk buffer is bounded by a byte budget (never ``N * V``); ignored tokens are gathered away
before any GEMM.  The GEMMs are ATen's (MKL / oneDNN); the row statistics and ``dz`` come from the
C++ epilogues of the cpu backend (``torch.ops.fused_objectives.chunk_stats`` / ``chunk_grad_``),
the same code as its per-token kernels, so a loss value does not depend on which path computed it.  The
reduction and the objective stay where they always are: ``coef_fn`` evaluates the objective on
each chunk's ``[rows]`` vectors, through autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..options import CoefFn, LogitOptions



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
    half_gemm: bool = False,
    row_stats: bool = False,
    dot: Optional[torch.Tensor] = None,
):
    """``(total, logp, kept, argmax, dx, dw, db, rows)``: the summed objective, per-token statistics,
    the gradients of ``total`` (None where not needed; fp32, or for dX / dW the GEMM dtype), and
    ``rows`` fp32 ``[3, N]`` = (logsumexp, softmax entropy if ``row_stats``, ``dotz`` if ``dot``)
    of each token's logits (0 at ignored tokens and where not asked), from the same epilogue.
    ``coef_fn(logp, lse, dotz | None, target, valid) -> (chunk total, kept, coef)`` is called per
    token chunk (its targets: class weights need them) with ``coef`` ``[r]`` (c), ``[2, r]`` (c, b) or ``[3, r]`` (c, b, g; only with ``dot``).
    Host-side loop over token chunks: meant for CPU tensors, where reading the number of valid
    tokens is free.

    GEMM dtype: with ``half_gemm`` and bf16 ``hidden`` and ``weight``, bf16 (the GEMM accumulates
    in fp32 and rounds its output once); else fp32 (fp16 too: there dz would underflow before a
    loss scaler's factor, known only in the backward, could lift it).  Row statistics and ``dz``
    are computed in fp32 by the C++ epilogues (``chunk_stats`` / ``chunk_grad_``), ``dz`` is
    rounded to the GEMM dtype for the dX / dW GEMMs, and dW / db accumulate in fp32 across token
    chunks; dX and dW come back in the GEMM dtype (rounded once at the end), which spares
    gradient-sized fp32 passes that cost as much as the epilogue."""
    # no autocast: the GEMM dtype is chosen here (Trainer's bf16 runs under autocast)
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, budget_bytes,
                                  half_gemm, row_stats, dot)


def _forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, budget_bytes, half_gemm,
                       row_stats=False, dot=None):
    ops = torch.ops.fused_objectives
    need_dx, need_dw, need_db = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    # bf16 only: these gradients are formed before the backward's upstream scale is known, so fp16
    # dz would underflow (below 6e-8) before a loss scaler (GradScaler) could lift it
    half = half_gemm and hidden.dtype == weight.dtype == torch.bfloat16
    cdt = hidden.dtype if half else f32
    esize = torch.finfo(cdt).bits // 8
    idx = valid.nonzero().squeeze(1)
    n_act = idx.numel()
    rows = max(1, min(n_act, budget_bytes // (esize * V)))
    one_chunk = n_act <= rows

    logp = torch.zeros(N, dtype=f32, device=dev)
    kept = torch.zeros(N, dtype=torch.bool, device=dev)
    argmax = torch.zeros(N, dtype=torch.int64, device=dev)
    rows_out = torch.zeros(3, N, dtype=f32, device=dev)
    # each token's dX row comes from one GEMM: kept in the GEMM dtype; dW sums over token chunks in
    # fp32 unless there is only one (then the GEMM's own output, accumulated in fp32 inside)
    dx = torch.zeros(N, H, dtype=cdt, device=dev) if need_dx else None
    dw = None
    dw_fresh = False  # True until the first token chunk writes the fp32 dW (half precision: no zero fill)
    if need_dw and not (half and one_chunk):
        dw_fresh = half and n_act > 0
        dw = (torch.empty if dw_fresh else torch.zeros)(V, H, dtype=f32, device=dev)
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else None
    total = torch.zeros((), dtype=f32, device=dev)
    if n_act == 0:
        if need_dw and dw is None:
            dw = torch.zeros(V, H, dtype=cdt, device=dev)
        return total, logp, kept, argmax, dx, dw, db, rows_out

    # one converted weight copy (gradient-sized) when the weight is not in the GEMM dtype
    wc = weight if weight.dtype == cdt else weight.to(cdt)
    b32 = None if bias is None else bias.to(f32)
    softcap, scale = opts.softcap, opts.logit_scale
    buf = torch.empty(rows, V, dtype=cdt, device=dev)
    # half-precision dW products of several token chunks go through a slab of vocabulary rows
    slab = max(1, min(V, (budget_bytes // 4) // max(1, esize * H))) if (need_dw and half and not one_chunk) else 0
    pbuf = torch.empty(slab, H, dtype=cdt, device=dev) if slab else None
    all_valid = n_act == N

    for start in range(0, n_act, rows):
        n = min(rows, n_act - start)
        if all_valid:
            ii = None
            x = hidden[start:start + n]
            t = target[start:start + n].contiguous()
        else:
            ii = idx[start:start + n]
            x = hidden.index_select(0, ii)
            t = target.index_select(0, ii)
        x = x.to(cdt)
        z = torch.mm(x, wc.T, out=buf[:n])
        # bf16 rounds the tile's logits; the target's, which decides log p, is taken in fp32 apart
        traw = ops.target_logits(x, wc, t) if half else None
        lp, state, am, rs = ops.chunk_stats(z, b32, t, scale, softcap, traw, bool(row_stats), dot)
        tot, kp, c = coef_fn(lp, rs[0], rs[2] if dot is not None else None, t, torch.ones_like(lp, dtype=torch.bool))
        if ii is None:
            logp[start:start + n] = lp
            kept[start:start + n] = kp
            argmax[start:start + n] = am
            rows_out[:, start:start + n] = rs
        else:
            logp.index_copy_(0, ii, lp)
            kept.index_copy_(0, ii, kp)
            argmax.index_copy_(0, ii, am)
            rows_out.index_copy_(1, ii, rs)
        total += tot
        if not (need_dx or need_dw or need_db):
            continue
        # in place: z -> dz = (c (onehot - softmax) + b softmax + g u) * d(transform), rounded to the GEMM dtype
        ops.chunk_grad_(z, b32, t, state, c.to(f32).contiguous(), scale, softcap, traw, dot)
        if need_dx:
            if ii is None:
                torch.mm(z, wc, out=dx[start:start + n])
            else:
                dx.index_copy_(0, ii, torch.mm(z, wc))
        if need_dw:
            if dw is None:
                dw = torch.mm(z.T, x)  # the only token chunk: no accumulation across chunks
            elif not half:
                dw.addmm_(z.T, x)
            else:
                for v0 in range(0, V, slab):
                    v1 = min(V, v0 + slab)
                    # fp32 accumulation, converting in the same pass (ATen's add_ converts into a temporary)
                    ops.accumulate_(dw[v0:v1], torch.mm(z[:, v0:v1].T, x, out=pbuf[:v1 - v0]), not dw_fresh)
                dw_fresh = False
        if need_db:
            db.add_(z.sum(dim=0))  # fp32 inside; half-precision: one rounding per chunk (a dtype= would copy z)
    if half and dw is not None and dw.dtype != cdt:
        dw = dw.to(cdt)
    return total, logp, kept, argmax, dx, dw, db, rows_out
