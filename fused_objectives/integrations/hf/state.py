"""Patch state kept on a patched instance or class, and the per-thread depth of running patched forwards."""
from __future__ import annotations

import functools

import threading
from typing import Optional

from .options import PatchOptions


_STATE = "_fused_objectives_patch"


class _Missing:
    """'Nothing was there' marker that stays itself through copy/deepcopy/pickle (patched models get copied)."""

    def __repr__(self):
        return "<missing>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()


class _PatchState:
    def __init__(self, options: PatchOptions, kind: str, saved_forward, original_func, bind: bool = False):
        self.options = options
        self.kind = kind                    # "instance" | "class"
        self.saved_forward = saved_forward  # what the instance / class __dict__ held under "forward"
        self.original_func = original_func  # the forward to run: a class function, or the instance's own callable
        self.bind = bind                    # instance patches: bind original_func to the model at call time
        self.hooks = []
        self.trl_pending = False            # TRL's fused_lm_head protocol requested for the next call
        self.saved_call = _MISSING          # class patches: the class __dict__'s own __call__, if any
        self.labels_idx = _MISSING          # position of `labels` in the original forward's signature

    def original_for(self, model):
        """The original forward of an instance patch, bound to ``model`` when it is a class function (found
        at call time, so a deep copy or an unpickled model runs its own).  A partial rather than a bound
        method: torch.compile would resolve ``model``'s bound ``forward`` to the patched one again."""
        return functools.partial(self.original_func, model) if self.bind else self.original_func

    def __getstate__(self):
        # copies and pickles: hook handles belong to the original's modules (the copies' hooks are found by
        # their marker), and a pending TRL request belongs to the original's next call
        state = dict(self.__dict__)
        state.update(hooks=[], trl_pending=False)
        return state


def _class_state(cls) -> Optional[_PatchState]:
    for klass in cls.__mro__:
        state = klass.__dict__.get(_STATE)
        if state is not None:
            return state
    return None


def _state_of(model) -> Optional[_PatchState]:
    return model.__dict__.get(_STATE) or _class_state(type(model))


_ACTIVE = threading.local()  # depth of patched forwards running on this thread (decoder guard)


def _active_depth() -> int:
    return getattr(_ACTIVE, "depth", 0)
