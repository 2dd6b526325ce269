"""Backends: ``reference`` (PyTorch autograd on materialised logits) and fused backends.

Every loss is a function of three per-token statistics of the final logits ``z`` (after scale and
soft-cap): ``logp_i = z_i[y_i] - lse_i``, ``lse_i = logsumexp(z_i)`` and, with a ``[V]`` float32
dot vector ``u`` (label smoothing: ones or the class weights), ``dotz_i = u . z_i``.  The gradient
of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` on the logits is ``dz_i = c_i (onehot(y_i) - p_i) +
b_i p_i + g_i u``, computed at the target column as ``c_i (1 - p_iy) + b_i p_iy + g_i u_y`` with
``1 - p`` from the forward's ``log p`` (``-expm1``: confident tokens keep their digits).  A fused
backend implements that one generalised epilogue in two primitives:

- ``forward(hidden [N, H], weight [V, H], bias [V] | None, target [N] int64, valid [N] bool, opts,
  row_stats=False, dot=None)`` -> ``(logp [N] f32, state [3, N] f32, argmax [N] int64, rows [3, N] f32)``:
  ``rows = (lse, entropy, dotz)``; the entropy (one more exp-weighted sum per logit, rescaled like the
  sum-exp when the max grows: ``S -> e^dm (S + dm * sumexp)``) only with ``row_stats``, ``dotz`` only
  with ``dot``; neither is computed otherwise.  ``state`` is what the backward needs (every built-in
  backend: row max, log-normaliser, log p; the compiled path's operator relies on that shape).  Rows
  where ``valid`` is False may hold anything; a valid token whose target is outside ``[0, V)`` must give
  a NaN log-probability (never an out-of-bounds read).
- ``backward(hidden, weight, bias, target, state, coef, opts, needs=(dx, dw, db), dot=None)`` ->
  gradients of ``sum_i c_i logp_i + b_i lse_i + g_i dotz_i`` (None where not needed), in the input
  dtypes; ``coef`` f32 is ``[N]`` (c; b = g = 0, the plain objectives), ``[2, N]`` (c, b) or ``[3, N]``
  (c, b, g; with ``dot``).  Tokens whose coefficients are all zero must cost nothing and their
  lse/target must not be read.
- ``unavailable_reason(device)`` -> None when it can run on that device, else a message.

Optionally, for losses reduced to a scalar (gradients computed while the logits are at hand):

- ``forward_with_grad(hidden, weight, bias, target, valid, opts, coef_fn, needs, row_stats=False,
  dot=None)`` -> ``(total, logp, kept, argmax, dx, dw, db, rows [3, N])``: ``coef_fn(logp, lse, dotz |
  None, target, valid) -> (sum of per-token losses, kept, coef)`` (``autograd.objective_coefficients``)
  is called on each token chunk's ``[rows]`` vectors, ``coef`` shaped as in ``backward``; ``dx, dw,
  db`` are the gradients of ``total``, which the autograd layer scales by the upstream scalar.
- ``grad_in_forward(dtype) -> bool``: whether ``forward_with_grad`` should be used for inputs of
  ``dtype`` (absent: always); e.g. ``triton`` declines fp16, whose per-token path is cheaper.
- ``name``: the backend's name, used in error messages (e.g. the double-backward refusal);
  ``supports_double_backward = False`` makes ``create_graph=True`` raise (a vocabulary shard).

The autograd layer (``fused_objectives/autograd.py``) is the only caller, eagerly through its
autograd Functions and under ``torch.compile`` through the operators ``fused_objectives::row_logprob``
/ ``row_logprob_backward`` (one schema for every registered backend, chosen by name);
``fused_objectives/parallel.py`` wraps a backend for a vocabulary-sharded (DTensor) head.
``reference.ReferenceBackend`` is the contract on materialised logits, an executable specification.
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
