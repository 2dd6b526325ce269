"""Non-tensor options that travel through every layer as one frozen dataclass."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch


@dataclass(frozen=True)
class LogitOptions:
    """How logits are formed from ``hidden @ weight.T (+ bias)``.

    ``z = raw * logit_scale`` (when set), then ``z = softcap * tanh(z / softcap)`` (when set).
    """

    logit_scale: Optional[float] = None
    softcap: Optional[float] = None

    def __post_init__(self):
        for name in ("logit_scale", "softcap"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
            if not math.isfinite(value) or value == 0 or (name == "softcap" and value < 0):
                want = "a finite number > 0" if name == "softcap" else "a finite non-zero number"
                raise ValueError(f"{name} must be {want}, got {value!r}")
            object.__setattr__(self, name, float(value))


#: ``coef_fn(logp, lse, dotz, target, valid) -> (sum of per-token losses, kept, coef)`` on one token
#: chunk's ``[rows]`` vectors (``dotz`` None without a dot vector): how the autograd layer hands the
#: loss to ``forward_with_grad`` backends; ``coef`` is ``[rows]`` (``dSum/dlogp``), ``[2, rows]``
#: (also ``dSum/dlse``) or ``[3, rows]`` (also ``dSum/ddotz``), see ``backends/__init__.py``.
CoefFn = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_coefficient(name: str, value, upper: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
        want = f"in [0, {upper:g}]" if upper is not None else "a finite number >= 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class LossTerms:
    """Loss terms beyond the objective of ``log p`` (see ``linear_objective_loss``).

    ``z_loss``: adds ``z_loss * lse_i**2`` on valid tokens; ``label_smoothing``: mixes in the
    cross-entropy against the uniform (or ``class_weight``-weighted) distribution on kept tokens;
    ``class_weight``: ``[V]`` per-class weights of the objective (and of the smoothing sum).
    The tensor is checked against the logits by :meth:`check_weight` at the call.
    """

    z_loss: float = 0.0
    label_smoothing: float = 0.0
    class_weight: Optional[torch.Tensor] = None

    def __post_init__(self):
        object.__setattr__(self, "z_loss", _check_coefficient("z_loss", self.z_loss))
        object.__setattr__(self, "label_smoothing",
                           _check_coefficient("label_smoothing", self.label_smoothing, upper=1.0))
        w = self.class_weight
        if w is None:
            return
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"class_weight must be a torch.Tensor of shape [V] or None, got {type(w).__name__}")
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if dtensor is not None and isinstance(w, dtensor):
            raise TypeError("class_weight must be a plain [V] tensor (the same on every rank), got a DTensor; "
                            "pass class_weight.full_tensor()")
        if w.dim() != 1:
            raise ValueError(f"class_weight must have shape [V] (one weight per vocabulary entry), "
                             f"got shape {tuple(w.shape)}")
        if not w.dtype.is_floating_point:
            raise TypeError(f"class_weight must be a floating tensor, got {w.dtype}")
        if w.device.type == "meta":
            raise ValueError("class_weight is a meta tensor (no data); pass real weights")
        if w.requires_grad:
            raise ValueError("class_weight must not require grad (the loss does not differentiate "
                             "with respect to the class weights); pass class_weight.detach()")
        if w.device.type == "cpu":
            # free to read on the host; a CUDA tensor is not read (no sync): its values are the user's.
            # An operator, so a compiled graph keeps the check; its float copy is what the loss uses
            object.__setattr__(self, "class_weight", checked_class_weight(w))

    @property
    def active(self) -> bool:
        return self.z_loss != 0 or self.label_smoothing != 0 or self.class_weight is not None

    def check_weight(self, vocab: int, device: torch.device) -> None:
        """Raise unless ``class_weight`` (when given) matches the logits: ``[vocab]`` on ``device``."""
        w = self.class_weight
        if w is None:
            return
        if w.shape[0] != vocab:
            raise ValueError(f"class_weight must have shape [V] = ({vocab},), got {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"class_weight is on {w.device} but hidden is on {device}")


@torch.library.custom_op("fused_objectives::checked_class_weight", mutates_args=())
def checked_class_weight(w: torch.Tensor) -> torch.Tensor:
    """A float32 copy of the CPU ``class_weight``, raising ``ValueError`` for a negative or
    non-finite entry: an operator, so ``torch.compile`` (fullgraph) keeps the check inside the
    graph instead of a data-dependent Python branch."""
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"class_weight must be finite and >= 0, got {float(w[i])} at index {i}")
    # float32, or float64 kept for float64 weights (the reference backend's float64 truth)
    return w.detach().to(torch.promote_types(w.dtype, torch.float32), copy=True)


@checked_class_weight.register_fake
def _checked_class_weight_fake(w):
    return torch.empty_like(w, dtype=torch.promote_types(w.dtype, torch.float32))
