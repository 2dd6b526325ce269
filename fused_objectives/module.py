"""``nn.Module`` wrapper around :func:`fused_objectives.linear_objective_loss`."""
from __future__ import annotations

from typing import Optional

import torch

from .functional import linear_objective_loss, validate_options


class LinearObjectiveLoss(torch.nn.Module):
    """``forward(hidden, weight, target, bias=None)`` computes ``linear_objective_loss`` with the
    options given at construction (the same keyword names).  Every option, the objective included,
    is validated at construction (whether the backend runs on the inputs' device is known only at
    the call).  ``class_weight`` is a buffer: it moves with ``.to(device)`` and is saved in the
    ``state_dict``.  Pickles and ``torch.save``s whenever its objective's functions can be pickled: the
    built-ins, and user objectives made of module-level functions (not lambdas)."""

    def __init__(self, objective="nll", *, ignore_index: int = -100, reduction: str = "mean",
                 normalize: str = "valid", shift: bool = False, softcap: Optional[float] = None,
                 logit_scale: Optional[float] = None, backend: str = "auto", return_stats: bool = False,
                 z_loss: float = 0.0, label_smoothing: float = 0.0, class_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, normalize=normalize, shift=shift,
                            softcap=softcap, logit_scale=logit_scale, backend=backend, return_stats=return_stats,
                            z_loss=z_loss, label_smoothing=label_smoothing)
        self.objective = validate_options(objective=objective, class_weight=class_weight, **self.options)
        self.register_buffer("class_weight", None if class_weight is None else class_weight.detach().clone())

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, num_items_in_batch=None):
        return linear_objective_loss(hidden, weight, target, bias, objective=self.objective,
                                     num_items_in_batch=num_items_in_batch, class_weight=self.class_weight,
                                     **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if self.class_weight is not None:
            opts += f", class_weight=<{tuple(self.class_weight.shape)} {self.class_weight.dtype}>"
        return f"objective={self.objective.name!r}, {opts}"
