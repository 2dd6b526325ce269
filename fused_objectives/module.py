"""``nn.Module`` wrapper around :func:`fused_objectives.linear_objective_loss`."""
from __future__ import annotations

from typing import Optional

import torch

from .functional import linear_objective_loss, validate_options


class LinearObjectiveLoss(torch.nn.Module):
    """``forward(hidden, weight, target, bias=None)`` computes ``linear_objective_loss`` with the
    options given at construction (the same keyword names).  Every option, the objective included,
    is validated at construction (whether the backend runs on the inputs' device is known only at
    the call).  Pickles and ``torch.save``s whenever its objective's functions can be pickled: the
    built-ins, and user objectives made of module-level functions (not lambdas)."""

    def __init__(self, objective="nll", *, ignore_index: int = -100, reduction: str = "mean",
                 normalize: str = "valid", shift: bool = False, softcap: Optional[float] = None,
                 logit_scale: Optional[float] = None, backend: str = "auto", return_stats: bool = False):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, normalize=normalize, shift=shift,
                            softcap=softcap, logit_scale=logit_scale, backend=backend, return_stats=return_stats)
        self.objective = validate_options(objective=objective, **self.options)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, num_items_in_batch=None):
        return linear_objective_loss(hidden, weight, target, bias, objective=self.objective,
                                     num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"objective={self.objective.name!r}, {opts}"
