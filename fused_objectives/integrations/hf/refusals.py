"""Refusals: ``UnsupportedModelError``, the message that names the model type and the reason, and the
families known to be refused, so that ``patch_model`` refuses them at once rather than at the first
training step.

The generic patch refuses at run time whatever it cannot reproduce exactly (see ``training_call``);
``KNOWN_REFUSALS`` lists the families of the installed transformers where that happens for every
configuration, with the reason in a user's terms.  ``hf_verify`` (and ``tests/test_hf_families.py``)
checks the list against the run-time refusal: an entry whose family patches exactly fails the check.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple


class UnsupportedModelError(RuntimeError):
    """The model's forward does something the generic fused path cannot reproduce exactly."""


_OWN_CE = ("its forward computes its own cross-entropy on the full logits ({where}, labels not shifted) "
           "instead of calling model.loss_function, so there is no loss the fused objective could replace")

# model type -> (reason, condition on the config or None for every config)
KNOWN_REFUSALS: Dict[str, Tuple[str, Optional[Callable[[object], bool]]]] = {
    **{mt: (_OWN_CE.format(where="nn.CrossEntropyLoss in the decoder of an encoder-decoder family"), None)
       for mt in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
                  "plbart", "trocr", "whisper")},
    "cpmant": (_OWN_CE.format(where="nn.CrossEntropyLoss"), None),
    "xlnet": (_OWN_CE.format(where="nn.CrossEntropyLoss, permutation language modelling"), None),
    "xlm": ("its LM head (XLMPredLayer) is not a plain linear layer used through model.loss_function: the forward "
            "computes its cross-entropy itself on the head's full logits", None),
    "prophetnet": ("it predicts several future tokens from each position (n-gram prediction streams) and computes "
                   "its own smoothed loss over them; the fused loss has one target per position", None),
    "inkling_text": ("its loss covers only the first unpadded_vocab_size logits while its LM head has more rows "
                     "(padded vocabulary); the fused loss needs the loss over every row of the head",
                     lambda cfg: (getattr(cfg, "unpadded_vocab_size", None) is not None
                                  and cfg.unpadded_vocab_size < cfg.vocab_size)),
}


def known_refusal(model_type: Optional[str], config=None) -> Optional[str]:
    """The reason ``model_type`` is refused before any training step (with ``config``: for that
    configuration; without: only refusals that hold for every configuration), or None."""
    entry = KNOWN_REFUSALS.get(model_type or "")
    if entry is None:
        return None
    reason, condition = entry
    if condition is None:
        return reason
    if config is None:
        return None
    try:
        return reason if condition(config) else None
    except (AttributeError, TypeError):
        return None


def _model_type(model) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def _refuse(model, reason: str):
    """At a training call of a patched model."""
    raise UnsupportedModelError(
        f"fused_objectives cannot patch model type {_model_type(model)!r} ({type(model).__name__}): {reason}. "
        "The fused loss would not equal this model's own loss, so it is refused rather than computed "
        "differently; call fo.unpatch_model(model) to train it unpatched.")


def _refuse_at_patch(model_type: str, what: str, reason: str):
    """In ``patch_model``, before anything is patched."""
    raise UnsupportedModelError(
        f"fused_objectives cannot patch model type {model_type!r} ({what}): {reason}. The fused loss would not "
        "equal this model's own loss, so patch_model refuses it (nothing was patched); train it unpatched.")
