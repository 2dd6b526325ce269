"""Backward kernel: dX, dW, db from per-token coefficients, recomputing each logits tile on chip.

For a loss ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` (``dotz_i = sum_j u_j z_ij``) the gradient
on the logits is ``dz_ij = c_i (onehot(y_i)_j - p_ij) + b_i p_ij + g_i u_j``, times ``logit_scale``
and ``1 - tanh^2`` for the transforms; b and g are compile-time switches (HAS_B, HAS_DOT), so the
classic ``c``-only call compiles to the kernel without them.  Grid: (token blocks, vocabulary blocks of one slab).  Each
program recomputes its ``[BLOCK_N, BLOCK_V]`` tile, forms ``dz`` and atomically adds
``dz @ W_tile`` into dX and ``dz^T @ X_tile`` into the slab's dW (both fp32).  The atomics are
``relaxed``: nothing inside the kernel reads what they write, and the kernel boundary orders them
before any reader (the default ``acq_rel`` puts a GPU-wide fence around every one).  Tokens with
all coefficients zero (ignored, gated out) are compacted away on the device: they cost nothing.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..options import LogitOptions
from . import configs
from .common import logits_tile


@triton.jit
def grad_bwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, tgt_ptr, state_ptr, omp_ptr, coef_ptr, dot_ptr, row_idx_ptr, n_active_ptr,
    dx_ptr, dw_ptr, db_ptr,
    # sizes
    N, V, H, v_start, v_end,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh, stride_dxn, stride_dwv,
    # logit transforms
    logit_scale, softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    HAS_B: tl.constexpr, HAS_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    n_active = tl.load(n_active_ptr).to(tl.int64)
    row0 = pid_n * BLOCK_N
    if row0 >= n_active:
        return
    offs_r = row0 + tl.arange(0, BLOCK_N)
    rmask = offs_r < n_active
    tok = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0)
    tgt = tl.load(tgt_ptr + tok, mask=rmask, other=-1)
    row_max = tl.load(state_ptr + tok, mask=rmask, other=0.0)
    log_norm = tl.load(state_ptr + N + tok, mask=rmask, other=0.0)
    coef = tl.load(coef_ptr + tok, mask=rmask, other=0.0)  # c: on onehot - p
    if HAS_B:
        coef_b = tl.load(coef_ptr + N + tok, mask=rmask, other=0.0)  # b: on p (d lse / dz)
    if HAS_DOT:
        coef_g = tl.load(coef_ptr + 2 * N + tok, mask=rmask, other=0.0)  # g: on u (d dotz / dz)
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = offs_v < v_end

    # [BLOCK_N, BLOCK_V]
    z, dcap = logits_tile(x_ptr, w_ptr, b_ptr, tok, rmask, offs_v, vmask,
                       H, stride_xn, stride_xh, stride_wv, stride_wh, logit_scale, softcap,
                       HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    # onehot - softmax.  At the target, 1 - p comes from the forward's log p (-expm1(logp), taken
    # by the launcher), not from the recomputed tile: when p is near 1 it is all cancellation, and a
    # recomputed logit that differs from the forward's by one rounding would change it by percents.
    one_minus_p = tl.load(omp_ptr + tok, mask=rmask, other=0.0)
    p = tl.exp((z - row_max[:, None]) - log_norm[:, None])
    is_tgt = offs_v[None, :] == tgt[:, None]
    if HAS_B:
        # target column c (1 - p) + b p, elsewhere (b - c) p: the c-term keeps its accurate 1 - p
        g = tl.where(is_tgt, coef[:, None] * one_minus_p[:, None] + coef_b[:, None] * p,
                     (coef_b - coef)[:, None] * p)
    else:
        g = tl.where(is_tgt, one_minus_p[:, None], -p) * coef[:, None]
    if HAS_DOT:
        u = tl.load(dot_ptr + offs_v, mask=vmask, other=0.0)
        g += coef_g[:, None] * u[None, :]
    if HAS_SOFTCAP:
        g = g * dcap
    if HAS_SCALE:
        g = g * logit_scale
    g = tl.where(rmask[:, None] & vmask[None, :], g, 0.0)

    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(g, axis=0), mask=vmask, sem="relaxed")
    if DOT_FP32:
        gd = g
    else:
        gd = g.to(x_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        if COMPUTE_DX:
            # [BLOCK_V, BLOCK_H]
            w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                        mask=vmask[:, None] & hmask[None, :], other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            dx = tl.dot(gd, w, input_precision=PRECISION)  # [BLOCK_N, BLOCK_H]
            tl.atomic_add(dx_ptr + tok[:, None] * stride_dxn + offs_h[None, :], dx,
                          mask=rmask[:, None] & hmask[None, :], sem="relaxed")
        if COMPUTE_DW:
            # [BLOCK_N, BLOCK_H]
            x = tl.load(x_ptr + tok[:, None] * stride_xn + offs_h[None, :] * stride_xh,
                        mask=rmask[:, None] & hmask[None, :], other=0.0)
            if DOT_FP32:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(gd), x, input_precision=PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(dw_ptr + (offs_v - v_start)[:, None] * stride_dwv + offs_h[None, :], dw,
                          mask=vmask[:, None] & hmask[None, :], sem="relaxed")


def fused_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    lse_state: torch.Tensor,
    coef: torch.Tensor,
    opts: LogitOptions,
    needs: Tuple[bool, bool, bool],
    dot_fp32: bool,
    dot: Optional[torch.Tensor] = None,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients ``(d hidden, d weight, d bias)`` of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i``
    (``dotz_i = sum_j dot_j z_ij``); None where not needed.

    ``lse_state`` is the forward's ``[3, N]`` (row max, log-normaliser, target log-probability).
    ``coef`` is float32 ``[N]`` (c; b = g = 0: the classic kernel), ``[2, N]`` (c, b) or ``[3, N]``
    (c, b, g; ``dot`` [V] float32 required).  A token whose coefficients are all zero is skipped (its
    state and target are not read); ignored tokens must arrive so.
    """
    need_dx, need_dw, need_db = needs
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if coef.dim() == 1:
        terms = 1
    elif coef.dim() == 2 and coef.shape[0] in (2, 3):
        terms = coef.shape[0]
    else:
        raise ValueError(f"coef must be [N], [2, N] or [3, N]; got shape {tuple(coef.shape)}")
    if coef.shape[-1] != N:
        raise ValueError(f"coef has {coef.shape[-1]} tokens, hidden has {N}")
    if (terms == 3) != (dot is not None):
        raise ValueError("coef [3, N] (c, b, g) goes with a dot vector and only with one; got coef "
                         f"{tuple(coef.shape)} and dot={'None' if dot is None else tuple(dot.shape)}")
    coef = coef.to(torch.float32).contiguous()
    if dot is not None:
        dot = dot.to(device=dev, dtype=torch.float32).contiguous()
    cfg = configs.backward_config(hidden.dtype, configs.capability_of(hidden.device), terms=terms)
    # NaN coefficients stay active, so NaN reaches the gradients
    active = coef != 0 if terms == 1 else (coef != 0).any(dim=0)
    row_idx = torch.argsort((~active).to(torch.int8), stable=True)
    n_active = active.sum(dtype=torch.int32).reshape(1)
    one_minus_p = (-torch.expm1(lse_state[2])).contiguous()

    dx = torch.zeros((N, H), dtype=torch.float32, device=dev) if need_dx else None
    db = torch.zeros((V,), dtype=torch.float32, device=dev) if need_db else None
    dw = dw_buf = None
    slab = V
    if need_dw:
        if weight.dtype == torch.float32:
            dw = dw_buf = torch.zeros((V, H), dtype=torch.float32, device=dev)
        else:
            dw = torch.empty((V, H), dtype=weight.dtype, device=dev)
            rows = max(cfg.block_v, configs.DW_SLAB_BYTES // (4 * max(H, 1)) // cfg.block_v * cfg.block_v)
            slab = min(V, rows)
            dw_buf = torch.zeros((slab, H), dtype=torch.float32, device=dev)
    if (need_dx or need_dw or need_db) and N > 0:
        n_blocks = triton.cdiv(N, cfg.block_n)
        for v_start in range(0, V, slab):
            v_end = min(V, v_start + slab)
            if dw_buf is not None and v_start > 0:
                dw_buf.zero_()
            grad_bwd_kernel[(n_blocks, triton.cdiv(v_end - v_start, cfg.block_v))](
                hidden, weight, bias if bias is not None else hidden, target, lse_state, one_minus_p, coef,
                dot if dot is not None else coef, row_idx, n_active,
                dx if dx is not None else coef, dw_buf if dw_buf is not None else coef,
                db if db is not None else coef,
                N, V, H, v_start, v_end,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                H, H,
                opts.logit_scale or 1.0, opts.softcap or 1.0,
                HAS_BIAS=bias is not None, HAS_SCALE=opts.logit_scale is not None,
                HAS_SOFTCAP=opts.softcap is not None, DOT_FP32=dot_fp32, PRECISION=configs.dot_precision(hidden.dtype),
                COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
                HAS_B=terms >= 2, HAS_DOT=terms == 3,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if dw is not None and dw is not dw_buf:
                dw[v_start:v_end].copy_(dw_buf[: v_end - v_start])
    elif dw is not None and dw is not dw_buf:
        dw.zero_()
    return (
        dx.to(hidden.dtype) if dx is not None else None,
        dw,
        db.to(bias.dtype) if db is not None else None,
    )
