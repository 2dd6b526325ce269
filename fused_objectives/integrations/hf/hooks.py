"""Module hooks of a patched instance: TRL's ``fused_lm_head`` flag, the decoder guard, a patched class's ``__call__``."""
from __future__ import annotations


import torch

from .refusals import UnsupportedModelError
from .state import _MISSING, _active_depth, _state_of


def _inner_model(module):
    get_base = getattr(module, "get_base_model", None)
    return module if hasattr(module, "get_output_embeddings") or not callable(get_base) else get_base()


def _trl_hook(module, args, kwargs):
    """TRL's SFTTrainer calls ``model(..., fused_lm_head=True)`` and reduces the per-token ``log_probs`` itself:
    take the flag off so the call reaches the patched forward, which answers with the objective."""
    state = _state_of(_inner_model(module)) if "fused_lm_head" in kwargs else None
    if state is None:
        return None
    kwargs = dict(kwargs)
    if kwargs.pop("fused_lm_head"):
        state.trl_pending = True
    return args, kwargs


def _decoder_guard(module, args):
    """A patched model's decoder running in training outside any patched forward means some code computes
    the training loss around the patch (its objective would silently not apply)."""
    if _active_depth() == 0 and module.training and torch.is_grad_enabled():
        cfg = getattr(module, "config", None)
        raise UnsupportedModelError(
            f"the decoder of a model patched by fused_objectives (model type "
            f"{getattr(cfg, 'model_type', type(module).__name__)!r}) ran in training outside the patched forward, "
            "so the training loss would not be the patched objective (for example a trainer computing its own loss "
            "from the hidden states); patch the outermost model (after get_peft_model), or unpatch it")


_trl_hook.__fused_objectives_hook__ = True
_decoder_guard.__fused_objectives_hook__ = True


def _hooked_modules(model, outer):
    try:
        decoder = model.get_decoder()
    except Exception:  # some families have no separable decoder; the guard is best effort
        decoder = None
    mods = {id(model): model, id(outer): outer}
    return list(mods.values()), (decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None)


def _install_hooks(model, outer, state):
    callers, decoder = _hooked_modules(model, outer)
    for m in callers:
        state.hooks.append(m.register_forward_pre_hook(_trl_hook, with_kwargs=True, prepend=True))
    if decoder is not None:
        state.hooks.append(decoder.register_forward_pre_hook(_decoder_guard))


def _remove_hooks(model, outer, state):
    for h in state.hooks:
        h.remove()
    # a deep copy of a patched model carries copies of the hooks that the original's handles do not reach
    callers, decoder = _hooked_modules(model, outer)
    for m in callers + ([decoder] if decoder is not None else []):
        for hooks in (m._forward_pre_hooks,):
            for key in [k for k, fn in hooks.items() if getattr(fn, "__fused_objectives_hook__", False)]:
                del hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)


def _make_class_call(cls, saved_call):
    """``__call__`` of a patched class: TRL's SFTTrainer replaces an instance's ``forward`` with its own fused
    head and calls ``model(..., fused_lm_head=True)``; take that flag off before any forward runs, so the call
    reaches the patched forward, which answers TRL's protocol with the objective (see ``_add_trl_fields``)."""

    def __call__(self, *args, **kwargs):
        if "fused_lm_head" in kwargs:
            kwargs = dict(kwargs)
            state = _state_of(self)
            if kwargs.pop("fused_lm_head") and state is not None:
                state.trl_pending = True
        if saved_call is not _MISSING:
            return saved_call(self, *args, **kwargs)
        return super(cls, self).__call__(*args, **kwargs)

    return __call__
