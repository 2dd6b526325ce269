"""``nn.Module`` wrapper around :func:`fused_objectives.linear_objective_loss`."""
from __future__ import annotations

from typing import Optional

import torch

from .functional import linear_objective_loss
from .objectives import get_objective


class LinearObjectiveLoss(torch.nn.Module):
    """``forward(hidden, weight, target, bias=None)`` computes ``linear_objective_loss`` with the
    options given at construction (the same keyword names).  The objective is resolved, and so
    validated, at construction."""

    def __init__(self, objective="nll", *, ignore_index: int = -100, reduction: str = "mean",
                 normalize: str = "valid", shift: bool = False, softcap: Optional[float] = None,
                 logit_scale: Optional[float] = None, backend: str = "auto", return_stats: bool = False):
        super().__init__()
        self.objective = get_objective(objective)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, normalize=normalize, shift=shift,
                            softcap=softcap, logit_scale=logit_scale, backend=backend, return_stats=return_stats)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        if normalize not in ("valid", "kept"):
            raise ValueError(f"normalize must be one of ('valid', 'kept'), got {normalize!r}")

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, num_items_in_batch=None):
        return linear_objective_loss(hidden, weight, target, bias, objective=self.objective,
                                     num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"objective={self.objective.name!r}, {opts}"
