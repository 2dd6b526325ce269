"""Triton helpers shared by the forward and backward kernels: one logits tile, computed on chip."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no tanh on every Triton version; odd-symmetric form stays finite for any |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def expm1(x):
    # exp(x) - 1 without cancellation near 0 (tl has no expm1): a Taylor polynomial there, whose
    # relative error is below x^4/120 < 1e-9 for |x| < 1e-2
    small = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0))))
    return tl.where(tl.abs(x) < 1e-2, small, tl.exp(x) - 1.0)


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
    """Logits ``z`` [BLOCK_N, BLOCK_V] of rows ``tok`` and columns ``offs_v`` in fp32, plus
    ``tanh(raw * scale / softcap)`` (the soft-cap's derivative needs it; 0 without a soft-cap)."""
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
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=vmask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if HAS_SCALE:
        acc = acc * logit_scale
    t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_SOFTCAP:
        t = tanh(acc / softcap)
        acc = softcap * t
    return acc, t
