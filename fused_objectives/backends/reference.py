"""Reference backend: plain PyTorch that materialises the ``[N, V]`` logits.

It is the ground truth of every test and benchmark (called on float64 inputs it computes in
float64), and a user-selectable implementation (``backend="reference"``).  Gradients come from
PyTorch autograd, independently of the fused kernels' hand-written backward.  Like eager PyTorch it
takes ``log_softmax`` of fp32 logits, so for very confident tokens (``1 - p`` below ~6e-8) the fp32
loss rounds to 0 where the fused kernels keep ``-log1p(rest)``; in float64 that limit is ~1e-16.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..options import LogitOptions


class _LinearNoAutocast(torch.autograd.Function):
    """``x @ w.T`` whose forward *and backward* GEMMs keep the inputs' precision inside an autocast
    region: autograd's own matmul backward runs under the caller's autocast state (on CPU the
    backward runs in the calling thread), so in a bf16 region its dX/dW GEMMs ran in bf16."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return x @ w.T

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        # plain differentiable ops: a create_graph=True backward can differentiate them again
        with torch.autocast(x.device.type, enabled=False):
            dx = grad @ w if ctx.needs_input_grad[0] else None
            dw = grad.T @ x if ctx.needs_input_grad[1] else None
        return dx, dw


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], opts: LogitOptions) -> torch.Tensor:
    """``[N, V]`` logits in float32 (float64 for float64 inputs), transforms applied."""
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # fp32 logits and fp32 gradient GEMMs even inside an autocast region (bf16/fp16 otherwise)
    with torch.autocast(hidden.device.type, enabled=False):
        z = _LinearNoAutocast.apply(hidden.to(cdt), weight.to(cdt))
    if bias is not None:
        z = z + bias.to(cdt)
    if opts.logit_scale is not None:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


def target_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    valid: torch.Tensor,
    opts: LogitOptions,
    row_stats: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """``(logp [N], argmax_hit [N])`` for 2-D ``hidden``; 0 / False at invalid tokens.

    Equals ``torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]`` on valid tokens.
    With ``row_stats``, also ``(argmax [N], rows [2, N] = (logsumexp, softmax entropy))`` of the
    logits, detached (invalid tokens: those of a zeroed hidden state).
    """
    # ignored rows do not enter the computation (as in the fused kernels): a NaN there stays there
    hidden = torch.where(valid[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    z = logits(hidden, weight, bias, opts)
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    logp = torch.log_softmax(z, dim=-1).gather(1, safe_t[:, None])[:, 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    hit = valid & (z.detach().argmax(dim=-1) == target) if z.shape[0] else valid.clone()
    if not row_stats:
        return logp, hit
    zd = z.detach()
    lse = torch.logsumexp(zd, dim=-1)
    ls = zd - lse[:, None]
    p = ls.exp()
    # -sum p log p, a zero probability (e.g. a -inf logit) adding 0
    ent = -torch.where(p > 0, p * ls, torch.zeros((), dtype=p.dtype, device=p.device)).sum(dim=-1)
    argmax = zd.argmax(dim=-1) if z.shape[0] else torch.zeros_like(target)
    return logp, hit, argmax, torch.stack([lse, ent])
