"""Non-tensor options that travel through every layer as one frozen dataclass."""
from __future__ import annotations

import math
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


#: ``coef_fn(logp, valid) -> (sum of per-token losses, kept, dSum/dlogp)`` on one token chunk's
#: ``[rows]`` vectors: how the autograd layer hands an objective to ``forward_with_grad`` backends.
CoefFn = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
