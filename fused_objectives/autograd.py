"""The one autograd Function: fused target log-probabilities, differentiable.

Forward returns ``logp_i = z_i[y_i] - logsumexp(z_i)`` per token; backward receives
``dLoss/dlogp`` (any per-token vector: objectives, gates, reductions and per-token upstream
gradients all arrive here through ordinary autograd) and hands it to the backend as the
per-token coefficient of ``dz = c * (onehot - softmax)``.
"""
from __future__ import annotations

import torch

from .options import LogitOptions


class TargetLogprobFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend):
        logp, state, argmax = backend.forward(hidden, weight, bias, target, valid, opts)
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        hit = valid & (argmax == target)
        ctx.save_for_backward(hidden, weight, bias, target, valid, state)
        ctx.opts, ctx.backend = opts, backend
        ctx.mark_non_differentiable(hit)
        return logp, hit

    @staticmethod
    def backward(ctx, grad_logp, _grad_hit):
        hidden, weight, bias, target, valid, state = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if grad_logp is None or not any(needs):
            return None, None, None, None, None, None, None
        coef = torch.where(valid, grad_logp.float(), torch.zeros_like(grad_logp, dtype=torch.float32))
        dx, dw, db = ctx.backend.backward(hidden, weight, bias, target, state, coef.contiguous(), ctx.opts, needs)
        return dx, dw, db, None, None, None, None


class ObjectiveSumFunction(torch.autograd.Function):
    """Summed objective with its gradients computed during the forward (backends that offer
    ``forward_with_grad``): used for scalar reductions only, where the upstream gradient is one
    number that the backward multiplies in.  Returns ``(total, logp, kept, hit)``; only ``total``
    is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend, coef_fn):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        total, logp, kept, argmax, dx, dw, db = backend.forward_with_grad(
            hidden, weight, bias, target, valid, opts, coef_fn, needs)
        hit = valid & (argmax == target)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, kept, hit)
        return total, logp, kept, hit

    @staticmethod
    def backward(ctx, grad_total, _g_logp, _g_kept, _g_hit):
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if g is None else (g * grad_total).to(dtype))
        return (*grads, None, None, None, None, None)
