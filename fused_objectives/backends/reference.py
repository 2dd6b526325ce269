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
    dot: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """``(logp, lse, dotz, hit, argmax, entropy)`` [N] each for 2-D ``hidden``, 0 / False at invalid
    tokens: the target log-probability, ``logsumexp`` and (with ``dot`` [V]) ``sum_j dot_j z_j`` of
    the final logits ``z``, all three differentiable through PyTorch autograd; ``hit`` (argmax is the
    target), the argmax and (with ``row_stats``) the softmax entropy, detached.  ``dotz`` is None
    without ``dot``, ``entropy`` None without ``row_stats``.

    ``logp`` equals ``torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]`` on valid tokens.
    """
    # ignored rows do not enter the computation (as in the fused kernels): a NaN there stays there
    hidden = torch.where(valid[:, None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    z = logits(hidden, weight, bias, opts)
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = torch.where(valid, torch.log_softmax(z, dim=-1).gather(1, safe_t[:, None])[:, 0], zero)
    lse = torch.where(valid, torch.logsumexp(z, dim=-1), zero)
    dotz = None if dot is None else torch.where(valid, z @ dot.to(z.dtype), zero)
    zd = z.detach()
    argmax = zd.argmax(dim=-1) if z.shape[0] else torch.zeros_like(target)
    hit = valid & (argmax == target)
    ent = None
    if row_stats:
        ls = zd - zd.logsumexp(dim=-1, keepdim=True)
        p = ls.exp()
        # -sum p log p, a zero probability (e.g. a -inf logit) adding 0
        ent = -torch.where(p > 0, p * ls, torch.zeros((), dtype=p.dtype, device=p.device)).sum(dim=-1)
    return logp, lse, dotz, hit, argmax, ent


class ReferenceBackend:
    """The backend contract (see ``backends/__init__.py``) on materialised logits: the executable
    specification of what a fused backend computes, and the inner backend of a vocabulary-parallel
    shard with ``backend="reference"``.  ``state`` is empty: the backward recomputes the logits and
    differentiates ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` with PyTorch autograd."""

    name = "reference"

    @staticmethod
    def unavailable_reason(device: torch.device) -> Optional[str]:
        return None

    def forward(self, hidden, weight, bias, target, valid, opts: LogitOptions, row_stats: bool = False,
                dot: Optional[torch.Tensor] = None):
        with torch.no_grad():
            logp, lse, dotz, _hit, argmax, ent = target_logprob(hidden, weight, bias, target, valid, opts,
                                                                row_stats=row_stats, dot=dot)
        rows = torch.zeros(3, logp.shape[0], dtype=torch.float32, device=logp.device)
        rows[0] = lse
        if ent is not None:
            rows[1] = ent
        if dotz is not None:
            rows[2] = dotz
        return logp.float(), None, argmax, rows

    def backward(self, hidden, weight, bias, target, state, coef, opts: LogitOptions, needs, dot=None):
        coef = coef if coef.dim() == 2 else coef[None]  # [K, N] (a reshape cannot infer K when N = 0)
        active = (coef != 0).any(dim=0)
        wanted = [(i, t) for i, (t, n) in enumerate(zip((hidden, weight, bias), needs)) if n and t is not None]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
            logp, lse, dotz, *_ = target_logprob(leaves[0], leaves[1], leaves[2], target, active, opts,
                                                 dot=dot if coef.shape[0] == 3 else None)
            total = (coef[0].to(logp.dtype) * logp).sum()
            if coef.shape[0] > 1:
                total = total + (coef[1].to(lse.dtype) * lse).sum()
            if coef.shape[0] > 2:
                total = total + (coef[2].to(dotz.dtype) * dotz).sum()
            grads = torch.autograd.grad(total, [leaves[i] for i, _ in wanted], allow_unused=True)
        out = [None, None, None]
        for (i, t), g in zip(wanted, grads):
            out[i] = torch.zeros_like(t) if g is None else g.to(t.dtype)
        return tuple(out)


#: the one instance (``parallel.localize`` wraps it for ``backend="reference"``)
BACKEND = ReferenceBackend()
