"""Row kernels over a materialised logits buffer (the chunked strategy, backends/triton_chunked.py).

A library GEMM writes raw logits ``x @ W_slab^T`` into a ``[M, C]`` buffer in the input dtype, or
in fp32 (``triton_chunked.LOGITS_FP32``), with fp32 accumulation inside the GEMM; these kernels do everything else on it in one pass each:

- ``row_stats_kernel``: per row, bias / scale / soft-cap applied on the fly in fp32, then the row
  max ``m``, the sum ``rest`` of ``exp(z - m)`` over every column *but the argmax* (whose own term
  is exactly 1: keeping it out keeps the digits of a small remainder, which set ``1 - p`` for
  confident tokens), the first argmax and the target's logit; on request (compile-time switches,
  so the default pass does not pay for them) the softmax entropy's accumulator (``ENTROPY``) and
  ``dotz = sum_j u_j z_j`` for a ``[V]`` fp32 vector ``u`` (``HAS_DOT``: linear in z, one more
  fp32 accumulator, no rescaling);
- ``dz_kernel``: writes the logits' gradient (in place, or into a second buffer of the input
  dtype when the logits are fp32) of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i``:
  ``c_i (onehot(y_i) - p_ij) + b_i p_ij + g_i u_j``, times the soft-cap's ``1 - tanh^2`` and
  ``logit_scale``, in the input dtype, from the row statistics (``p_ij = exp(z_ij - m_i -
  log_norm_i)``) and the per-token ``1 - p`` at the target, which the launcher computes as
  ``-expm1(logp)``: ``c (1 - p) + b p + g u`` at the target, ``(b - c) p + g u`` elsewhere.
  The ``b`` and ``u`` terms are compile-time switches (``HAS_B``, ``HAS_DOT``): without them the
  kernel is the classic ``c (onehot - p)``.

Neither uses atomics: every program owns its rows (stats) or its tile (dz).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..options import LogitOptions
from . import configs
from .common import transform_logits


@triton.jit
def row_stats_kernel(
    # pointers
    z_ptr, b_ptr, tgt_ptr, dot_ptr,
    m_ptr, rest_ptr, amax_ptr, zt_ptr, sent_ptr, sdot_ptr,
    # sizes
    M, C,
    # strides
    stride_zm,
    # logit transforms
    logit_scale, softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    tgt = tl.load(tgt_ptr + offs_m, mask=mmask, other=-1)
    # per-lane online state, [BLOCK_M, BLOCK_V]: lane j sees columns j, j + BLOCK_V, ... in order,
    # so the loop body is elementwise (one exp per logit) and the lanes are merged once at the end
    lane_m = tl.full((BLOCK_M, BLOCK_V), float("-inf"), dtype=tl.float32)
    lane_rest = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)  # sum of exp(z - lane_m) without the lane's max
    # a lane that never sees a column (V < BLOCK_V) keeps an index >= V, so it never wins below
    lane_arg = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.int32) + tl.arange(0, BLOCK_V)[None, :]
    lane_zt = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    # ENTROPY: sum of exp(z - lane_m) * (z - lane_m), rescaled with lane_m (the max's own term is 0)
    lane_s = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    # HAS_DOT: sum of u_j * z_j (linear in z: no rescaling when the max grows)
    lane_dot = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for v0 in range(0, C, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        vmask = offs_v < C
        # [BLOCK_M, BLOCK_V]
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_v[None, :],
                    mask=mmask[:, None] & vmask[None, :], other=0.0).to(tl.float32)
        z, _d = transform_logits(z, offs_v, vmask, b_ptr, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
        if HAS_DOT:
            u = tl.load(dot_ptr + offs_v, mask=vmask, other=0.0)
            # columns past the row are -inf below: keep them out (0 * -inf is NaN)
            lane_dot += tl.where(vmask[None, :], u[None, :] * z, 0.0)
        z = tl.where(vmask[None, :], z, float("-inf"))
        # strict '>': a tie keeps the earlier column (torch.argmax's first index); a NaN logit never
        # becomes the max but makes the sum, and so the loss, NaN
        new_max = z > lane_m
        # exp(-|z - m|) is the smaller term's share; equal values (also -inf == -inf) count 1
        e = tl.where(z == lane_m, 1.0, tl.exp(-tl.abs(z - lane_m)))
        if ENTROPY:
            # new max: exp(dm) * (S + dm * (rest + 1)) with dm = lane_m - z; else S + e * (z - lane_m);
            # a term that is exactly 0 (equal values, -inf, an underflowed exp) adds nothing
            first = lane_m == float("-inf")
            # d = 0 where the term is 0 anyway: no inf - inf or 0 * inf (a NaN the where would drop)
            d = tl.where(first | (e == 0.0) | (z == lane_m), 0.0, z - lane_m)
            grown = tl.where(first, 0.0, e * (lane_s - d * (lane_rest + 1.0)))
            lane_s = tl.where(new_max, grown, lane_s + e * d)
        lane_rest = tl.where(new_max, (lane_rest + 1.0) * e, lane_rest + e)
        lane_arg = tl.where(new_max, offs_v[None, :], lane_arg)
        lane_m = tl.where(new_max, z, lane_m)
        lane_zt += tl.where(offs_v[None, :] == tgt[:, None], z, 0.0)
    m = tl.max(lane_m, axis=1)
    # the first column holding the max: the smallest index among the lanes that reach it
    amax = tl.min(tl.where(lane_m == m[:, None], lane_arg, 2147483647), axis=1)
    win = lane_arg == amax[:, None]
    # every lane rescaled to the row max, its own max term (1) included, except the winner's max
    rest = tl.sum(tl.where(win, lane_rest, (lane_rest + 1.0) * tl.exp(lane_m - m[:, None])), axis=1)
    zt = tl.sum(lane_zt, axis=1)
    if ENTROPY:
        unused = lane_m == float("-inf")
        dl = tl.where(unused, 0.0, lane_m - m[:, None])
        s = tl.sum(tl.where(unused, 0.0, tl.exp(dl) * (lane_s + dl * (lane_rest + 1.0))), axis=1)
        tl.store(sent_ptr + offs_m, s, mask=mmask)
    if HAS_DOT:
        tl.store(sdot_ptr + offs_m, tl.sum(lane_dot, axis=1), mask=mmask)
    amax = amax.to(tl.int64)
    tl.store(m_ptr + offs_m, m, mask=mmask)
    tl.store(rest_ptr + offs_m, rest, mask=mmask)
    tl.store(amax_ptr + offs_m, amax, mask=mmask)
    tl.store(zt_ptr + offs_m, zt, mask=mmask)


@triton.jit
def dz_kernel(
    # pointers
    z_ptr, dz_ptr, b_ptr, tgt_ptr, m_ptr, log_norm_ptr, omp_ptr, coef_ptr, dot_ptr,
    # sizes
    M, C, col0,
    # strides (coef is [K, M]: c, then b when HAS_B, then g when HAS_DOT)
    stride_zm, stride_dzm, stride_coef,
    # logit transforms
    logit_scale, softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_B: tl.constexpr, HAS_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    # local columns of the buffer; the vocabulary index is col0 + local
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = offs_c < C
    offs_v = col0 + offs_c
    mask = mmask[:, None] & cmask[None, :]
    # [BLOCK_M, BLOCK_V]
    z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    z, dcap = transform_logits(z, offs_v, cmask, b_ptr, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
    tgt = tl.load(tgt_ptr + offs_m, mask=mmask, other=-1)
    m = tl.load(m_ptr + offs_m, mask=mmask, other=0.0)
    log_norm = tl.load(log_norm_ptr + offs_m, mask=mmask, other=0.0)
    omp = tl.load(omp_ptr + offs_m, mask=mmask, other=0.0)
    coef = tl.load(coef_ptr + offs_m, mask=mmask, other=0.0)
    p = tl.exp((z - m[:, None]) - log_norm[:, None])
    is_t = offs_v[None, :] == tgt[:, None]
    if HAS_B:
        # target: c (1 - p) + b p (1 - p from the forward's logp keeps a confident token's digits);
        # elsewhere (b - c) p
        cb = tl.load(coef_ptr + stride_coef + offs_m, mask=mmask, other=0.0)
        g = tl.where(is_t, coef[:, None] * omp[:, None] + cb[:, None] * p, (cb - coef)[:, None] * p)
        active = (coef != 0.0) | (cb != 0.0)
    else:
        g = tl.where(is_t, omp[:, None], -p) * coef[:, None]
        active = coef != 0.0
    if HAS_DOT:
        # + g_i u_j: the constant-row term of dotz (HAS_DOT comes with HAS_B: coef is [3, M])
        cg = tl.load(coef_ptr + 2 * stride_coef + offs_m, mask=mmask, other=0.0)
        u = tl.load(dot_ptr + offs_v, mask=cmask, other=0.0)
        g = g + cg[:, None] * u[None, :]
        active = active | (cg != 0.0)
    if HAS_SOFTCAP:
        g = g * dcap
    if HAS_SCALE:
        g = g * logit_scale
    # a row whose coefficients are all zero (ignored or gated out) contributes exactly nothing, even
    # where its logits are not finite; a NaN coefficient stays NaN
    g = tl.where(active[:, None], g, 0.0)
    tl.store(dz_ptr + offs_m[:, None] * stride_dzm + offs_c[None, :], g.to(dz_ptr.dtype.element_ty), mask=mask)


def _bias_arg(bias: Optional[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else z


def row_stats(
    z: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    opts: LogitOptions,
    entropy: bool = False,
    dot: Optional[torch.Tensor] = None,
):
    """``(m, log_norm, logp, argmax, entropy, dotz)`` [M] of the raw logits buffer ``z`` [M, V]
    (unit column stride); ``entropy`` (the rows' softmax entropy) is None unless asked for, ``dotz
    = sum_j dot_j zz_j`` is None unless ``dot`` ([V] fp32) is given: compile-time branches of the
    kernel, so the default pass does not pay for them.

    ``log_norm = log(sum_j exp(z_j - m))`` (``log1p`` of the remainder), ``logp = (z_t - m) -
    log_norm``; a target outside ``[0, V)`` gives NaN.  Equals, on the transformed fp32 logits
    ``zz``: ``zz.max(1)``, ``zz.logsumexp(1) - zz.max(1)``, ``zz.log_softmax(1)[y]``, ``zz.argmax(1)``.
    """
    M, C = z.shape
    assert z.stride(1) == 1 and target.shape == (M,) and target.is_contiguous()
    assert dot is None or (dot.shape == (C,) and dot.dtype == torch.float32 and dot.stride(0) == 1)
    dev = z.device
    cfg = configs.rows_config()
    m = torch.empty(M, dtype=torch.float32, device=dev)
    rest = torch.empty(M, dtype=torch.float32, device=dev)
    amax = torch.empty(M, dtype=torch.int64, device=dev)
    zt = torch.empty(M, dtype=torch.float32, device=dev)
    sent = torch.empty(M, dtype=torch.float32, device=dev) if entropy else None
    sdot = torch.empty(M, dtype=torch.float32, device=dev) if dot is not None else None
    if M > 0:
        row_stats_kernel[(triton.cdiv(M, cfg.block_m),)](
            z, _bias_arg(bias, z), target, dot if dot is not None else zt,
            m, rest, amax, zt, sent if entropy else zt, sdot if sdot is not None else zt,
            M, C,
            z.stride(0),
            opts.logit_scale or 1.0, opts.softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SCALE=opts.logit_scale is not None,
            HAS_SOFTCAP=opts.softcap is not None, ENTROPY=entropy, HAS_DOT=dot is not None,
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
    log_norm = torch.log1p(rest)
    logp = (zt - m) - log_norm
    in_range = (target >= 0) & (target < C)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    # H = log_norm - E_p[z - m] = log_norm - S / sum_j exp(z_j - m)
    ent = log_norm - sent / (rest + 1.0) if entropy else None
    return m, log_norm, logp, amax, ent, sdot


def softmax_grad_(
    z: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    m: torch.Tensor,
    log_norm: torch.Tensor,
    one_minus_p: torch.Tensor,
    coef: torch.Tensor,
    opts: LogitOptions,
    col0: int = 0,
    out: Optional[torch.Tensor] = None,
    dot: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Write ``d(sum_i c_i logp_i + b_i lse_i + g_i dotz_i)/d raw_ij`` for the raw logits ``z``
    [M, C] (vocabulary columns ``col0 .. col0 + C``) into ``out`` (default: ``z`` itself, in place)
    in ``out``'s dtype; return it.

    ``coef`` is fp32 ``[M]`` (c), ``[2, M]`` (c, b) or ``[3, M]`` (c, b, g; needs ``dot``, the whole
    ``[V]`` fp32 vector u), unit stride along M.  Equals ``(c (onehot(target) - softmax(zz)) + b
    softmax(zz) + g u) * dzz/draw`` with ``zz`` the transformed fp32 logits, using the given row
    statistics (``one_minus_p`` is used at the target column).  ``bias`` is the whole ``[V]`` bias
    (indexed from ``col0``).  Rows whose coefficients are all zero get exactly 0.
    """
    M, C = z.shape
    out = z if out is None else out
    assert z.stride(1) == 1 and out.stride(1) == 1 and out.shape == z.shape
    k = 1 if coef.dim() == 1 else coef.shape[0]
    # (a single row may carry any stride along M: contiguous() leaves a [k, 1] tensor's strides as they are)
    assert coef.shape[-1] == M and (coef.stride(-1) == 1 or M <= 1) and coef.dtype == torch.float32 and 1 <= k <= 3
    if (k == 3) != (dot is not None) or (dot is not None and (dot.dim() != 1 or dot.shape[0] < col0 + C)):
        # not an assert: without the vector the kernel would read the coefficients as u (out of bounds)
        raise ValueError(f"coefficients [3, M] go with a dot vector covering the columns, and only they "
                         f"(coef {tuple(coef.shape)}, dot {None if dot is None else tuple(dot.shape)})")
    cfg = configs.dz_config()
    if M > 0 and C > 0:
        dz_kernel[(triton.cdiv(M, cfg.block_m), triton.cdiv(C, cfg.block_v))](
            z, out, _bias_arg(bias, z), target, m, log_norm, one_minus_p, coef, dot if dot is not None else coef,
            M, C, col0,
            z.stride(0), out.stride(0), coef.stride(0) if k > 1 else 0,
            opts.logit_scale or 1.0, opts.softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SCALE=opts.logit_scale is not None,
            HAS_SOFTCAP=opts.softcap is not None, HAS_B=k >= 2, HAS_DOT=k == 3,
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v,
            num_warps=cfg.num_warps,
        )
    return out
