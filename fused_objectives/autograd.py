"""The autograd layer: fused target log-probabilities, differentiable, and the summed objective
with its gradients computed in the forward.

``TargetLogprobFunction`` returns ``logp_i = z_i[y_i] - logsumexp(z_i)`` per token; its backward
receives ``dLoss/dlogp`` (any per-token vector: objectives, gates, reductions and per-token upstream
gradients all arrive here through ordinary autograd) and hands it to the backend as the per-token
coefficient of ``dz = c * (onehot - softmax)``.

``ObjectiveSumFunction`` is the scalar-loss path for backends that offer ``forward_with_grad``:
``objective_coefficients`` turns the objective into the per-chunk ``coef_fn`` those backends call.

Double backward (``create_graph=True``, e.g. a gradient penalty): the per-token path supports it by
recomputing its gradient with differentiable PyTorch ops on materialised ``[N, V]`` fp32 logits
(only when a graph of the gradient is asked for); the gradients-in-forward path cannot (its
gradient is a number fixed during the forward) and raises instead of returning a gradient that
silently ignores its own dependence on the inputs.
"""
from __future__ import annotations

import torch

from .options import CoefFn, LogitOptions



def objective_coefficients(objective) -> CoefFn:
    """``coef_fn(logp, valid) -> (sum of per-token losses, kept, dSum/dlogp)`` for one chunk of
    ``[rows]`` vectors, all detached: what ``forward_with_grad`` backends call per token chunk."""

    def coef_fn(logp: torch.Tensor, valid: torch.Tensor):
        with torch.enable_grad():
            lp = logp.detach().requires_grad_()
            per_tok, kept = objective.per_token(lp, valid)
            total = per_tok.sum()
            (grad,) = torch.autograd.grad(total, lp, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(lp)
        # the backends' contract is float32 (an objective's own float64 tensors could promote)
        return total.detach().float(), kept, grad.float()

    return coef_fn


def _backend_name(backend) -> str:
    return getattr(backend, "name", type(backend).__name__)


def _differentiable_grads(hidden, weight, bias, target, valid, coef, opts, needs):
    """Gradients of ``sum(coef * logp)`` as a graph (for double backward): PyTorch ops on
    materialised fp32 logits, so autograd can differentiate them again."""
    from .backends import reference

    wanted = [(i, t) for i, (t, n) in enumerate(zip((hidden, weight, bias), needs)) if n and t is not None]
    with torch.enable_grad():
        logp, _ = reference.target_logprob(hidden, weight, bias, target, valid, opts)
        grads = torch.autograd.grad(logp, [t for _, t in wanted], coef, create_graph=True, allow_unused=True)
    out = [None, None, None]
    for (i, t), g in zip(wanted, grads):
        out[i] = torch.zeros_like(t) if g is None else g
    return tuple(out)


class TargetLogprobFunction(torch.autograd.Function):
    """``(logp, hit)``; with ``row_stats=True`` also ``(argmax [N], rows [2, N] = (lse, entropy))``
    from the backend's same forward pass (rows of invalid tokens unspecified)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend, row_stats=False):
        if row_stats:
            logp, state, argmax, rows = backend.forward(hidden, weight, bias, target, valid, opts, row_stats=True)
        else:
            logp, state, argmax = backend.forward(hidden, weight, bias, target, valid, opts)
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        hit = valid & (argmax == target)
        ctx.save_for_backward(hidden, weight, bias, target, valid, state)
        ctx.opts, ctx.backend = opts, backend
        if row_stats:
            ctx.mark_non_differentiable(hit, argmax, rows)
            return logp, hit, argmax, rows
        ctx.mark_non_differentiable(hit)
        return logp, hit

    @staticmethod
    def backward(ctx, grad_logp, _grad_hit, *_grad_rows):
        hidden, weight, bias, target, valid, state = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if grad_logp is None or not any(needs):
            return None, None, None, None, None, None, None, None
        coef = torch.where(valid, grad_logp.float(), torch.zeros_like(grad_logp, dtype=torch.float32))
        if torch.is_grad_enabled():
            # create_graph=True: the fused kernels' gradient is not itself differentiable
            dx, dw, db = _differentiable_grads(hidden, weight, bias, target, valid, coef, ctx.opts, needs)
        else:
            dx, dw, db = ctx.backend.backward(hidden, weight, bias, target, state, coef.contiguous(), ctx.opts, needs)
        return dx, dw, db, None, None, None, None, None


class ObjectiveSumFunction(torch.autograd.Function):
    """Summed objective with its gradients computed during the forward (backends that offer
    ``forward_with_grad``): used for scalar reductions only, where the upstream gradient is one
    number that the backward multiplies in.  Returns ``(total, logp, kept, hit)``, and with
    ``row_stats=True`` also ``(argmax, rows [2, N] = (lse, entropy))``; only ``total`` is
    differentiable, and only once (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend, coef_fn, row_stats=False):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if row_stats:
            total, logp, kept, argmax, dx, dw, db, rows = backend.forward_with_grad(
                hidden, weight, bias, target, valid, opts, coef_fn, needs, row_stats=True)
        else:
            total, logp, kept, argmax, dx, dw, db = backend.forward_with_grad(
                hidden, weight, bias, target, valid, opts, coef_fn, needs)
        hit = valid & (argmax == target)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.backend_name = _backend_name(backend)
        ctx.consumed = False
        if row_stats:
            ctx.mark_non_differentiable(logp, kept, hit, argmax, rows)
            return total, logp, kept, hit, argmax, rows
        ctx.mark_non_differentiable(logp, kept, hit)
        return total, logp, kept, hit

    @staticmethod
    def backward(ctx, grad_total, _g_logp, _g_kept, _g_hit, *_g_rows):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"double backward (create_graph=True, e.g. a gradient penalty) is not supported by "
                f"backend={ctx.backend_name!r} with reduction='mean' or 'sum': it computes the "
                f"gradients during the forward pass, so they cannot be differentiated again. Use "
                f"reduction='none' and reduce the per-token losses yourself (that path recomputes a "
                f"differentiable gradient on materialised logits), or backend='reference'.")
        if ctx.consumed:
            raise RuntimeError(
                f"a second backward through the same mean/sum loss (retain_graph=True) is not "
                f"supported by backend={ctx.backend_name!r}: its gradients are computed during the "
                f"forward pass and the first backward hands them over (scaled in place, so no "
                f"gradient-sized copy is made). Compute the loss again, use reduction='none' and "
                f"reduce it yourself, or backend='reference'.")
        ctx.consumed = True
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            # in place: a gradient-sized copy here would be the largest extra buffer of the step
            grads.append(None if g is None else g.mul_(grad_total).to(dtype))
        return (*grads, None, None, None, None, None, None)
