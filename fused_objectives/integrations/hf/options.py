"""Patch options: what ``patch_model`` accepts, validated at patch time; the transformers version gate."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...functional import validate_options
from ...objectives import Objective, get_objective


MIN_TRANSFORMERS_VERSION = "4.56.0"


_OPTION_DEFAULTS = dict(ignore_index=-100, normalize="valid", backend="auto", return_logits=False,
                        eval_objective=None, liger=False, z_loss=0.0, label_smoothing=0.0, class_weight=None,
                        eval_predictions="logits")
#: what an evaluation-mode call with labels returns besides the loss (see ``PatchOptions``)
EVAL_PREDICTIONS = ("logits", "ids", "none")
_NOT_OPTIONS = {
    "softcap": "it is read from the model config (final_logit_softcapping)",
    "logit_scale": "it is read from the model config (logit_scale, logits_scaling, lm_head_multiplier)",
    "reduction": "a Hugging Face loss is a mean over tokens (or sum / num_items_in_batch)",
    "num_items_in_batch": "it comes with each forward call (Trainer passes it for gradient accumulation)",
    "shift": "the patched forward applies Hugging Face's label shift (or uses shift_labels when given)",
    "return_stats": "per-token statistics are not part of a Hugging Face model output",
}


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("fused_objectives.patch_model needs transformers >= "
                          f"{MIN_TRANSFORMERS_VERSION}: pip install 'fused_objectives[hf]'") from e
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(f"fused_objectives.patch_model needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
                          f"found {transformers.__version__}: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'")
    return transformers


@dataclass(frozen=True)
class PatchOptions:
    """Loss options of a patch (the keyword names of ``linear_objective_loss`` where they exist).

    ``return_logits``: also build and return the logits on training calls (costs the ``[N, V]``
    memory the patch saves).  ``eval_objective``: objective used while ``model.training`` is False
    (None: the training objective).  ``liger``: apply Liger-Kernel's RMSNorm/RoPE/SwiGLU (CUDA).
    ``z_loss``, ``label_smoothing``, ``class_weight``: the loss terms of ``linear_objective_loss``
    (``class_weight`` is moved to the head's device at each call).
    ``eval_predictions``: what a call with labels returns besides the loss while ``model.training``
    is False, for ``Trainer.evaluate``'s ``compute_metrics``: ``"logits"`` (the ``[..., V]`` logits,
    computed by the head as unpatched, without a graph even when gradients are enabled: the memory of
    one batch's logits, as an unpatched evaluation holds them; skipped when a ``Trainer`` evaluates with
    ``prediction_loss_only``), ``"ids"`` (``predicted``: the argmax token id of every position whose
    shifted label is not ignored, ``ignore_index`` at the others, ``[...]`` int64, from the fused pass,
    no ``[N, V]`` tensor; ``logits`` stays None) or ``"none"`` (the loss only).
    """

    objective: Objective
    ignore_index: int = -100
    normalize: str = "valid"
    backend: str = "auto"
    return_logits: bool = False
    eval_objective: Optional[Objective] = None
    liger: bool = False
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    class_weight: Optional[torch.Tensor] = field(default=None, compare=False)
    eval_predictions: str = "logits"

    @property
    def plain_nll(self) -> bool:
        """The per-token loss is exactly ``-log p(target)`` (what TRL's fused-head protocol calls log_probs)."""
        return (self.objective.name == "nll" and self.z_loss == 0 and self.label_smoothing == 0
                and self.class_weight is None)

    def loss_terms(self, device) -> dict:
        """The loss-term keywords of ``linear_objective_loss`` (only the ones set), weights on ``device``."""
        terms = {}
        if self.z_loss:
            terms["z_loss"] = self.z_loss
        if self.label_smoothing:
            terms["label_smoothing"] = self.label_smoothing
        if self.class_weight is not None:
            terms["class_weight"] = self.class_weight.to(device)
        return terms


def _make_options(objective, loss_options: dict) -> PatchOptions:
    for name in loss_options:
        if name in _NOT_OPTIONS:
            raise ValueError(f"patch_model() does not take {name}=: {_NOT_OPTIONS[name]}")
        if name not in _OPTION_DEFAULTS:
            raise TypeError(f"patch_model() got an unexpected loss option {name!r}; expected one of "
                            f"{sorted(_OPTION_DEFAULTS)}")
    opts = {**_OPTION_DEFAULTS, **loss_options}
    ii = opts["ignore_index"]
    if isinstance(ii, bool) or not isinstance(ii, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ii).__name__}")
    if opts["normalize"] not in ("valid", "kept"):
        raise ValueError(f"normalize must be 'valid' or 'kept', got {opts['normalize']!r}")
    if not isinstance(opts["backend"], str):
        raise TypeError(f"backend must be a string, got {type(opts['backend']).__name__}")
    for name in ("return_logits", "liger"):
        if not isinstance(opts[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(opts[name]).__name__}")
    if opts["eval_predictions"] not in EVAL_PREDICTIONS:
        raise ValueError(f"eval_predictions must be one of {EVAL_PREDICTIONS}, got {opts['eval_predictions']!r}")
    cw = opts["class_weight"]
    # the loss's own validation, now rather than at the first training step (backend="cpux", a bad
    # objective spec, an ignore_index no int64 target can hold, a negative z_loss, a class_weight
    # that is not [V], ...)
    terms = {k: opts[k] for k in ("z_loss", "label_smoothing", "class_weight") if k in loss_options}
    validate_options(objective=objective, ignore_index=ii, normalize=opts["normalize"], backend=opts["backend"],
                     **terms)
    ev = opts["eval_objective"]
    if ev is not None:
        validate_options(objective=ev)
    return PatchOptions(objective=get_objective(objective), ignore_index=int(ii), normalize=opts["normalize"],
                        backend=opts["backend"], return_logits=opts["return_logits"],
                        eval_objective=None if ev is None else get_objective(ev), liger=opts["liger"],
                        z_loss=float(opts["z_loss"]), label_smoothing=float(opts["label_smoothing"]),
                        class_weight=cw, eval_predictions=opts["eval_predictions"])
