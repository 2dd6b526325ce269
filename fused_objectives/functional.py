"""Public functional API: ``linear_objective_loss`` and ``target_logprob``.

One validation layer for every backend, then the per-token log-probabilities (fused backend
through the autograd Function, or the reference), then the objective and the reduction on
``[N]`` vectors.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Callable, Optional, Tuple, Union

import torch

from .autograd import ObjectiveSumFunction, TargetLogprobFunction, dot_vector, objective_coefficients, token_terms
from .autograd import compiled_logprob, target_weights
from .autograd import _dot_sum
from .backends import REFERENCE, check_backend_name, name_of, reference, resolve_backend
from .objectives import Objective, get_objective
from . import parallel
from .options import LogitOptions, LossTerms

__all__ = ["linear_objective_loss", "target_logprob", "LossStats", "validate_options"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
_NORMALIZE = ("valid", "kept")
_INT64 = (-(2**63), 2**63 - 1)


@dataclass
class LossStats:
    """Per-token statistics of one call, computed without logits (all tensors, no host sync).

    ``logp``: detached target log-probabilities shaped like ``target`` (0 at invalid positions);
    ``valid`` / ``kept``: bool masks; ``hit``: bool mask of valid tokens whose argmax is the target; ``n_valid`` / ``n_kept``: int64 counts; ``accuracy``: share of
    valid tokens whose argmax logit is the target (0 when none is valid); ``mean_p``: mean target
    probability over valid tokens.  Row statistics of the final logits ``z`` (after ``logit_scale``
    and ``softcap``), from the same pass (no ``[N, V]`` tensor), shaped like ``target``:
    ``lse``: ``logsumexp(z)`` (0 at invalid positions); ``entropy``: the softmax entropy
    ``-sum_j p_j log p_j`` (0 at invalid positions); ``predicted``: the argmax id (first index of a
    tie; ``ignore_index`` at invalid positions).  ``z_loss``: the z-loss term's contribution to the
    returned loss (reduced like it: a scalar for ``"mean"`` / ``"sum"``, per token for ``"none"``;
    0 without ``z_loss``).  Also readable as a mapping: ``stats["accuracy"]``.
    """

    logp: torch.Tensor
    valid: torch.Tensor
    kept: torch.Tensor
    hit: torch.Tensor
    n_valid: torch.Tensor
    n_kept: torch.Tensor
    accuracy: torch.Tensor
    mean_p: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    predicted: torch.Tensor
    z_loss: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return tuple(f.name for f in fields(self))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.keys()}


def _check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index {ignore_index} does not fit in int64 (the targets' dtype); "
                         f"use a value in [-2**63, 2**63 - 1], e.g. -100")


def _check_flag(name, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def validate_options(
    *,
    objective: Union[str, Objective, Callable[[torch.Tensor], torch.Tensor]] = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "valid",
    shift: bool = False,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    backend: str = "auto",
    return_stats: bool = False,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
) -> Objective:
    """Check the options of :func:`linear_objective_loss` without any tensor (e.g. when a module or
    a patched model is configured) and return the resolved objective; raises the same
    ``TypeError`` / ``ValueError`` the call would.  Not checked here, because they depend on the
    call: whether the backend can run on the inputs' device, and ``num_items_in_batch``."""
    return _validated(objective=objective, ignore_index=ignore_index, reduction=reduction, normalize=normalize,
                      shift=shift, softcap=softcap, logit_scale=logit_scale, backend=backend,
                      return_stats=return_stats, z_loss=z_loss, label_smoothing=label_smoothing,
                      class_weight=class_weight)[0]


def _validated(*, objective, ignore_index, reduction, normalize, shift, softcap, logit_scale, backend, return_stats,
               z_loss, label_smoothing, class_weight) -> Tuple[Objective, LossTerms]:
    """:func:`validate_options`, also returning the checked :class:`LossTerms` (built once per call)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    _check_ignore_index(ignore_index)
    _check_flag("shift", shift)
    _check_flag("return_stats", return_stats)
    LogitOptions(logit_scale=logit_scale, softcap=softcap)
    terms = LossTerms(z_loss=z_loss, label_smoothing=label_smoothing, class_weight=class_weight)
    check_backend_name(backend)
    return get_objective(objective), terms


def _check_inputs(hidden, weight, target, bias, ignore_index, shift, backend_name):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (shape {tuple(t.shape)}, no data): the loss needs "
                             f"real values; materialise the model (e.g. to_empty() and load weights) first")
    allowed = _FLOAT_DTYPES + ((torch.float64,) if backend_name == REFERENCE else ())
    if hidden.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"hidden must be a floating tensor of dtype {names}; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor (int64), got {target.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    V, H = weight.shape
    if V == 0 or H == 0:
        raise ValueError(f"weight must have V >= 1 and H >= 1, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} must equal weight's H = {H} "
                         f"(hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)})")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])} (hidden {tuple(hidden.shape)})")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape [V] = ({V},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    _check_ignore_index(ignore_index)
    _check_flag("shift", shift)
    if shift and target.dim() < 1:
        raise ValueError("shift=True needs target with a sequence dimension, got a 0-dim target")


@torch.library.custom_op("fused_objectives::checked_count", mutates_args=())
def _checked_count(count: torch.Tensor) -> torch.Tensor:
    """A copy of the 0-dim float64 CPU ``num_items_in_batch``, raising ``ValueError`` unless it is
    finite and >= 0."""
    v = float(count)
    if not math.isfinite(v):
        raise ValueError(f"num_items_in_batch must be finite, got {v}")
    if v < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {v:g}")
    return count.clone()


@_checked_count.register_fake
def _checked_count_fake(count):
    return torch.empty_like(count)


@torch.library.custom_op("fused_objectives::valid_targets", mutates_args=())
def _valid_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor:
    """``target != ignore_index`` for a CPU ``target`` [N] (int64), raising ``ValueError`` when a
    valid target lies outside ``[0, vocab)``.  An operator, so the check runs inside the kernel:
    ``torch.compile`` (fullgraph) sees one opaque op instead of a data-dependent Python branch."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target holds {int(target[i])} at flat position {i}, outside [0, {vocab}) "
                         f"and not ignore_index={ignore_index}")
    return valid


@_valid_targets.register_fake
def _valid_targets_fake(target, vocab, ignore_index):
    return torch.empty_like(target, dtype=torch.bool)


def _prepare(hidden, weight, target, bias, ignore_index, shift, softcap, logit_scale, backend):
    """Validate, flatten to 2-D and resolve the backend: ``(h2, t1, valid, opts, backend, shape, weight,
    bias)`` (a DTensor weight / bias comes back as this rank's local shard, with a backend that
    combines the shards' statistics)."""
    _check_inputs(hidden, weight, target, bias, ignore_index, shift, backend if isinstance(backend, str) else None)
    opts = LogitOptions(logit_scale=logit_scale, softcap=softcap)
    impl = resolve_backend(backend, hidden.device)
    V = weight.shape[0]
    if parallel.is_dtensor(weight) or parallel.is_dtensor(hidden):
        # vocabulary-parallel: each rank computes its shard's statistics (parallel.py)
        hidden, weight, bias, impl = parallel.localize(hidden, weight, bias, impl)
    shape = tuple(target.shape)
    target = target.long()
    if shift:
        # hidden[..., t, :] predicts target[..., t + 1]; the last position predicts nothing
        pad = torch.full_like(target[..., :1], ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    t1 = target.reshape(-1).contiguous()  # the kernels index targets with unit stride
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if hidden.device.type == "cpu":
        valid = _valid_targets(t1, V, ignore_index)
    else:  # CUDA: no host sync; an out-of-range target makes its log-probability NaN
        valid = t1 != ignore_index
    return h2, t1, valid, opts, impl, shape, weight, bias


def _grad_in_forward(impl, dtype) -> bool:
    """Whether a scalar loss takes the backend's gradients-in-the-forward path for this dtype (a
    backend may decline it per dtype with ``grad_in_forward(dtype)``)."""
    if impl == REFERENCE or not hasattr(impl, "forward_with_grad"):
        return False
    choose = getattr(impl, "grad_in_forward", None)
    return True if choose is None else bool(choose(dtype))


def _logprob(h2, weight, bias, t1, valid, opts, impl, row_stats=False, dot=None, n_coef=1):
    """``(logp, lse, dotz, hit, argmax, entropy)`` [N] each: ``logp``, ``lse`` and ``dotz`` (None
    without ``dot``) differentiable, the entropy only with ``row_stats`` (else unspecified)."""
    if impl == REFERENCE:
        return reference.target_logprob(h2, weight, bias, t1, valid, opts, row_stats=row_stats, dot=dot)
    name = name_of(impl)
    if name is not None and torch.compiler.is_compiling():
        # one opaque operator pair, whatever the backend (autograd.row_logprob_op)
        return compiled_logprob(h2, weight, bias, t1, valid, opts, name, row_stats, dot, n_coef)
    logp, lse, dotz, hit, argmax, ent = TargetLogprobFunction.apply(h2, weight, bias, t1, valid, opts, impl,
                                                                   row_stats, dot)
    return logp, lse, dotz if dot is not None else None, hit, argmax, ent


def target_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable ``log p(target)`` per token, float32, shaped like ``target``.

    Equals ``torch.log_softmax(z.float(), -1).gather(-1, target[..., None])[..., 0]`` with
    ``z = hidden @ weight.T (+ bias)`` (then scaled and soft-capped), without materialising ``z``;
    0 with zero gradient at positions whose (shifted) target is ``ignore_index``.
    """
    h2, t1, valid, opts, impl, shape, weight, bias = _prepare(hidden, weight, target, bias, ignore_index, shift,
                                                              softcap, logit_scale, backend)
    logp = _logprob(h2, weight, bias, t1, valid, opts, impl)[0]
    return logp.reshape(shape)


def _count_tensor(value: torch.Tensor, device: torch.device, host_check: bool) -> torch.Tensor:
    """A ``num_items_in_batch`` tensor as a float64 scalar on ``device``.

    Checked on the host (shape, dtype, device) always; its value (finite and >= 0) is checked on the
    host when ``host_check`` (a CPU tensor: reading it is free), else on the device without a sync:
    an invalid count then makes the denominator, and so the loss, NaN."""
    if value.numel() != 1:
        raise ValueError(f"num_items_in_batch must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"num_items_in_batch must be an integer or floating tensor (a token count), got {value.dtype}")
    if value.device.type == "meta":
        raise ValueError("num_items_in_batch is a meta tensor (no data); pass a real count")
    count = value.detach().reshape(()).to(dtype=torch.float64)
    if host_check:
        # read where the tensor lives (the CPU), before it moves to the loss's device; an operator,
        # so a compiled graph (fullgraph) keeps the check instead of a data-dependent branch
        return _checked_count(count).to(device)
    count = count.to(device)
    ok = torch.isfinite(count) & (count >= 0)
    return torch.where(ok, count, torch.full_like(count, float("nan")))


def _num_items(num_items_in_batch, device) -> Optional[torch.Tensor]:
    """The validated ``num_items_in_batch`` as a scalar tensor on ``device`` (None when not given)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        return _count_tensor(num_items_in_batch, device, host_check=num_items_in_batch.device.type == "cpu")
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be an int or a 0-dim tensor, got {type(num_items_in_batch).__name__}")
    if not math.isfinite(num_items_in_batch):
        raise ValueError(f"num_items_in_batch must be finite, got {num_items_in_batch}")
    if num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return torch.tensor(float(num_items_in_batch), dtype=torch.float64, device=device)


def _parameter_term(obj: Objective, logp: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
                    terms: LossTerms) -> Optional[torch.Tensor]:
    """Zero, with the gradient of the summed objective with respect to the objective's own tensors
    (e.g. a learnable focal gamma), or None when it has none: the gradients-in-forward path
    differentiates the objective with respect to ``logp`` only, so autograd would not reach them."""
    if not torch.is_grad_enabled():
        return None
    per_tok, _kept = obj.per_token(logp.detach(), valid)
    if not per_tok.requires_grad:  # the built-in objectives: no tensors of their own
        return None
    if terms.class_weight is not None:
        per_tok = per_tok * target_weights(terms.class_weight, target, valid, per_tok.dtype)
    extra = (1.0 - terms.label_smoothing) * per_tok.sum()
    # finite check: inf - inf would turn an infinite loss into NaN
    return torch.where(torch.isfinite(extra), extra - extra.detach(), torch.zeros_like(extra))


def _safe_div(total: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``total / denom``, and 0 (with zero gradients) where ``denom`` is 0."""
    denom = denom.to(total.dtype)
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, torch.ones_like(denom)), total * 0.0)


def linear_objective_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    objective: Union[str, Objective, Callable[[torch.Tensor], torch.Tensor]] = "nll",
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: str = "valid",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    shift: bool = False,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    backend: str = "auto",
    return_stats: bool = False,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    class_weight: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, LossStats]]:
    """A supervised fine-tuning objective of the LM head's target probabilities, fused.

    With ``z = hidden @ weight.T (+ bias)`` (times ``logit_scale``, then
    ``softcap * tanh(z / softcap)``) and ``l = log_softmax(z.float())[target]``, the per-token loss
    is ``objective(l)`` on *kept* tokens (valid, and passing the objective's gate).  With
    ``objective="nll"`` and ``reduction="mean"`` this equals
    ``F.cross_entropy(z.float().view(-1, V), target.view(-1), ignore_index=ignore_index)``.

    Reductions: ``"none"`` gives per-token losses shaped like ``target`` (0 where not kept);
    ``"sum"`` their sum; ``"mean"`` the sum divided by the number of valid tokens
    (``normalize="valid"``, Hugging Face) or of kept tokens (``normalize="kept"``, the paper's
    reference trainer), or by ``num_items_in_batch`` when given (gradient accumulation).  A zero
    denominator gives 0 with zero gradients.  The loss is float32; gradients come back in the
    input dtypes.  ``return_stats=True`` returns ``(loss, LossStats)``.

    On CUDA, a target outside ``[0, V)`` that is not ``ignore_index`` makes that token's
    log-probability, and so the loss, NaN (no host sync, no out-of-bounds read); on CPU it raises.
    ``num_items_in_batch``: a Python number or a CPU tensor must be finite and >= 0 (else
    ``ValueError``); a tensor must hold one element of an integer or floating dtype (not bool,
    complex or meta: ``TypeError`` / ``ValueError``); a CUDA tensor's value is checked on the device
    without a host sync: a negative or non-finite count makes the loss NaN.

    Loss terms (all computed from the same pass, no ``[N, V]`` tensor), with ``w_i =
    class_weight[target_i]`` (1 without), ``u = class_weight`` (ones without), ``eps =
    label_smoothing`` and ``lse_i = logsumexp(z_i)``, the per-token loss is
    ``(1 - eps) * w_i * objective(l_i) + (eps / V) * sum_j u_j (lse_i - z_ij)`` on kept tokens, plus
    ``z_loss * lse_i**2`` on valid tokens.  For ``objective="nll"`` this is exactly
    ``F.cross_entropy(z, target, weight=class_weight, label_smoothing=eps)`` (every reduction) plus
    the z-loss of PaLM / Liger's ``lse_square_scale``; for the other objectives the smoothing term is
    the same uniform cross-entropy mixed in on the tokens the objective keeps.  ``"mean"`` divides the
    objective part by the sum of ``w_i`` over valid (``normalize="kept"``: kept) tokens, as torch's
    weighted mean does, and the z-loss part by the count of valid tokens (Liger's semantics, whatever
    ``normalize`` says: the z-loss is on valid tokens); ``num_items_in_batch``
    replaces both denominators (with class weights, pass the sum of the target weights over the
    accumulated micro-batches to get torch's weighted mean).  ``z_loss`` >= 0, ``label_smoothing`` in
    [0, 1], ``class_weight`` a ``[V]`` floating tensor on the inputs' device, finite and >= 0
    (checked for CPU tensors; a CUDA tensor is not read on the host).  ``LossStats.z_loss`` reports
    the z-loss part of the returned loss.

    Precision: fp16 inputs need a loss scaler (``torch.amp.GradScaler``), as in any fp16 training:
    a gradient entry below fp16's smallest subnormal (6e-8; e.g. a mean over many tokens times
    small probabilities) rounds to 0 when the gradients are returned in fp16.  bf16 has fp32's range.
    Double backward (``create_graph=True``) works with ``reduction="none"`` on every backend (its
    second-order graph materialises fp32 ``[N, V]`` logits) and with ``backend="reference"``; a
    fused backend's scalar reductions compute the gradients in the forward and raise instead.
    """
    obj, terms = _validated(objective=objective, ignore_index=ignore_index, reduction=reduction,
                            normalize=normalize, shift=shift, softcap=softcap, logit_scale=logit_scale,
                            backend=backend, return_stats=return_stats, z_loss=z_loss,
                            label_smoothing=label_smoothing, class_weight=class_weight)
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch is the denominator of reduction='mean'; "
                         f"it cannot be combined with reduction={reduction!r}")
    if num_items_in_batch is not None and normalize == "kept":
        raise ValueError("num_items_in_batch (a count of valid tokens across micro-batches) cannot be "
                         "combined with normalize='kept'; use normalize='valid' or drop num_items_in_batch")
    V = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    h2, t1, valid, opts, impl, shape, weight, bias = _prepare(hidden, weight, target, bias, ignore_index, shift,
                                                              softcap, logit_scale, backend)
    terms.check_weight(V, h2.device)
    dot = dot_vector(terms, V, h2.device, torch.float64 if h2.dtype == torch.float64 else torch.float32)
    items = _num_items(num_items_in_batch, h2.device)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    weighted = terms.class_weight is not None
    # under torch.compile the per-token path runs (its operators have fake kernels and trace into
    # one graph); the gradients-in-forward path loops on the host over data-dependent token chunks.
    # A z-loss with class weights or normalize="kept" has its own denominator (the valid count): the
    # per-token path keeps the two apart
    scalar_path = (reduction != "none" and wants_grad and _grad_in_forward(impl, h2.dtype)
                   and not torch.compiler.is_compiling()
                   and not (terms.z_loss != 0 and (weighted or normalize == "kept")))
    z_tok = None
    if scalar_path:
        # a scalar loss: the backend computes the gradients while the logits are at hand
        total, logp, kept, hit, argmax, rows = ObjectiveSumFunction.apply(
            h2, weight, bias, t1, valid, opts, impl, objective_coefficients(obj, terms, V, dot), return_stats, dot)
        term = _parameter_term(obj, logp, valid, t1, terms)
        total = total if term is None else total + term.to(total.dtype)
        lse, ent = rows[0], rows[1]
        if terms.z_loss != 0:
            z_tok = torch.where(valid, terms.z_loss * lse * lse, torch.zeros_like(lse))
        obj_total, z_total = total, None
    else:
        n_coef = 3 if dot is not None else 2 if (terms.z_loss != 0 or terms.label_smoothing != 0) else 1
        logp, lse, dotz, hit, argmax, ent = _logprob(h2, weight, bias, t1, valid, opts, impl,
                                                     row_stats=return_stats, dot=dot, n_coef=n_coef)
        per_tok, kept = obj.per_token(logp, valid)
        if terms.active:
            per_tok, z_tok = token_terms(per_tok, kept, valid, lse, dotz, t1, terms, V, _dot_sum(terms, dot, V))
        obj_total = per_tok.sum()
        z_total = None if z_tok is None else z_tok.sum().to(obj_total.dtype)

    count = valid.sum() if normalize == "valid" else kept.sum()
    if reduction == "none":
        loss = (per_tok if z_tok is None else per_tok + z_tok.to(per_tok.dtype)).reshape(shape)
        z_report = None if z_tok is None else z_tok.detach().reshape(shape)
    elif reduction == "sum":
        loss = obj_total if z_total is None else obj_total + z_total
        z_report = None if z_tok is None else z_tok.detach().sum()
    else:
        if items is not None:
            denom = z_denom = items
        else:
            # the z-loss is on valid tokens: its mean is over them, whatever normalize says (Liger)
            z_denom = valid.sum()
            if weighted:
                w = target_weights(terms.class_weight, t1, valid, torch.float64)
                denom = torch.where(valid if normalize == "valid" else kept, w, torch.zeros_like(w)).sum()
            else:
                denom = count
        loss = _safe_div(obj_total, denom)
        if z_total is not None:
            loss = loss + _safe_div(z_total, z_denom)
        z_report = None if z_tok is None else _safe_div(z_tok.detach().sum(), z_denom)
    if not return_stats:
        return loss
    n_valid = valid.sum()
    n_kept = kept.sum()
    safe_n = n_valid.clamp(min=1).to(torch.float32)
    lp = logp.detach()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    if z_report is None:
        z_report = torch.zeros(shape, dtype=torch.float32, device=lp.device) if reduction == "none" else zero
    stats = LossStats(
        logp=lp.reshape(shape),
        valid=valid.reshape(shape),
        kept=kept.reshape(shape),
        hit=hit.reshape(shape),
        n_valid=n_valid,
        n_kept=n_kept,
        accuracy=hit.sum().to(torch.float32) / safe_n,
        mean_p=torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum().to(torch.float32) / safe_n,
        lse=torch.where(valid, lse.detach().float(), zero).reshape(shape),
        entropy=torch.where(valid, ent.detach().float(), zero).reshape(shape),
        predicted=torch.where(valid, argmax, torch.full_like(argmax, ignore_index)).reshape(shape),
        z_loss=z_report.float(),
    )
    return loss, stats
