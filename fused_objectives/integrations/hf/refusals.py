"""Refusals: ``UnsupportedModelError`` and the message that names the model type and the reason."""
from __future__ import annotations


class UnsupportedModelError(RuntimeError):
    """The model's forward does something the generic fused path cannot reproduce exactly."""


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def _refuse(model, reason: str):
    raise UnsupportedModelError(
        f"fused_objectives cannot patch model type {_model_type(model)!r} ({type(model).__name__}): {reason}. "
        "The fused loss would not equal this model's own loss, so it is refused rather than computed "
        "differently; call fo.unpatch_model(model) to train it unpatched.")
