"""The autograd layer: fused per-token row statistics, differentiable, and the summed loss with its
gradients computed in the forward.

Every loss this package computes is a function of three per-token statistics of the final logits
``z`` (see ``backends/__init__.py``): ``logp_i = z_i[y_i] - lse_i``, ``lse_i = logsumexp(z_i)`` and,
with a dot vector ``u`` (label smoothing), ``dotz_i = u . z_i``.  ``TargetLogprobFunction`` returns
them per token; its backward receives ``dLoss/dlogp``, ``dLoss/dlse`` and ``dLoss/ddotz`` (any
per-token vectors: objectives, gates, loss terms, reductions and per-token upstream gradients all
arrive here through ordinary autograd) and hands them to the backend as the per-token coefficients
of ``dz = c (onehot - p) + b p + g u``.

``ObjectiveSumFunction`` is the scalar-loss path for backends that offer ``forward_with_grad``:
``objective_coefficients`` turns the objective and the loss terms into the per-chunk ``coef_fn``
those backends call.

Double backward (``create_graph=True``, e.g. a gradient penalty): the per-token path supports it by
recomputing its gradient with differentiable PyTorch ops on materialised ``[N, V]`` fp32 logits
(only when a graph of the gradient is asked for); the gradients-in-forward path cannot (its
gradient is a number fixed during the forward) and raises instead of returning a gradient that
silently ignores its own dependence on the inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .options import CoefFn, LogitOptions, LossTerms


def dot_vector(terms: LossTerms, vocab: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """The ``[V]`` dot vector ``u`` of label smoothing (the class weights, else ones; float32 for the
    fused backends, float64 for the reference on float64 inputs), or None when the loss does not
    need ``dotz`` (no label smoothing)."""
    if terms.label_smoothing == 0:
        return None
    if terms.class_weight is not None:
        return terms.class_weight.detach().to(device=device, dtype=dtype).contiguous()
    return torch.ones(vocab, dtype=dtype, device=device)


def target_weights(class_weight: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``class_weight[target]`` on valid tokens, 0 elsewhere.  A valid target outside ``[0, V)``
    (possible on CUDA, where it is not checked on the host; its log-probability is NaN) reads
    entry 0 instead: never an out-of-bounds index."""
    w = class_weight.detach().to(device=target.device, dtype=dtype)
    inside = valid & (target >= 0) & (target < w.shape[0])
    got = w[torch.where(inside, target, torch.zeros_like(target))]
    return torch.where(valid, got, torch.zeros_like(got))


def token_terms(per_tok: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor, lse: Optional[torch.Tensor],
                dotz: Optional[torch.Tensor], target: torch.Tensor, terms: LossTerms, vocab: int,
                dot_sum) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(objective part, z-loss part)`` of the per-token losses (z part None without ``z_loss``):

    ``objective part = (1 - eps) * w_y * objective + kept * (eps / V) * (sum(u) * lse - dotz)``
    (``w_y`` = ``class_weight[target]``, 1 without; the smoothing term is ``-(eps / V) sum_j u_j
    log p_j``, as ``F.cross_entropy`` defines it), ``z part = valid * z_loss * lse**2``.
    ``per_tok`` is the objective's per-token loss (0 where not kept)."""
    out = per_tok
    if terms.class_weight is not None:
        out = out * target_weights(terms.class_weight, target, valid, per_tok.dtype)
    eps = terms.label_smoothing
    if eps != 0:
        smooth = (eps / vocab) * (dot_sum * lse - dotz)
        out = (1.0 - eps) * out + torch.where(kept, smooth, torch.zeros_like(smooth))
    z_part = None
    if terms.z_loss != 0:
        zl = terms.z_loss * lse * lse
        z_part = torch.where(valid, zl, torch.zeros_like(zl))
    return out, z_part


def _dot_sum(terms: LossTerms, dot: Optional[torch.Tensor], vocab: int):
    """``sum(u)``: V exactly for the uniform smoothing, a float64 sum of the class weights else."""
    if dot is None:
        return None
    if terms.class_weight is None:
        return float(vocab)
    return terms.class_weight.detach().to(dtype=torch.float64, device=dot.device).sum()


def objective_coefficients(objective, terms: LossTerms = LossTerms(), vocab: int = 0,
                           dot: Optional[torch.Tensor] = None) -> CoefFn:
    """``coef_fn(logp, lse, dotz, target, valid) -> (sum of per-token losses, kept, coef)`` for one
    chunk of ``[rows]`` vectors, all detached: what ``forward_with_grad`` backends call per token
    chunk.  ``coef`` is ``dSum/dlogp`` ``[rows]`` without loss terms, with ``dSum/dlse`` stacked
    under it with ``z_loss`` or label smoothing, and ``dSum/ddotz`` with label smoothing."""
    use_lse = terms.z_loss != 0 or terms.label_smoothing != 0
    use_dot = terms.label_smoothing != 0
    dot_sum = _dot_sum(terms, dot, vocab)

    def coef_fn(logp: torch.Tensor, lse: torch.Tensor, dotz: Optional[torch.Tensor], target: torch.Tensor,
                valid: torch.Tensor):
        with torch.enable_grad():
            lp = logp.detach().requires_grad_()
            ls = lse.detach().float().requires_grad_() if use_lse else None
            dz = dotz.detach().float().requires_grad_() if use_dot else None
            per_tok, kept = objective.per_token(lp, valid)
            obj_tok, z_tok = token_terms(per_tok, kept, valid, ls, dz, target, terms, vocab, dot_sum)
            total = obj_tok.sum() if z_tok is None else obj_tok.sum() + z_tok.sum().to(obj_tok.dtype)
            leaves = [t for t in (lp, ls, dz) if t is not None]
            grads = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad else [None] * len(leaves)
        # the backends' contract is float32 (an objective's own float64 tensors could promote)
        grads = [torch.zeros_like(t) if g is None else g.float() for t, g in zip(leaves, grads)]
        coef = grads[0] if len(grads) == 1 else torch.stack(grads)
        return total.detach().float(), kept, coef

    return coef_fn


def _backend_name(backend) -> str:
    return getattr(backend, "name", type(backend).__name__)


def _differentiable_grads(hidden, weight, bias, target, valid, coef, opts, needs, dot):
    """Gradients of ``sum(c logp + b lse + g dotz)`` as a graph (for double backward): PyTorch ops
    on materialised fp32 logits, so autograd can differentiate them again."""
    from .backends import reference

    wanted = [(i, t) for i, (t, n) in enumerate(zip((hidden, weight, bias), needs)) if n and t is not None]
    with torch.enable_grad():
        logp, lse, dotz, *_ = reference.target_logprob(hidden, weight, bias, target, valid, opts,
                                                       dot=dot if coef.shape[0] == 3 else None)
        outs = [logp, lse, dotz][:coef.shape[0]]
        grads = torch.autograd.grad(outs, [t for _, t in wanted], list(coef.to(logp.dtype)), create_graph=True,
                                    allow_unused=True)
    out = [None, None, None]
    for (i, t), g in zip(wanted, grads):
        out[i] = torch.zeros_like(t) if g is None else g
    return tuple(out)


class TargetLogprobFunction(torch.autograd.Function):
    """``(logp, lse, dotz, hit, argmax, entropy)`` [N] each, from one backend forward pass:
    ``logp``, ``lse`` and ``dotz`` (with ``dot``; an empty tensor without) are differentiable; the
    entropy row is computed only with ``row_stats`` (else unspecified).  Rows of invalid tokens: 0
    for the differentiable three, unspecified for the entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend, row_stats=False, dot=None):
        kw = {"row_stats": True} if row_stats else {}
        if dot is not None:
            kw["dot"] = dot
        logp, state, argmax, rows = backend.forward(hidden, weight, bias, target, valid, opts, **kw)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(valid, logp, zero)
        lse = torch.where(valid, rows[0], zero)
        dotz = torch.where(valid, rows[2], zero) if dot is not None else logp.new_empty(0)
        hit = valid & (argmax == target)
        ctx.save_for_backward(hidden, weight, bias, target, valid, state, dot)
        ctx.opts, ctx.backend = opts, backend
        ctx.set_materialize_grads(False)
        ent = rows[1].clone()
        ctx.mark_non_differentiable(hit, argmax, ent)
        return logp, lse, dotz, hit, argmax, ent

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_dotz, *_rest):
        hidden, weight, bias, target, valid, state, dot = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if not any(needs) or (g_logp is None and g_lse is None and g_dotz is None):
            return None, None, None, None, None, None, None, None, None
        n = valid.shape[0]
        zero = torch.zeros(n, dtype=torch.float32, device=valid.device)

        def masked(g):
            return zero if g is None else torch.where(valid, g.float(), zero)

        if g_dotz is not None and dot is not None:
            coef = torch.stack([masked(g_logp), masked(g_lse), masked(g_dotz)])
        elif g_lse is not None:
            coef = torch.stack([masked(g_logp), masked(g_lse)])
        else:
            coef = masked(g_logp)
        if torch.is_grad_enabled():
            # create_graph=True: the fused kernels' gradient is not itself differentiable
            if not getattr(ctx.backend, "supports_double_backward", True):
                raise RuntimeError(
                    f"double backward (create_graph=True) is not supported by backend="
                    f"{_backend_name(ctx.backend)!r}: e.g. a vocabulary-sharded (DTensor) weight, whose "
                    f"second-order graph would need the whole vocabulary on every rank")
            dx, dw, db = _differentiable_grads(hidden, weight, bias, target, valid,
                                               coef if coef.dim() == 2 else coef[None], ctx.opts, needs, dot)
        elif coef.dim() == 1:
            dx, dw, db = ctx.backend.backward(hidden, weight, bias, target, state, coef.contiguous(), ctx.opts, needs)
        else:
            kw = {"dot": dot} if coef.shape[0] == 3 else {}
            dx, dw, db = ctx.backend.backward(hidden, weight, bias, target, state, coef.contiguous(), ctx.opts,
                                              needs, **kw)
        return dx, dw, db, None, None, None, None, None, None


class ObjectiveSumFunction(torch.autograd.Function):
    """Summed loss with its gradients computed during the forward (backends that offer
    ``forward_with_grad``): used for scalar reductions only, where the upstream gradient is one
    number that the backward multiplies in.  Returns ``(total, logp, kept, hit, argmax, rows)``
    with ``rows [3, N] = (lse, entropy, dotz)`` (entropy only with ``row_stats``, dotz only with
    ``dot``); only ``total`` is differentiable, and only once (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, opts: LogitOptions, backend, coef_fn, row_stats=False,
                dot=None):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        kw = {"row_stats": True} if row_stats else {}
        if dot is not None:
            kw["dot"] = dot
        total, logp, kept, argmax, dx, dw, db, rows = backend.forward_with_grad(hidden, weight, bias, target, valid,
                                                                                 opts, coef_fn, needs, **kw)
        hit = valid & (argmax == target)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.backend_name = _backend_name(backend)
        ctx.consumed = False
        ctx.mark_non_differentiable(logp, kept, hit, argmax, rows)
        return total, logp, kept, hit, argmax, rows

    @staticmethod
    def backward(ctx, grad_total, *_rest):
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
        return (*grads, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# One operator schema for every fused backend, for torch.compile
#
# Eager calls go through TargetLogprobFunction above.  Under torch.compile the same two backend
# primitives run as two opaque operators whose schema does not depend on the backend (CPU C++,
# Triton chunked or fused: selected by name), with fake kernels for tracing and the autograd formula
# registered: the compiled graph holds one forward and one backward call per loss, whatever the
# backend, and no Python launcher code is traced.  Every registered backend's ``state`` is
# ``[3, N]`` float32 (row max, log-normaliser, log p), which is what lets the fake kernel know it.

@torch.library.custom_op("fused_objectives::row_logprob", mutates_args=())
def row_logprob_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                   valid: torch.Tensor, logit_scale: Optional[float], softcap: Optional[float], row_stats: bool,
                   dot: Optional[torch.Tensor], backend: str, n_coef: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor, torch.Tensor]:
    """``(logp [N], state [3, N], argmax [N], rows [3, N])`` of the named backend's forward.
    ``n_coef``: how many of (logp, lse, dotz) the loss differentiates (1, 2 or 3), i.e. the rows of
    the backward's coefficients: the generated autograd formula sees zero-filled gradients for unused
    outputs, so it cannot tell a plain objective (the classic ``[N]`` call) from one with an lse term."""
    from .backends import registered_backend

    impl = registered_backend(backend)
    kw = {"row_stats": True} if row_stats else {}
    if dot is not None:
        kw["dot"] = dot
    logp, state, argmax, rows = impl.forward(hidden, weight, bias, target, valid,
                                             LogitOptions(logit_scale=logit_scale, softcap=softcap), **kw)
    n = hidden.shape[0]
    if tuple(state.shape) != (3, n):
        raise RuntimeError(f"backend {backend!r} returned a state of shape {tuple(state.shape)}; the "
                           f"row_logprob operator needs [3, N] float32")
    return logp.float().clone(), state.float().clone(), argmax.clone(), rows.float().clone()


@row_logprob_op.register_fake
def _row_logprob_fake(hidden, weight, bias, target, valid, logit_scale, softcap, row_stats, dot, backend, n_coef):
    n = hidden.shape[0]
    f32 = torch.float32
    return (hidden.new_empty((n,), dtype=f32), hidden.new_empty((3, n), dtype=f32),
            hidden.new_empty((n,), dtype=torch.int64), hidden.new_empty((3, n), dtype=f32))


@torch.library.custom_op("fused_objectives::row_logprob_backward", mutates_args=())
def row_logprob_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            target: torch.Tensor, state: torch.Tensor, coef: torch.Tensor,
                            logit_scale: Optional[float], softcap: Optional[float], dot: Optional[torch.Tensor],
                            need_dx: bool, need_dw: bool, need_db: bool,
                            backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)`` of the named backend's backward (an empty tensor where not needed)."""
    from .backends import registered_backend

    impl = registered_backend(backend)
    opts = LogitOptions(logit_scale=logit_scale, softcap=softcap)
    needs = (need_dx, need_dw, need_db and bias is not None)
    kw = {"dot": dot} if coef.dim() == 2 and coef.shape[0] == 3 else {}
    grads = impl.backward(hidden, weight, bias, target, state, coef.contiguous(), opts, needs, **kw)
    # contiguous, as the fake kernel says (a backend's gradients are fresh tensors: no copy); a fresh
    # empty tensor per missing gradient: outputs of an operator may not alias each other
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


@row_logprob_backward_op.register_fake
def _row_logprob_backward_fake(hidden, weight, bias, target, state, coef, logit_scale, softcap, dot,
                               need_dx, need_dw, need_db, backend):
    # contiguous whatever the inputs' strides (a weight passed as param.T): the real gradients are
    return (hidden.new_empty(hidden.shape) if need_dx else hidden.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
            bias.new_empty(bias.shape) if (need_db and bias is not None) else hidden.new_empty(0))


def _row_logprob_setup(ctx, inputs, output):
    hidden, weight, bias, target, valid, logit_scale, softcap, row_stats, dot, backend, n_coef = inputs
    ctx.save_for_backward(hidden, weight, bias, target, valid, output[1], dot)
    ctx.logit_scale, ctx.softcap, ctx.backend, ctx.n_coef = logit_scale, softcap, backend, n_coef


def _row_logprob_backward(ctx, g_logp, _g_state, _g_argmax, g_rows):
    hidden, weight, bias, target, valid, state, dot = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    none = (None,) * 11
    if not (need_dx or need_dw or need_db):
        return none
    zero = torch.zeros(valid.shape[0], dtype=torch.float32, device=valid.device)

    def masked(g):
        return zero if g is None else torch.where(valid, g.float(), zero)

    c = masked(g_logp)
    if ctx.n_coef == 1 or g_rows is None:
        coef = c
    elif ctx.n_coef == 3 and dot is not None:
        coef = torch.stack([c, masked(g_rows[0]), masked(g_rows[2])])
    else:
        coef = torch.stack([c, masked(g_rows[0])])
    dx, dw, db = row_logprob_backward_op(hidden, weight, bias, target, state, coef, ctx.logit_scale, ctx.softcap,
                                         dot, need_dx, need_dw, bool(need_db and bias is not None), ctx.backend)
    return (dx if need_dx else None, dw if need_dw else None, db if (need_db and bias is not None) else None,
            None, None, None, None, None, None, None, None)


row_logprob_op.register_autograd(_row_logprob_backward, setup_context=_row_logprob_setup)


def compiled_logprob(hidden, weight, bias, target, valid, opts: LogitOptions, backend: str, row_stats=False,
                     dot=None, n_coef: int = 1):
    """What ``TargetLogprobFunction`` returns, through the operators above (``backend`` a name);
    ``n_coef``: 1 when only ``logp`` is differentiated, 2 with ``lse``, 3 with ``dotz`` too."""
    logp, _state, argmax, rows = row_logprob_op(hidden, weight, bias, target, valid, opts.logit_scale, opts.softcap,
                                                bool(row_stats), dot, backend, int(n_coef))
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(valid, logp, zero)
    lse = torch.where(valid, rows[0], zero)
    dotz = torch.where(valid, rows[2], zero) if dot is not None else None
    hit = valid & (argmax == target)
    return logp, lse, dotz, hit, argmax, rows[1].detach()
