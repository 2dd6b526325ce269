"""Trainers that compute the loss around a patched model: found on the call stack, refused or warned.

``transformers.Trainer`` (and TRL's trainers) decide in ``compute_loss`` whether the model's own loss is
used.  Several of their settings bypass the patch or misread it, and would train something other than the
patched objective without a word:

- ``TrainingArguments(label_smoothing_factor=eps)``: ``compute_loss`` pops the labels, calls the model
  without them and smooths a cross-entropy of the full logits (``self.label_smoother``): refused, the fix
  being ``patch_model(..., label_smoothing=eps)`` with ``label_smoothing_factor=0``;
- ``Trainer(compute_loss_func=f)``: the same call without labels, the loss being ``f``'s: one warning per
  trainer (the user wrote that loss on purpose, but the patched objective does not train);
- any other ``compute_loss`` (a user's Trainer subclass) that calls the model without labels in training:
  one warning per trainer;
- TRL's fused-head protocol, ``model(..., labels=..., fused_lm_head=True)``, whose per-token ``log_probs``
  the patch fills with the negated objective.  Only ``SFTTrainer(loss_type="nll")`` reduces them as a loss
  (it then trains the patched objective); ``SFTTrainer`` with another ``loss_type`` (``"dft"`` reweights
  them) and every other trainer that asks for them (TRL 1.x ``DPOTrainer``, ``KTOTrainer``,
  ``GRPOTrainer``, ``RLOOTrainer``: ratios and KL terms of true log-probabilities) are refused unless the
  patch is the plain NLL (no loss term), whose ``log_probs`` are the log-probabilities.

The trainer is the ``self`` of the nearest ``compute_loss`` (or ``prediction_step``) frame that is a
``transformers.Trainer`` (for the fused-head protocol: of the nearest frame of any Trainer method, as RL
trainers also ask for log-probabilities while generating); only its public attributes are read
(``label_smoother``, ``compute_loss_func``, ``args.loss_type``) and ``prediction_step``'s documented
``prediction_loss_only`` argument.  Nothing is looked up unless ``transformers.trainer`` was imported.  The
checks also run while torch.compile traces the forward: dynamo does not trace the frame walk
(``sys._getframe``) and runs it eagerly, a graph break on the calls that run the checks (the call
without labels, TRL's and an evaluation call; never a labelled training call).
"""
from __future__ import annotations

import sys
import warnings
import weakref
from typing import Optional, Tuple

import torch

_MAX_DEPTH = 48  # frames between a Trainer method and the patched forward (accelerate / DDP / PEFT wrappers)
_WARNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _trainer_frame(method: Optional[str]) -> Tuple[Optional[object], Optional[dict]]:
    """``(trainer, that frame's locals)`` of the nearest ``Trainer.<method>`` frame calling us (``method``
    None: of any method), or ``(None, None)``; runs eagerly under torch.compile too (see the module docstring)."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return None, None
    frame = sys._getframe(1)
    try:
        for _ in range(_MAX_DEPTH):
            if frame is None:
                break
            if method is None or frame.f_code.co_name == method:
                local = frame.f_locals
                trainer = local.get("self")
                if isinstance(trainer, trainer_cls):
                    return trainer, local
            frame = frame.f_back
        return None, None
    finally:
        del frame


def check_call_without_labels(model, options) -> None:
    """A patched model called without labels from a Trainer's ``compute_loss``: the Trainer computes the loss."""
    trainer, _ = _trainer_frame("compute_loss")
    if trainer is None:
        return
    args = getattr(trainer, "args", None)
    if getattr(trainer, "label_smoother", None) is not None and getattr(args, "loss_type", "nll") == "nll":
        eps = getattr(args, "label_smoothing_factor", None)
        raise ValueError(
            f"{type(trainer).__name__}(label_smoothing_factor={eps}) computes the loss itself: it calls the model "
            f"without labels and smooths a cross-entropy of the full [N, V] logits, so this model patched by "
            f"fused_objectives (objective {options.objective.name!r}) would train that instead of its objective. "
            f"Set label_smoothing_factor=0 in the training arguments and patch with "
            f"fo.patch_model(model, objective=..., label_smoothing={eps}) (the fused loss then smooths the "
            f"objective, exactly F.cross_entropy(label_smoothing=...) for objective='nll').")
    if getattr(trainer, "compute_loss_func", None) is not None:
        _warn_once(trainer, "compute_loss_func",
                   f"{type(trainer).__name__} has a compute_loss_func: it calls the model without labels and computes "
                   f"its loss from the full logits, so the patched objective {options.objective.name!r} "
                   f"(fused_objectives) is not what trains or evaluates. Drop compute_loss_func to train the patched "
                   f"objective (the patched model returns it as its loss), or unpatch the model.")
    elif model.training and torch.is_grad_enabled():
        # a Trainer subclass (a user's compute_loss, a reward trainer) training on the full logits
        _warn_once(trainer, "compute_loss",
                   f"{type(trainer).__name__}.compute_loss calls the model without labels in training and computes "
                   f"its loss from the full logits, so the objective {options.objective.name!r} this model is "
                   f"patched with (fused_objectives) does not apply. Pass labels to the model to train the patched "
                   f"objective, or unpatch the model for this trainer.")


def _warn_once(trainer, key: str, message: str) -> None:
    seen = _WARNED.setdefault(trainer, set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _is_sft_trainer(trainer) -> bool:
    module = sys.modules.get("trl.trainer.sft_trainer")
    cls = getattr(module, "SFTTrainer", None)
    return cls is not None and isinstance(trainer, cls)


def check_trl_loss_type(model, options, objective) -> None:
    """TRL's fused-head call (``fused_lm_head=True``): ``log_probs`` hold the negated per-token objective.

    Answered with the patched objective only for ``SFTTrainer(loss_type="nll")``, which reduces them as its
    loss (and outside any Trainer: a caller of the documented protocol).  Any other trainer (TRL's
    DPO / KTO / GRPO / RLOO, a Trainer subclass) or ``loss_type`` uses them as log-probabilities, which they
    are only for the plain NLL patch (no z_loss / label_smoothing / class_weight): otherwise refused."""
    trainer, _ = _trainer_frame(None)
    if trainer is None:
        return
    plain = (objective.name == "nll" and options.z_loss == 0 and options.label_smoothing == 0
             and options.class_weight is None)
    if plain:
        return
    name = type(trainer).__name__
    extra = [f"{k}={getattr(options, k)}" for k in ("z_loss", "label_smoothing") if getattr(options, k)]
    if options.class_weight is not None:
        extra.append("class_weight")
    what = f"objective {objective.name!r}" + (f" with {', '.join(extra)}" if extra else "")
    if _is_sft_trainer(trainer):
        loss_type = getattr(getattr(trainer, "args", None), "loss_type", "nll")
        if loss_type in (None, "nll"):
            return
        raise ValueError(
            f"TRL {name}(loss_type={loss_type!r}) transforms the per-token log-probabilities of the fused LM head "
            f"(DFT weighs them by their probability); this model is patched by fused_objectives with {what}, "
            f"whose per-token loss is not -log p, so it would train neither. Use loss_type='nll' (SFTTrainer then "
            f"trains the patched objective; DFT's gradient -p * dlog p equals objective='neg_p''s), or patch with "
            f"objective='nll' and no z_loss / label_smoothing / class_weight.")
    raise ValueError(
        f"{name} calls the model with fused_lm_head=True and uses its per-token log_probs as log-probabilities "
        f"(policy ratios, KL or preference terms); this model is patched by fused_objectives with {what}, so "
        f"those log_probs hold the negated objective, not log p, and {name} would train on the wrong quantity. "
        f"For this trainer, patch with fo.patch_model(model, objective='nll') and no z_loss / label_smoothing / "
        f"class_weight (its log_probs are then the exact log-probabilities), or fo.unpatch_model(model).")


def prediction_loss_only() -> bool:
    """True when a Trainer's ``prediction_step`` calling us was asked for the loss only (its predictions are
    discarded, so an evaluation call need not build the logits)."""
    trainer, local = _trainer_frame("prediction_step")
    return trainer is not None and local.get("prediction_loss_only") is True
