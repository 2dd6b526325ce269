"""Public functional API: ``linear_objective_loss`` and ``target_logprob``.

One validation layer for every backend, then the per-token log-probabilities (fused backend
through the autograd Function, or the reference), then the objective and the reduction on
``[N]`` vectors.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Callable, Optional, Tuple, Union

import torch

from .autograd import ObjectiveSumFunction, TargetLogprobFunction
from .backends.chunked import objective_coefficients
from .backends import REFERENCE, reference, resolve_backend
from .objectives import Objective, get_objective
from .options import LogitOptions

__all__ = ["linear_objective_loss", "target_logprob", "LossStats"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
_NORMALIZE = ("valid", "kept")


@dataclass
class LossStats:
    """Per-token statistics of one call, computed without logits (all tensors, no host sync).

    ``logp``: detached target log-probabilities shaped like ``target`` (0 at invalid positions);
    ``valid`` / ``kept``: bool masks; ``hit``: bool mask of valid tokens whose argmax is the target; ``n_valid`` / ``n_kept``: int64 counts; ``accuracy``: share of
    valid tokens whose argmax logit is the target (0 when none is valid); ``mean_p``: mean target
    probability over valid tokens.  Also readable as a mapping: ``stats["accuracy"]``.
    """

    logp: torch.Tensor
    valid: torch.Tensor
    kept: torch.Tensor
    hit: torch.Tensor
    n_valid: torch.Tensor
    n_kept: torch.Tensor
    accuracy: torch.Tensor
    mean_p: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return tuple(f.name for f in fields(self))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.keys()}


def _check_inputs(hidden, weight, target, bias, ignore_index, shift, backend_name):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
    if shift and target.dim() < 1:
        raise ValueError("shift=True needs target with a sequence dimension, got a 0-dim target")


def _prepare(hidden, weight, target, bias, ignore_index, shift, softcap, logit_scale, backend):
    """Validate, flatten to 2-D and resolve the backend: ``(h2, t1, valid, opts, backend, shape)``."""
    _check_inputs(hidden, weight, target, bias, ignore_index, shift, backend if isinstance(backend, str) else None)
    opts = LogitOptions(logit_scale=logit_scale, softcap=softcap)
    impl = resolve_backend(backend, hidden.device)
    shape = tuple(target.shape)
    target = target.long()
    if shift:
        # hidden[..., t, :] predicts target[..., t + 1]; the last position predicts nothing
        pad = torch.full_like(target[..., :1], ignore_index)
        target = torch.cat([target[..., 1:], pad], dim=-1)
    t1 = target.reshape(-1).contiguous()  # the kernels index targets with unit stride
    h2 = hidden.reshape(-1, hidden.shape[-1])
    valid = t1 != ignore_index
    V = weight.shape[0]
    if hidden.device.type == "cpu" and t1.numel():
        bad = valid & ((t1 < 0) | (t1 >= V))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target holds {int(t1[i])} at flat position {i}, outside [0, {V}) "
                             f"and not ignore_index={ignore_index}")
    return h2, t1, valid, opts, impl, shape


def _logprob(h2, weight, bias, t1, valid, opts, impl):
    if impl == REFERENCE:
        return reference.target_logprob(h2, weight, bias, t1, valid, opts)
    return TargetLogprobFunction.apply(h2, weight, bias, t1, valid, opts, impl)


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
    h2, t1, valid, opts, impl, shape = _prepare(hidden, weight, target, bias, ignore_index, shift,
                                                softcap, logit_scale, backend)
    logp, _ = _logprob(h2, weight, bias, t1, valid, opts, impl)
    return logp.reshape(shape)


def _denominator(num_items_in_batch, n_valid, n_kept, normalize, device):
    if num_items_in_batch is None:
        return n_valid if normalize == "valid" else n_kept
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.is_complex():
            raise ValueError(f"num_items_in_batch must be a number or a 1-element tensor, "
                             f"got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(()).to(device)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch must be an int or a 0-dim tensor, got {type(num_items_in_batch).__name__}")
    if num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return torch.tensor(num_items_in_batch, device=device)


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
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch is the denominator of reduction='mean'; "
                         f"it cannot be combined with reduction={reduction!r}")
    if num_items_in_batch is not None and normalize == "kept":
        raise ValueError("num_items_in_batch (a count of valid tokens across micro-batches) cannot be "
                         "combined with normalize='kept'; use normalize='valid' or drop num_items_in_batch")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    obj = get_objective(objective)
    h2, t1, valid, opts, impl, shape = _prepare(hidden, weight, target, bias, ignore_index, shift,
                                                softcap, logit_scale, backend)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction != "none" and wants_grad and hasattr(impl, "forward_with_grad"):
        # a scalar loss: the backend computes the gradients while the logits are at hand
        total, logp, kept, hit = ObjectiveSumFunction.apply(h2, weight, bias, t1, valid, opts, impl,
                                                            objective_coefficients(obj))
    else:
        logp, hit = _logprob(h2, weight, bias, t1, valid, opts, impl)
        per_tok, kept = obj.per_token(logp, valid)
        total = per_tok.sum()

    if reduction == "none":
        loss = per_tok.reshape(shape)
    elif reduction == "sum":
        loss = total
    else:
        denom = _denominator(num_items_in_batch, valid.sum(), kept.sum(), normalize, total.device)
        denom = denom.to(total.dtype)
        loss = torch.where(denom != 0, total / torch.where(denom != 0, denom, torch.ones_like(denom)),
                           total * 0.0)
    if not return_stats:
        return loss
    n_valid = valid.sum()
    n_kept = kept.sum()
    safe_n = n_valid.clamp(min=1).to(torch.float32)
    lp = logp.detach()
    stats = LossStats(
        logp=lp.reshape(shape),
        valid=valid.reshape(shape),
        kept=kept.reshape(shape),
        hit=hit.reshape(shape),
        n_valid=n_valid,
        n_kept=n_kept,
        accuracy=hit.sum().to(torch.float32) / safe_n,
        mean_p=torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum().to(torch.float32) / safe_n,
    )
    return loss, stats
