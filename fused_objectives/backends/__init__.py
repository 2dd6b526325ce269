"""Backends: ``reference`` (PyTorch autograd on materialised logits) and fused backends.

A fused backend implements the two primitives every objective needs (see objectives.md):

- ``forward(hidden [N, H], weight [V, H], bias [V] | None, target [N] int64, valid [N] bool, opts)``
  -> ``(logp [N] f32, state, argmax [N] int64)``: the target log-probability, a tensor of the
  backend's choosing that its backward needs (e.g. the row max and log-normaliser), and the argmax.
  Rows where ``valid`` is False may hold anything; a valid token whose target is outside ``[0, V)``
  must give a NaN log-probability (never an out-of-bounds read).
- ``backward(hidden, weight, bias, target, state, coef [N] f32, opts, needs=(dx, dw, db))``
  -> gradients of ``sum_i coef_i * logp_i`` (None where not needed), in the input dtypes;
  tokens with ``coef == 0`` must cost nothing and their lse/target must not be read.
- ``unavailable_reason(device)`` -> None when it can run on that device, else a message.

Optionally, for losses reduced to a scalar (gradients computed while the logits are at hand):

- ``forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs=(dx, dw, db))``
  -> ``(total, logp, kept, argmax, dx, dw, db)``: ``coef_fn(logp, valid) -> (sum of per-token
  losses, kept, dSum/dlogp)`` (``autograd.objective_coefficients``) is called on each token chunk's
  ``[rows]`` vectors; ``dx, dw, db`` are the gradients of ``total`` (None where not needed), which
  the autograd layer scales by the upstream scalar and casts to the input dtypes.
- ``grad_in_forward(dtype) -> bool``: whether ``forward_with_grad`` should be used for inputs of
  ``dtype`` (absent: always); e.g. ``triton`` declines fp16, whose per-token path is cheaper.
- ``name``: the backend's name, used in error messages (e.g. the double-backward refusal).

Row statistics (``return_stats=True``: ``LossStats.lse`` / ``entropy`` / ``predicted``): ``forward``
and ``forward_with_grad`` take a keyword ``row_stats: bool = False``; when True they return one more
value, ``rows [2, N] f32 = (logsumexp, softmax entropy)`` of each token's final logits (after scale
and soft-cap), from the same pass (rows where ``valid`` is False may hold anything; the argmax is
the one already returned).  With ``m`` the row max the entropy is
``log(sum_j e^(z_j - m)) - sum_j e^(z_j - m) (z_j - m) / sum_j e^(z_j - m)``: one more per-row
accumulator, rescaled like the sum-exp when the max grows (``S -> e^dm (S + dm * sumexp)``), whose
argmax term is exactly 0.  It costs an exp-weighted sum per logit, so the default call
(``row_stats=False``) must not compute it.  A backend without the keyword fails only
``return_stats=True`` calls.

The autograd layer (``fused_objectives/autograd.py``) is the only caller.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .triton import TritonBackend
from .triton_chunked import TritonChunkedBackend
from .triton_fused import TritonFusedBackend

REFERENCE = "reference"
_FUSED: Dict[str, object] = {"triton": TritonBackend(), "triton_chunked": TritonChunkedBackend(),
                             "triton_fused": TritonFusedBackend()}


def register_backend(name: str, backend) -> None:
    """Add a fused backend (an object with ``forward``, ``backward``, ``unavailable_reason``)."""
    _FUSED[name] = backend


def registered_backend(name: str):
    """The fused backend object registered as ``name`` (raises ``ValueError`` for another name)."""
    if name not in _FUSED:
        raise ValueError(f"no fused backend is registered as {name!r}; registered: {list(_FUSED)}")
    return _FUSED[name]


def name_of(impl) -> "str | None":
    """The name under which the backend object ``impl`` is registered, or None (e.g. a wrapper)."""
    for name, obj in _FUSED.items():
        if obj is impl:
            return name
    return None


def available_backends() -> tuple:
    return (REFERENCE,) + tuple(_FUSED)


def _auto(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and "cpu" in _FUSED:
        # never a silent fallback: if the C++ kernels cannot be built, resolve_backend says what to install
        return "cpu"
    return REFERENCE


def check_backend_name(name) -> str:
    """Raise unless ``name`` is ``"auto"`` or a registered backend; whether it can run on the
    inputs' device is known only at the call (see ``resolve_backend``)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name != "auto" and name not in available_backends():
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(available_backends())}")
    return name


def resolve_backend(name: str, device: torch.device):
    """Return ``"reference"`` or a fused backend object for ``name`` on ``device``."""
    check_backend_name(name)
    if name == "auto":
        name = _auto(device)
    if name == REFERENCE:
        return REFERENCE
    backend = _FUSED[name]
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise ValueError(reason)
    return backend


from . import cpu as _cpu  # noqa: E402,F401  (registers backend "cpu"; builds nothing at import)
