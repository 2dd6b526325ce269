"""Forward kernel: per-token logsumexp, target logit and argmax (optionally the softmax entropy and
``dotz = sum_j u_j z_j`` for a given [V] vector ``u``), logits never leaving the chip.

Grid: (token blocks, vocabulary splits).  Each program streams the vocabulary tiles of its split,
computing each ``[BLOCK_N, BLOCK_V]`` logits tile with ``tl.dot`` over H and merging it into an
online (max, sum-exp, argmax) state; the launcher merges the splits' partial states.  Only
*active* tokens are processed: ``row_idx`` lists them first and programs past ``n_active`` (read
from device memory, no host sync) exit at once, so ignored tokens cost no FLOPs.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..options import LogitOptions
from . import configs
from .common import logits_tile


@triton.jit
def lse_fwd_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, tgt_ptr, row_idx_ptr, n_active_ptr,
    m_ptr, rest_ptr, amax_ptr, tlogit_ptr, sent_ptr, dot_ptr, sdot_ptr,
    # sizes
    V, H, v_per_split,
    # strides
    stride_xn, stride_xh, stride_wv, stride_wh, stride_part,
    # logit transforms
    logit_scale, softcap,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ENTROPY: tl.constexpr, HAS_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_active = tl.load(n_active_ptr).to(tl.int64)
    row0 = pid_n * BLOCK_N
    if row0 >= n_active:
        return
    offs_r = row0 + tl.arange(0, BLOCK_N)
    rmask = offs_r < n_active
    tok = tl.load(row_idx_ptr + offs_r, mask=rmask, other=0)
    tgt = tl.load(tgt_ptr + tok, mask=rmask, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    # rest = sum of exp(z - m) over every column but the argmax (whose term is exactly 1): keeping
    # the 1 out preserves the digits of the small remainder, which set 1 - p for confident tokens
    rest = tl.zeros((BLOCK_N,), dtype=tl.float32)
    amax = tl.zeros((BLOCK_N,), dtype=tl.int64)
    tlogit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # ENTROPY: s = sum of exp(z - m) * (z - m), rescaled with m like rest (the argmax's term is 0)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # HAS_DOT: sd = sum of u_j * z_j (linear in z: no rescaling, the splits' partial sums just add)
    sd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        vmask = offs_v < v_hi
        # [BLOCK_N, BLOCK_V]
        z, _t = logits_tile(x_ptr, w_ptr, b_ptr, tok, rmask, offs_v, vmask,
                            H, stride_xn, stride_xh, stride_wv, stride_wh, logit_scale, softcap,
                            HAS_BIAS, HAS_SCALE, HAS_SOFTCAP, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        if HAS_DOT:
            u = tl.load(dot_ptr + offs_v, mask=vmask, other=0.0)
            sd += tl.sum(tl.where(vmask[None, :], z * u[None, :], 0.0), axis=1)
        z = tl.where(vmask[None, :], z, float("-inf"))
        # NaN logits reach the loss through the exp-sum below; max/argmax skip them (as the GPU does)
        z_ord = tl.where(z == z, z, float("-inf"))
        tile_max = tl.max(z_ord, axis=1)
        tile_arg = tl.argmax(z_ord, axis=1).to(tl.int64)
        # strict '>' keeps the first index of a tie, as torch.argmax does
        new_max = tile_max > m
        m_new = tl.maximum(m, tile_max)
        e = tl.exp(z - m_new[:, None])
        is_new_arg = new_max[:, None] & (offs_v[None, :] == (v0 + tile_arg)[:, None])
        tile_rest = tl.sum(tl.where(is_new_arg, 0.0, e), axis=1)
        if ENTROPY:
            # exp(dm) * (s + dm * (rest + 1)), dm = m - m_new <= 0; a zero exp (masked, -inf) adds 0
            dm = tl.where(m == float("-inf"), 0.0, m - m_new)  # no -inf * 0 below
            s_old = tl.where(m == float("-inf"), 0.0, tl.exp(dm) * (s + dm * (rest + 1.0)))
            zd = tl.where(e > 0.0, z - m_new[:, None], 0.0)  # masked / -inf columns: no 0 * inf
            s = tl.where(new_max, s_old, s) + tl.sum(e * zd, axis=1)
        rest = tl.where(new_max, (rest + 1.0) * tl.exp(m - m_new), rest) + tile_rest
        amax = tl.where(new_max, v0 + tile_arg, amax)
        m = m_new
        tlogit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)

    part = pid_s * stride_part + tok
    tl.store(m_ptr + part, m, mask=rmask)
    tl.store(rest_ptr + part, rest, mask=rmask)
    tl.store(amax_ptr + part, amax, mask=rmask)
    if ENTROPY:
        tl.store(sent_ptr + part, s, mask=rmask)
    if HAS_DOT:
        tl.store(sdot_ptr + part, sd, mask=rmask)
    # the one split whose range holds the target writes its logit (never for out-of-range targets)
    tl.store(tlogit_ptr + tok, tlogit, mask=rmask & (tgt >= v_lo) & (tgt < v_hi))


def fused_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    valid: torch.Tensor,
    opts: LogitOptions,
    dot_fp32: bool,
    entropy: bool = False,
    dot: Optional[torch.Tensor] = None,
):
    """``(logp [N] f32, lse_state [3, N] f32, argmax [N] int64, rows [3, N] f32)`` for 2-D ``hidden``
    [N, H].

    ``lse_state`` holds the row max ``m``, ``log(sum(exp(z - m)))`` and ``logp``: kept apart,
    ``z - m`` stays exact, so ``p`` near 1 (and ``1 - p`` in the gradient) keeps fp32 accuracy even
    when the logsumexp itself is large.  ``rows`` = (logsumexp, softmax entropy, ``sum_j dot_j z_j``):
    the entropy only when ``entropy`` and the dot product only when ``dot`` ([V] float32) is given
    (compile-time branches; otherwise those rows hold NaN and cost nothing).  Rows where
    ``valid`` is False are not computed (their outputs are unspecified); a valid token whose target is
    outside ``[0, V)`` gets a NaN log-probability.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    has_dot = dot is not None
    cfg = configs.forward_config(hidden.dtype, configs.capability_of(hidden.device), entropy=entropy,
                                 softcap=opts.softcap is not None, dot=has_dot)
    # valid tokens first; the kernels read the count from device memory (no host sync)
    row_idx = torch.argsort((~valid).to(torch.int8), stable=True)
    n_active = valid.sum(dtype=torch.int32).reshape(1)

    n_blocks = triton.cdiv(N, cfg.block_n)
    v_blocks = triton.cdiv(V, cfg.block_v)
    splits = max(1, min(v_blocks, triton.cdiv(configs.TARGET_PROGRAMS, max(n_blocks, 1))))
    v_per_split = triton.cdiv(v_blocks, splits) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)

    m = torch.full((splits, N), float("-inf"), dtype=torch.float32, device=dev)
    rest = torch.zeros((splits, N), dtype=torch.float32, device=dev)
    amax = torch.zeros((splits, N), dtype=torch.int64, device=dev)
    tlogit = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
    sent = torch.zeros((splits, N), dtype=torch.float32, device=dev) if entropy else None
    sdot = torch.zeros((splits, N), dtype=torch.float32, device=dev) if has_dot else None
    if has_dot:
        dot = dot.to(device=dev, dtype=torch.float32).contiguous()
    if N > 0:
        lse_fwd_kernel[(n_blocks, splits)](
            hidden, weight, bias if bias is not None else hidden, target, row_idx, n_active,
            m, rest, amax, tlogit, sent if entropy else tlogit,
            dot if has_dot else tlogit, sdot if has_dot else tlogit,
            V, H, v_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), N,
            opts.logit_scale or 1.0, opts.softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_SCALE=opts.logit_scale is not None,
            HAS_SOFTCAP=opts.softcap is not None, DOT_FP32=dot_fp32, PRECISION=configs.dot_precision(hidden.dtype),
            ENTROPY=entropy, HAS_DOT=has_dot,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if splits == 1:
        m_all, rest_all, argmax = m[0], rest[0], amax[0]
        s_all = sent[0] if entropy else None
    else:
        m_all, best = m.max(dim=0)  # first split holding the max: the first index of the max overall
        # every split's terms rescaled to the global max, its own max term (1) included, except the
        # best split's max term: that one is the global argmax, kept out of the remainder
        is_best = torch.arange(splits, device=dev)[:, None] == best[None, :]
        scaled = torch.where(is_best, rest, (rest + 1.0) * torch.exp(m - m_all[None, :]))
        rest_all = scaled.sum(dim=0)
        argmax = amax.gather(0, best[None, :])[0]
        if entropy:
            # each split's sum rescaled to the global max: exp(dm) * (s + dm * (rest + 1)) (its own
            # max term included in rest + 1; for the best split dm = 0); empty splits add 0
            dm = m - m_all[None, :]
            s_all = torch.where(m == float("-inf"), torch.zeros_like(sent),
                                torch.exp(dm) * (sent + dm * (rest + 1.0))).sum(dim=0)
    log_norm = torch.log1p(rest_all)
    logp = (tlogit - m_all) - log_norm
    state = torch.stack([m_all, log_norm, logp])
    rows = torch.full((3, N), float("nan"), dtype=torch.float32, device=dev)  # NaN where not computed
    torch.add(m_all, log_norm, out=rows[0])
    if entropy:
        torch.sub(log_norm, s_all / (rest_all + 1.0), out=rows[1])
    if has_dot:
        # dotz is linear in z: the splits' partial sums add (empty splits hold 0)
        torch.sum(sdot, dim=0, out=rows[2])
    return logp, state, argmax, rows
