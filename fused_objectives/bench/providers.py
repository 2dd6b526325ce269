"""The implementations a user could pick instead of this engine, all computing the same objective.

Every provider turns ``(hidden [N, H], weight [V, H], target [N])`` into the scalar loss
``mean over valid tokens of objective(log p(target))`` (``normalize="valid"``), differentiable in
hidden and weight.  Providers that only compute a per-token cross-entropy (PyTorch's chunked
``F.linear_cross_entropy``, Liger, CCE) run with ``reduction="none"`` and get the objective applied
to ``log p = -nll`` (a per-token upstream gradient, the case that must work); for ``nll`` they run
their own ``reduction="mean"`` fast path.

Loss terms (``--z-loss``, ``--label-smoothing``, ``--class-weight``): a provider computes them itself
(this engine; Liger's ``lse_square_scale`` / ``label_smoothing`` / ``ce_weight`` and PyTorch's chunked
``weight`` for ``nll``) or is skipped with the reason, never run without them.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import fused_objectives as fo
from fused_objectives.backends import REFERENCE, available_backends, resolve_backend

from .inputs import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Problem:
    """What every provider must compute (``class_weight``: a ``[V]`` float32 tensor on the device, or None)."""

    objective: str
    softcap: Optional[float] = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    class_weight: Optional[torch.Tensor] = None

    @property
    def terms(self) -> List[str]:
        """The loss terms set, by name."""
        return ([n for n in ("z_loss", "label_smoothing") if getattr(self, n)]
                + (["class_weight"] if self.class_weight is not None else []))

    def term_kwargs(self) -> dict:
        return dict(z_loss=self.z_loss, label_smoothing=self.label_smoothing, class_weight=self.class_weight)


def _is_nll(problem: Problem) -> bool:
    return fo.get_objective(problem.objective).name == "nll"


def _terms_reason(problem: Problem, supported, who: str) -> Optional[str]:
    """Why ``who`` cannot compute ``problem``'s loss terms (None when it can): the ones it lacks, or, for an
    objective other than nll, any term (its per-token loss is then no longer -log p for the objective)."""
    terms = problem.terms
    missing = [t for t in terms if t not in supported]
    if missing:
        return f"{who} has no {' / '.join(missing)}"
    if terms and not _is_nll(problem):
        return (f"{who} computes {' / '.join(terms)} only as part of a cross-entropy: with them its per-token "
                f"loss is not -log p, so objective {problem.objective} cannot be applied to it")
    return None


def _mean_objective_of_nll(nll: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """``mean_valid objective(-nll)``: the objective on a per-token cross-entropy (0 at ignored tokens)."""
    valid = target != IGNORE_INDEX
    logp = torch.where(valid, -nll.float(), torch.zeros_like(nll, dtype=torch.float32))
    per_tok, _ = fo.get_objective(objective).per_token(logp, valid)
    return per_tok.sum() / valid.sum().clamp(min=1)


class Provider:
    name = ""
    description = ""

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, problem: Problem) -> Optional[str]:
        return None

    def build(self, device: torch.device, dtype: torch.dtype, problem: Problem) -> LossFn:
        raise NotImplementedError

    def label(self, device: torch.device) -> str:
        """What actually runs (e.g. the backend ``auto`` resolves to), for the report."""
        return self.name


class Fused(Provider):
    """This engine: ``fo.linear_objective_loss`` with ``backend="auto"`` or a forced fused backend."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.name = "fused" if backend == "auto" else f"fused-{backend}"
        self.description = ("this engine, the backend 'auto' picks" if backend == "auto"
                            else f"this engine, backend={backend!r}")

    def unavailable_reason(self, device, dtype, problem):
        try:
            resolve_backend(self.backend, device)
        except ValueError as exc:
            return str(exc)
        return None

    def label(self, device):
        impl = resolve_backend(self.backend, device)
        return REFERENCE if impl == REFERENCE else getattr(impl, "name", type(impl).__name__)

    def build(self, device, dtype, problem):
        backend, objective, softcap = self.backend, problem.objective, problem.softcap
        terms = {k: v for k, v in problem.term_kwargs().items() if k in problem.terms}

        def fn(h, w, y):
            return fo.linear_objective_loss(h, w, y, objective=objective, softcap=softcap,
                                            ignore_index=IGNORE_INDEX, backend=backend, **terms)
        return fn


class Reference(Fused):
    """Eager full fp32 logits: what the paper's reference trainer does (the project's ground truth)."""

    def __init__(self):
        super().__init__(REFERENCE)
        self.name = "reference"
        self.description = "eager PyTorch, full fp32 [N, V] logits (fused_objectives backend='reference')"

    def label(self, device):
        return REFERENCE


class Broken(Reference):
    """The reference with a planted 10% error: exists to show that the correctness gate works."""

    def __init__(self):
        super().__init__()
        self.name = "broken"
        self.description = "self-test of the correctness gate: the reference times 1.1 (never a default)"

    def build(self, device, dtype, problem):
        fn = super().build(device, dtype, problem)
        return lambda h, w, y: fn(h, w, y) * 1.1


class TorchNative(Provider):
    name = "torch_native"
    description = "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions()), torch >= 2.13"

    def unavailable_reason(self, device, dtype, problem):
        F = torch.nn.functional
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return (f"torch {torch.__version__} has no chunked F.linear_cross_entropy "
                    f"(LinearCrossEntropyOptions arrived in torch 2.13)")
        if problem.softcap is not None:
            return "F.linear_cross_entropy has no logit soft-cap (this shape needs softcap)"
        reason = _terms_reason(problem, ("label_smoothing", "class_weight"), "F.linear_cross_entropy")
        if reason is None and problem.label_smoothing:
            # torch 2.13 warns "options ignored" and materialises the logits: not the chunked path this names
            return "F.linear_cross_entropy's chunked path needs label_smoothing == 0 (it falls back to full logits)"
        return reason

    def build(self, device, dtype, problem):
        F = torch.nn.functional
        options = torch.nn.LinearCrossEntropyOptions()
        objective = problem.objective
        if fo.get_objective(objective).name == "nll":
            cw = problem.class_weight
            return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean",
                                                          weight=cw, options=options)

        def fn(h, w, y):
            nll = F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none", options=options)
            return _mean_objective_of_nll(nll, y, objective)
        return fn


def _compiled_terms(problem: Problem):
    """With loss terms: the loss written from its definition on materialised fp32 logits, for torch.compile."""
    obj = fo.get_objective(problem.objective)
    softcap, zl, eps, cw = problem.softcap, problem.z_loss, problem.label_smoothing, problem.class_weight

    def loss_fn(h, w, y):
        valid = y != IGNORE_INDEX
        z = (h @ w.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logsm = torch.log_softmax(z, dim=-1)
        t = y.clamp(min=0)
        logp = torch.where(valid, logsm.gather(1, t[:, None])[:, 0], torch.zeros_like(z[:, 0]))
        per_tok, kept = obj.per_token(logp, valid)
        wt = valid.float() if cw is None else torch.where(valid, cw[t], torch.zeros_like(logp))
        per_tok = per_tok * wt
        if eps:
            smooth = -(logsm.sum(-1) if cw is None else logsm @ cw) * (eps / z.shape[-1])
            per_tok = (1 - eps) * per_tok + torch.where(kept, smooth, torch.zeros_like(smooth))
        loss = per_tok.sum() / wt.sum().clamp(min=torch.finfo(torch.float32).tiny)
        if zl:
            lse = torch.logsumexp(z, dim=-1)
            loss = loss + zl * torch.where(valid, lse * lse, torch.zeros_like(lse)).sum() / valid.sum().clamp(min=1)
        return loss
    return loss_fn


def _compiled_reference(objective: str, softcap: Optional[float]):
    """The reference backend's math (after input validation) as one function for torch.compile."""
    from fused_objectives.backends import reference
    from fused_objectives.options import LogitOptions

    obj = fo.get_objective(objective)
    opts = LogitOptions(softcap=softcap)

    def loss_fn(h, w, y):
        valid = y != IGNORE_INDEX
        logp = reference.target_logprob(h, w, None, y, valid, opts)[0]
        per_tok, _ = obj.per_token(logp, valid)
        return per_tok.sum() / valid.sum().clamp(min=1)
    return loss_fn


class TorchCompile(Provider):
    name = "torch_compile"
    description = "the reference (fp32 logits) under torch.compile(dynamic=True)"
    _cache: Dict[tuple, LossFn] = {}

    def unavailable_reason(self, device, dtype, problem):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return "torch.compile on CPU needs a C++ compiler (none on PATH)"
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs Triton"
        return None

    def build(self, device, dtype, problem):
        if problem.terms:
            return torch.compile(_compiled_terms(problem), dynamic=True)
        key = (problem.objective, problem.softcap)
        if key not in self._cache:
            # dynamic=True: one compilation serves every token count and the correctness slice
            self._cache[key] = torch.compile(_compiled_reference(problem.objective, problem.softcap), dynamic=True)
        return self._cache[key]


def _import_or_reason(module: str, install: str):
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"{install} is not installed ({exc})"
    except Exception as exc:  # a broken install must not stop the other providers
        return None, f"importing {module} failed: {type(exc).__name__}: {exc}"


class Liger(Provider):
    name = "liger"
    description = "Liger-Kernel's Triton fused linear cross entropy (reduction='none' + objective when not nll)"

    def unavailable_reason(self, device, dtype, problem):
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel, or carry its wheel in .whl/)"
        if device.type != "cuda":
            return "liger-kernel's Triton kernels need CUDA tensors (no CPU path)"
        _, reason = _import_or_reason("liger_kernel.ops.fused_linear_cross_entropy", "liger-kernel")
        return reason or _terms_reason(problem, ("z_loss", "label_smoothing", "class_weight"), "liger-kernel")

    def build(self, device, dtype, problem):
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as LigerFn

        objective, softcap = problem.objective, problem.softcap
        is_nll = fo.get_objective(objective).name == "nll"
        # Liger's own names: ce_weight, lse_square_scale (its z-loss), label_smoothing
        cw, zl, eps = problem.class_weight, problem.z_loss, problem.label_smoothing

        def fn(h, w, y):
            out = LigerFn.apply(h, w, y, None, cw, IGNORE_INDEX, zl, eps,
                                "mean" if is_nll else "none", softcap)
            loss = out[0] if isinstance(out, tuple) else out
            return loss if is_nll else _mean_objective_of_nll(loss, y, objective)
        return fn


class CutCrossEntropy(Provider):
    name = "cce"
    description = "Apple's Cut Cross-Entropy (cut_cross_entropy.linear_cross_entropy)"

    def unavailable_reason(self, device, dtype, problem):
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
        if device.type != "cuda":
            return "cut-cross-entropy's kernels need CUDA tensors"
        _, reason = _import_or_reason("cut_cross_entropy", "cut-cross-entropy")
        return reason or _terms_reason(problem, (), "cut-cross-entropy's linear_cross_entropy")

    def build(self, device, dtype, problem):
        from cut_cross_entropy import linear_cross_entropy

        objective, softcap = problem.objective, problem.softcap
        is_nll = fo.get_objective(objective).name == "nll"

        def fn(h, w, y):
            out = linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, softcap=softcap,
                                       reduction="mean" if is_nll else "none")
            return out if is_nll else _mean_objective_of_nll(out, y, objective)
        return fn


def fused_backend_names() -> List[str]:
    return [b for b in available_backends() if b != REFERENCE]


def all_providers() -> Dict[str, Provider]:
    providers: List[Provider] = [Fused()]
    providers += [Fused(b) for b in fused_backend_names()]
    providers += [Reference(), TorchNative(), TorchCompile(), Liger(), CutCrossEntropy(), Broken()]
    return {p.name: p for p in providers}


def default_provider_names(device: torch.device) -> List[str]:
    """Every provider but the gate's self-test and the ``fused-<backend>`` that ``fused`` already
    runs; other ``fused-<backend>`` ones are listed (and skipped with their reason when they cannot
    run) so that a report says which backends were not measured."""
    try:
        auto = Fused().label(device)
    except ValueError:  # auto's backend cannot run here: every fused-* is listed, and skipped with why
        auto = None
    return [n for n in all_providers() if n != "broken" and n != f"fused-{auto}"]


def get_provider(name: str) -> Provider:
    providers = all_providers()
    if name not in providers:
        raise ValueError(f"unknown provider {name!r}; expected one of {sorted(providers)}")
    return providers[name]
