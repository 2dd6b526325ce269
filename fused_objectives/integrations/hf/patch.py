"""The public API: ``patch_model``, ``unpatch_model``, ``set_objective``, ``patched``; installation of the
patched forward on an instance or a class."""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import replace
from typing import Any, Optional

import torch

from ...objectives import get_objective
from .head import _check_head, _logit_transform
from .hooks import _install_hooks, _make_class_call, _remove_hooks
from .options import _make_options, _require_transformers
from .refusals import _refuse, _refuse_at_patch, known_refusal
from .state import _MISSING, _PatchState, _STATE, _class_state, _state_of
from .training_call import _run


def _make_class_forward(original_func, state):
    @functools.wraps(original_func)
    def forward(self, *args, **kwargs):
        return _run(self, state, original_func.__get__(self, type(self)), args, kwargs)

    return forward


class _InstanceForward:
    """The patched ``forward`` of one instance (kept in its ``__dict__``).

    It finds the patch state on its model at call time, so a deep copy runs its own; it pickles as
    "the patched forward of this model" (``torch.save`` / ``pickle`` of a patched model reload it patched,
    as ``copy.deepcopy`` does), where a bound method would pickle as ``getattr(model, "forward")`` and
    reload as the unpatched class forward.  ``inspect.signature`` gives the original forward's."""

    __name__ = "forward"

    def __init__(self, model):
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        model = self.__self__
        own = model.__dict__[_STATE]
        return _run(model, own, own.original_for(model), args, kwargs)

    def __reduce__(self):
        return (_InstanceForward, (self.__self__,))

    @property
    def __signature__(self):
        own = self.__self__.__dict__.get(_STATE)
        return inspect.signature(own.original_for(self.__self__)) if own is not None else None

    def __repr__(self):
        return f"<fused_objectives patched forward of {type(self.__self__).__name__}>"


def _resolve(target):
    tf = _require_transformers()
    if isinstance(target, str):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if target not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            import difflib

            close = difflib.get_close_matches(target, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
            raise ValueError(f"unknown causal-LM model type {target!r}" + (f"; did you mean {close}?" if close else ""))
        return "class", getattr(tf, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[target]), None
    if isinstance(target, type):
        if not issubclass(target, tf.PreTrainedModel):
            raise TypeError(f"model_or_model_type must be a transformers PreTrainedModel, a subclass or a model "
                            f"type string; got class {target.__qualname__}")
        return "class", target, None
    if isinstance(target, torch.nn.Module):
        inner = target
        get_base = getattr(target, "get_base_model", None)
        if not isinstance(target, tf.PreTrainedModel) and callable(get_base):
            inner = get_base()  # PEFT
        if not isinstance(inner, tf.PreTrainedModel):
            raise TypeError(f"model_or_model_type must be a transformers PreTrainedModel (or a PEFT model around "
                            f"one); got {type(target).__qualname__}")
        return "instance", inner, target
    raise TypeError(f"model_or_model_type must be a model, a model class or a model type string; "
                    f"got {type(target).__name__}")


def _apply_liger(kind, model_or_cls):
    model_type = model_or_cls.config.model_type if kind == "instance" else getattr(
        getattr(model_or_cls, "config_class", None), "model_type", None)
    if kind == "instance":
        device = next(model_or_cls.parameters()).device
        if device.type != "cuda":
            raise RuntimeError(f"liger=True needs the model on a CUDA device: Liger-Kernel's Triton kernels "
                               f"(RMSNorm, RoPE, SwiGLU) do not run on {device.type}; patch without liger=True")
    try:
        import liger_kernel.transformers as lk
    except ImportError as e:
        raise ImportError("liger=True needs liger-kernel: pip install liger-kernel") from e
    fn = getattr(lk, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        raise ValueError(f"liger=True: Liger-Kernel has no apply_liger_kernel_to_{model_type} for model type "
                         f"{model_type!r}")
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in dict(rope=True, rms_norm=True, swiglu=True, geglu=True, layer_norm=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False).items() if k in params}
    if kind == "instance" and "model" in params:
        kwargs["model"] = model_or_cls
    fn(**kwargs)


def patch_model(model_or_model_type, objective="neg_p", **loss_options):
    """Make a causal LM's training forward compute ``objective`` fused with its LM head.

    ``model_or_model_type``: a model instance (only that instance is patched; a PEFT model patches
    its base model), a model class or a model type string such as ``"llama"`` (every instance of
    that class, including future ones).  ``loss_options``: ``ignore_index`` (-100), ``normalize``
    (``"valid"``: Hugging Face's mean over valid tokens, or sum / ``num_items_in_batch``; ``"kept"``:
    the paper's mean over tokens passing the gate), ``backend``, ``return_logits`` (False),
    ``eval_objective`` (None), ``liger`` (False), the loss terms ``z_loss`` (0.0),
    ``label_smoothing`` (0.0) and ``class_weight`` (None) of ``linear_objective_loss``, and
    ``eval_predictions`` (``"logits"``; see ``PatchOptions``).  Patching again replaces the options.

    A training call with ``labels`` returns the fused loss (plus the model's own MoE auxiliary loss)
    and ``logits=None``; an evaluation call (``model.training`` False) with labels also returns what
    ``eval_predictions`` says; a call without labels is the original forward.  Returns the argument.

    Use ``label_smoothing=`` here, not ``TrainingArguments(label_smoothing_factor=...)``: Trainer's
    label smoother calls the model without labels and smooths a cross-entropy of the full logits,
    outside the patch; a patched model refuses that call (``ValueError`` naming the fix).
    """
    options = _make_options(objective, loss_options)
    kind, obj, outer = _resolve(model_or_model_type)
    _refuse_known(kind, obj)
    return _install(kind, obj, outer, options, model_or_model_type)


def _refuse_known(kind, obj) -> None:
    """Refuse now a family that would be refused at its first training call (``KNOWN_REFUSALS``)."""
    if kind == "instance":
        cfg = getattr(obj, "config", None)
        text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
        reason = known_refusal(getattr(cfg, "model_type", None), text)
        if reason is not None:
            _refuse_at_patch(cfg.model_type, type(obj).__name__, reason)
    else:
        model_type = getattr(getattr(obj, "config_class", None), "model_type", None)
        reason = known_refusal(model_type)
        if reason is not None:
            _refuse_at_patch(model_type, obj.__qualname__, reason)


def _install(kind, obj, outer, options, model_or_model_type):
    """Patch after validation (``hf_verify`` calls this directly to check ``KNOWN_REFUSALS`` against the
    refusal at run time)."""
    if kind == "instance":
        _check_head(obj, obj.get_output_embeddings(), obj.training)
        scale, softcap = _logit_transform(obj)
        if softcap is not None and softcap <= 0:
            _refuse(obj, f"its config declares final_logit_softcapping={softcap}")
        _check_class_weight(obj, options)
    if options.liger:
        _apply_liger(kind, obj)
    state = _own_state(kind, obj)
    if state is not None:
        state.options = options
        return model_or_model_type
    if kind == "class":
        saved = obj.__dict__.get("forward", _MISSING)
        state = _PatchState(options, "class", saved, None)
        inherited = _class_state(obj)
        # a subclass of a patched class patches the original forward, not the patched one
        state.original_func = inherited.original_func if inherited is not None and saved is _MISSING else obj.forward
        type.__setattr__(obj, "forward", _make_class_forward(state.original_func, state))
        state.saved_call = obj.__dict__.get("__call__", _MISSING)
        type.__setattr__(obj, "__call__", _make_class_call(obj, state.saved_call))
        type.__setattr__(obj, _STATE, state)
    else:
        saved = obj.__dict__.get("forward", _MISSING)
        cls_state = _class_state(type(obj))
        if saved is not _MISSING:
            state = _PatchState(options, "instance", saved, saved)
        else:
            # a class function, bound to the model at call time (see _PatchState.original_for)
            original = cls_state.original_func if cls_state is not None else type(obj).forward
            state = _PatchState(options, "instance", saved, original, bind=True)
        object.__setattr__(obj, "forward", _InstanceForward(obj))
        object.__setattr__(obj, _STATE, state)
        _install_hooks(obj, outer, state)
    return model_or_model_type


def _check_class_weight(model, options) -> None:
    """A ``class_weight`` must have one entry per row of the instance's head (a class patch: at the call)."""
    cw = options.class_weight
    if cw is None:
        return
    weight = getattr(model.get_output_embeddings(), "weight", None)
    # a ZeRO-3-partitioned weight is an empty tensor whose real shape is its ds_shape
    vocab = getattr(weight, "ds_shape", getattr(weight, "shape", (None,)))[0]
    if vocab is not None and tuple(cw.shape) != (vocab,):
        raise ValueError(f"class_weight must have shape [V] = ({vocab},) for this model's LM head "
                         f"({type(model).__name__}), got {tuple(cw.shape)}")


def _own_state(kind, obj) -> Optional[_PatchState]:
    return obj.__dict__.get(_STATE)


def unpatch_model(model_or_model_type):
    """Undo ``patch_model``: restore the instance's or class's original ``forward`` exactly.

    Returns the argument.  Raises ``ValueError`` when it is not patched.  (Liger-Kernel's module
    replacements from ``liger=True`` have no undo in Liger and stay.)"""
    kind, obj, outer = _resolve(model_or_model_type)
    state = _own_state(kind, obj)
    if state is None:
        what = "class" if kind == "class" else "instance"
        raise ValueError(f"{what} {getattr(obj, '__qualname__', type(obj).__qualname__)} is not patched by "
                         "fused_objectives" + ("; its class is (unpatch the class)" if kind == "instance"
                                                and _class_state(type(obj)) is not None else ""))
    if kind == "class":
        if state.saved_forward is _MISSING:
            type.__delattr__(obj, "forward")
        else:
            type.__setattr__(obj, "forward", state.saved_forward)
        if state.saved_call is _MISSING:
            type.__delattr__(obj, "__call__")
        else:
            type.__setattr__(obj, "__call__", state.saved_call)
        type.__delattr__(obj, _STATE)
    else:
        _remove_hooks(obj, outer, state)
        if state.saved_forward is _MISSING:
            obj.__dict__.pop("forward", None)
        else:
            object.__setattr__(obj, "forward", state.saved_forward)
        obj.__dict__.pop(_STATE, None)
    return model_or_model_type


def set_objective(model, objective, *, eval_objective: Any = _MISSING):
    """Change the objective of a patched model (or class, or model type) between steps; returns the model."""
    kind, obj, _ = _resolve(model)
    state = _own_state(kind, obj) if kind == "class" else _state_of(obj)
    if state is None:
        raise ValueError(f"set_objective: {getattr(obj, '__qualname__', type(obj).__qualname__)} is not patched; "
                         "call fo.patch_model first")
    new = replace(state.options, objective=get_objective(objective))
    if eval_objective is not _MISSING:
        new = replace(new, eval_objective=None if eval_objective is None else get_objective(eval_objective))
    state.options = new
    return model


@contextlib.contextmanager
def patched(model, objective="neg_p", **loss_options):
    """``with fo.patched(model, objective="nll_top:0.2"): ...``: patched inside, as before after."""
    kind, obj, _ = _resolve(model)
    before = _own_state(kind, obj)
    previous = before.options if before is not None else None
    patch_model(model, objective, **loss_options)
    try:
        yield model
    finally:
        if previous is None:
            unpatch_model(model)
        else:
            _own_state(kind, obj).options = previous
