"""Triton helpers shared by the kernels: accurate tanh, the logit transforms, one logits tile on chip."""
import triton
import triton.language as tl

@triton.jit
def tanh_sech2(x):
    """``(tanh(x), 1 - tanh(x)^2)`` in fp32, both to a few ulps for every x.

    ``(1 - e) / (1 + e)`` alone cancels for small |x| (at softcap=1e8 the soft-capped logits were
    percents off), and ``1 - t * t`` cancels for large |x|; ``4 e / (1 + e)^2`` has no subtraction.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    # odd Taylor series through x^13: truncation below 1e-10 relative at |x| = 0.3
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0 + x2 * (21844.0 / 6081075.0)))))))
    # above |x| = 0.3, e / (1 - e) < 1.3: the subtraction loses at most a bit
    t = tl.where(ax < 0.3, small, big)
    t = tl.where(x < 0, -t, t)
    d = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return t, d


@triton.jit
def transform_logits(z, offs_v, vmask, b_ptr, logit_scale, softcap,
                     HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """fp32 logits ``z`` [BLOCK_M, BLOCK_V] of columns ``offs_v`` -> ``(z', dz'/dz_raw without the
    scale)``: bias added, times ``logit_scale``, then ``softcap * tanh(z / softcap)``.  The second
    value is the soft-cap's derivative ``1 - tanh^2`` (1 without a soft-cap)."""
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)
        z = z + b[None, :]
    if HAS_SCALE:
        z = z * logit_scale
    d = tl.full(z.shape, 1.0, dtype=tl.float32)
    if HAS_SOFTCAP:
        t, d = tanh_sech2(z / softcap)
        z = softcap * t
    return z, d


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,
    tok, rmask, offs_v, vmask,
    H, stride_xn, stride_xh, stride_wv, stride_wh,
    logit_scale, softcap,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Logits ``z`` [BLOCK_N, BLOCK_V] of rows ``tok`` and columns ``offs_v`` in fp32, plus the
    soft-cap's derivative ``1 - tanh^2`` (1 without a soft-cap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < H
        # [BLOCK_N, BLOCK_H]
        x = tl.load(x_ptr + tok[:, None] * stride_xn + offs_h[None, :] * stride_xh,
                    mask=rmask[:, None] & hmask[None, :], other=0.0)
        # [BLOCK_H, BLOCK_V]
        w = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                    mask=vmask[None, :] & hmask[:, None], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return transform_logits(acc, offs_v, vmask, b_ptr, logit_scale, softcap, HAS_BIAS, HAS_SCALE, HAS_SOFTCAP)
