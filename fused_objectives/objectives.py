"""Objectives: per-token functions of the target log-probability ``l = log p(target)``.

Every objective of arXiv 2510.00526 is ``loss_i = f(l_i)`` on the tokens that pass an optional
gate on ``p_i = exp(l_i)``.  Its gradient on the logits is ``c_i * (onehot - softmax)`` with
``c_i = dLoss/dl_i``, so the fused kernels never need to know which objective runs: the objective
is evaluated here, on ``[N]`` vectors, and autograd hands the kernels the per-token ``c_i``.

This module is the one registry.  Adding an objective means adding one entry to ``_BUILTINS``
(or calling :func:`register_objective`).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch

__all__ = ["Objective", "get_objective", "register_objective", "list_objectives"]

LossFn = Callable[[torch.Tensor], torch.Tensor]
GateFn = Callable[[torch.Tensor], torch.Tensor]

# Evaluate objectives at a benign point (p = 0.5) where a token is not kept, so that a function
# with a singularity at l = 0 (p = 1) cannot turn a masked-out token into a NaN gradient.
_SAFE_LOGP = math.log(0.5)


@dataclass(frozen=True)
class Objective:
    """A per-token objective ``loss_i = loss(l_i) * 1[gate(p_i)]`` of the target log-probability.

    Args:
        name: canonical spec string (``"power:10"``), used in reprs, logs and benchmarks.
        loss: elementwise function of the float32 log-probability ``l`` (a tensor), returning the
            per-token loss.  Its autograd derivative is the per-token gradient weight.
        gate: optional elementwise predicate on the detached probability ``p``; tokens where it is
            False are not *kept*: they add nothing to the loss, the gradient or the kept count.
        formula: human-readable loss and gradient weight, shown in ``repr`` and the docs.
    """

    name: str
    loss: LossFn
    gate: Optional[GateFn] = None
    formula: str = ""

    def per_token(self, logp: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token losses (0 where not kept) and the kept mask, for ``[N]`` logp / valid vectors.

        A NaN log-probability on a valid token is always kept, so a NaN in the inputs reaches the
        loss instead of being silently gated away.
        """
        kept = valid
        if self.gate is not None:
            p = logp.detach().exp()
            kept = valid & (self._gate_mask(p) | torch.isnan(p))
        safe = torch.where(kept, logp, torch.full_like(logp, _SAFE_LOGP))
        per_tok = self.loss(safe)
        if not isinstance(per_tok, torch.Tensor) or per_tok.shape != logp.shape:
            raise ValueError(
                f"objective {self.name!r}: its loss function must return a tensor shaped like its "
                f"input {tuple(logp.shape)}, got "
                f"{tuple(per_tok.shape) if isinstance(per_tok, torch.Tensor) else type(per_tok).__name__}"
            )
        return torch.where(kept, per_tok, torch.zeros_like(per_tok)), kept

    def _gate_mask(self, p: torch.Tensor) -> torch.Tensor:
        mask = self.gate(p)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"the gate of objective {self.name!r} must return a bool tensor (a comparison "
                            f"such as p >= t), got {got}")
        if mask.shape != p.shape:
            raise ValueError(f"the gate of objective {self.name!r} must return a bool tensor shaped like "
                             f"its input p {tuple(p.shape)}, got {tuple(mask.shape)}")
        return mask

    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        """Per-token loss of ``logp`` with every token valid (gate applied)."""
        return self.per_token(logp, torch.ones_like(logp, dtype=torch.bool))[0]

    def __repr__(self) -> str:
        return f"Objective({self.name!r}{', ' + self.formula if self.formula else ''})"


@dataclass(frozen=True)
class _Entry:
    build: Callable[[Optional[float]], Objective]
    param: Optional[str] = None  # None: takes no parameter; "power": a > 0; "threshold": t in [0, 1]
    doc: str = ""
    aliases: Tuple[str, ...] = field(default_factory=tuple)


# Module-level functions bound with functools.partial (not lambdas), so objectives pickle.
def _at_least(t: float, p: torch.Tensor) -> torch.Tensor:
    return p >= t


def _at_most(t: float, p: torch.Tensor) -> torch.Tensor:
    return p <= t


def _ge(t: float) -> GateFn:
    return functools.partial(_at_least, t)


def _le(t: float) -> GateFn:
    return functools.partial(_at_most, t)


def _nll(logp):
    return -logp


def _one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """``1 - exp(x)`` accurate at both ends: the value is ``-expm1(x)`` (``1 - exp(x)`` in float32 is
    19% off at ``1 - p = 1e-7``), the derivative ``-exp(x)`` computed directly (autograd's expm1
    derivative, ``result + 1``, rounds ``exp(x) < 6e-8`` to 0 in float32)."""
    e = torch.exp(x)
    # e.detach() - e is exactly 0 in value and carries the derivative -exp(x)
    return -torch.expm1(x.detach()) + (e.detach() - e)


def _neg_p(logp):
    return _one_minus_exp(logp)


def _unlikelihood(logp):
    return torch.log(_one_minus_exp(logp) + 1e-3)


def _dft(logp):
    return -logp.detach().exp() * logp


def _gated(base: str, fn: LossFn, gate_of: Callable[[float], GateFn], sym: str, f: str, s: str):
    def build(t):
        return Objective(f"{base}:{t:g}", fn, gate_of(t), f"loss {f} * 1[p {sym} {t:g}], weight {s} * 1[p {sym} {t:g}]")

    return build


def _power_loss(a: float, logp: torch.Tensor) -> torch.Tensor:
    # (1 - p^a) / a with an expm1 value: tends to -l (NLL) as a -> 0 instead of rounding to 0
    return _one_minus_exp(a * logp) / a


def _neg_power_loss(a: float, logp: torch.Tensor) -> torch.Tensor:
    return -torch.exp(a * logp) / a


def _with_param(fn: Callable, value: float, x: torch.Tensor) -> torch.Tensor:
    return fn(x, value)


def _power(a):
    return Objective(f"power:{a:g}", functools.partial(_power_loss, a), None, f"loss (1 - p^{a:g})/{a:g}, weight p^{a:g}")


def _neg_power(a):
    return Objective(f"neg_power:{a:g}", functools.partial(_neg_power_loss, a), None, f"loss -p^{a:g}/{a:g}, weight p^{a:g}")


_BUILTINS: Dict[str, _Entry] = {
    "nll": _Entry(lambda _: Objective("nll", _nll, None, "loss -log p, weight 1"), None,
                  "negative log-likelihood (cross-entropy)", ("original", "logp")),
    "neg_p": _Entry(lambda _: Objective("neg_p", _neg_p, None, "loss 1 - p, weight p"), None,
                    "negative probability (shifted to be >= 0)", ("p",)),
    "power": _Entry(_power, "power", "(1 - p^a)/a; a=1 is neg_p, a -> 0 is nll", ("GeneralFamily",)),
    "neg_power": _Entry(_neg_power, "power", "-p^a/a (same gradient as power:a)", ("convexity",)),
    "nll_top": _Entry(_gated("nll_top", _nll, _ge, ">=", "-log p", "1"), "threshold",
                      "-log p on tokens with p >= t", ("OnlyTopLogP",)),
    "nll_bottom": _Entry(_gated("nll_bottom", _nll, _le, "<=", "-log p", "1"), "threshold",
                         "-log p on tokens with p <= t", ("OnlyBottomLogP",)),
    "neg_p_top": _Entry(_gated("neg_p_top", _neg_p, _ge, ">=", "1 - p", "p"), "threshold",
                        "1 - p on tokens with p >= t", ("OnlyTopP",)),
    "neg_p_bottom": _Entry(_gated("neg_p_bottom", _neg_p, _le, "<=", "1 - p", "p"), "threshold",
                           "1 - p on tokens with p <= t", ("OnlyBottomP",)),
    "unlikelihood_top": _Entry(_gated("unlikelihood_top", _unlikelihood, _ge, ">=", "log(1 - p + 1e-3)",
                                      "p/(1 - p + 1e-3)"), "threshold",
                               "log(1 - p + 1e-3) on tokens with p >= t", ("UnlikehoodTop",)),
    "unlikelihood_bottom": _Entry(_gated("unlikelihood_bottom", _unlikelihood, _le, "<=", "log(1 - p + 1e-3)",
                                         "p/(1 - p + 1e-3)"), "threshold",
                                  "log(1 - p + 1e-3) on tokens with p <= t", ("UnlikehoodBottom",)),
    "dft": _Entry(lambda _: Objective("dft", _dft, None, "loss -sg(p) log p, weight p"), None,
                  "dynamic fine-tuning: -stopgrad(p) * log p", ()),
}

# User objectives: name -> (loss_fn(logp[, param]), gate_fn(p[, param]) or None, takes_param, formula)
_USER: Dict[str, Tuple[Callable, Optional[Callable], bool, str]] = {}

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _alias_table() -> Dict[str, str]:
    table = {}
    for name, entry in _BUILTINS.items():
        for alias in entry.aliases:
            table[alias] = name
    return table


def _parse_param(spec: str, name: str, raw: str, kind: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"objective {spec!r}: parameter {raw!r} of {name!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"objective {spec!r}: parameter of {name!r} must be finite, got {raw!r}")
    if kind == "power" and value <= 0:
        raise ValueError(f"objective {spec!r}: the exponent a of {name!r} must be > 0, got {value:g}")
    if kind == "threshold" and not 0.0 <= value <= 1.0:
        raise ValueError(f"objective {spec!r}: the threshold t of {name!r} must be in [0, 1], got {value:g}")
    return value


def _split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"name:param"`` (ours) or ``"Name-param"`` (the reference trainer's aliases)."""
    if ":" in spec:
        name, _, raw = spec.partition(":")
        return name.strip(), raw.strip()
    aliases = _alias_table()
    head, sep, raw = spec.partition("-")
    if sep and head in aliases:
        return head, raw
    return spec.strip(), None


def get_objective(spec: Union[str, Objective, Callable[[torch.Tensor], torch.Tensor]]) -> Objective:
    """Resolve an objective spec to an :class:`Objective`.

    Accepts a spec string (``"nll"``, ``"neg_p"``, ``"power:10"``, ``"nll_top:0.2"``, the reference
    trainer's names such as ``"GeneralFamily-10"`` or ``"OnlyTopLogP-0.2"``, or a name given to
    :func:`register_objective`), an :class:`Objective`, or a callable ``f(logp) -> per-token loss``.
    """
    if isinstance(spec, Objective):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return Objective(getattr(spec, "__name__", "custom"), spec, None, "user function of log p")
    if not isinstance(spec, str):
        raise TypeError(f"objective must be a spec string, an Objective or a callable, got {type(spec).__name__}")
    name, raw = _split_spec(spec)
    name = _alias_table().get(name, name)
    if name in _USER:
        fn, gate, takes_param, formula = _USER[name]
        if takes_param != (raw is not None):
            need = "takes a parameter (name:value)" if takes_param else "takes no parameter"
            raise ValueError(f"objective {spec!r}: registered objective {name!r} {need}")
        if not takes_param:
            return Objective(name, fn, gate, formula)
        value = _parse_param(spec, name, raw, "any")
        return Objective(f"{name}:{value:g}", functools.partial(_with_param, fn, value),
                         functools.partial(_with_param, gate, value) if gate is not None else None, formula)
    if name not in _BUILTINS:
        known = ", ".join(list_objectives())
        raise ValueError(f"unknown objective {spec!r}; known objectives: {known}")
    entry = _BUILTINS[name]
    if entry.param is None:
        if raw is not None:
            raise ValueError(f"objective {spec!r}: {name!r} takes no parameter")
        return entry.build(None)
    if raw is None or raw == "":
        example = "power:10" if entry.param == "power" else f"{name}:0.2"
        raise ValueError(f"objective {spec!r}: {name!r} needs a parameter, e.g. {example!r}")
    return entry.build(_parse_param(spec, name, raw, entry.param))


def register_objective(
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    gate: Optional[Callable[..., torch.Tensor]] = None,
    takes_param: bool = False,
    formula: str = "",
    overwrite: bool = False,
) -> None:
    """Register a user objective, usable by name everywhere a spec string is accepted.

    Args:
        name: identifier (letters, digits, underscores); must not shadow a built-in.
        fn: ``fn(logp)`` (or ``fn(logp, param)`` with ``takes_param=True``) returning the per-token
            loss; ``logp`` is a float32 tensor of target log-probabilities and must be used through
            differentiable torch ops.
        gate: optional ``gate(p)`` (or ``gate(p, param)``) returning a bool mask of kept tokens.
        takes_param: the spec is then ``"name:value"`` with a float value.
        overwrite: replace an earlier user registration of the same name.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"objective name must be an identifier (letters, digits, '_'), got {name!r}")
    if name in _BUILTINS or name in _alias_table():
        raise ValueError(f"objective name {name!r} is a built-in objective and cannot be replaced")
    if name in _USER and not overwrite:
        raise ValueError(f"objective {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if gate is not None and not callable(gate):
        raise TypeError(f"gate must be callable or None, got {type(gate).__name__}")
    _USER[name] = (fn, gate, bool(takes_param), formula or "user objective")


def list_objectives() -> Tuple[str, ...]:
    """Names of the built-in and registered objectives (parameterised ones take ``name:value``)."""
    names = [n + (":a" if e.param == "power" else ":t" if e.param == "threshold" else "") for n, e in _BUILTINS.items()]
    names += [n + (":x" if u[2] else "") for n, u in _USER.items()]
    return tuple(names)
