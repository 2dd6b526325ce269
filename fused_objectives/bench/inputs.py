"""Benchmark inputs, the float64 ground truth and the correctness gate.

Inputs are deterministic (seeded, generated on the benchmark device) and realistic for SFT: each
target's logit is boosted by a random margin, so target probabilities spread over (0, 1) as for a
fine-tuned model (random targets would give p ~ 1/V, and probability-based objectives near-zero
gradients); with an ignored fraction f, the first f of every sequence (the prompt) is ignore_index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

import fused_objectives as fo

IGNORE_INDEX = -100
SEQ_LEN = 256  # tokens per simulated sequence (or all of them, when fewer); the prompt starts each one
MAX_MARGIN = 16.0  # target-logit boost drawn uniformly in [0, MAX_MARGIN]: p spans (0, 1) at V ~ 1e5

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Normwise relative error a provider may show against float64, whatever the same-dtype reference does:
# fp32 allows TF32 tensor-core dots; bf16/fp16 allow logits computed in the input dtype.
TOLERANCE_FLOOR = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# ... and a provider may be this many times worse than the same-dtype reference.
TOLERANCE_FACTOR = 8.0


@dataclass
class Inputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    target: torch.Tensor  # [N] int64, IGNORE_INDEX on prompt tokens

    @property
    def n_valid(self) -> int:
        return int((self.target != IGNORE_INDEX).sum())

    def head(self, n: int) -> "Inputs":
        """The first ``n`` tokens (whole sequences first), fresh leaves sharing values."""
        if n >= self.hidden.shape[0]:
            return Inputs(self.hidden.detach().requires_grad_(), self.weight.detach().requires_grad_(),
                          self.target)
        return Inputs(self.hidden.detach()[:n].contiguous().requires_grad_(),
                      self.weight.detach().requires_grad_(), self.target[:n].contiguous())


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device, ignored_fraction: float,
                seed: int = 0) -> Inputs:
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(vocab, hidden, device=device, generator=g) / math.sqrt(hidden)
    x = torch.randn(tokens, hidden, device=device, generator=g)
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    margin = torch.rand(tokens, device=device, generator=g) * MAX_MARGIN
    wy = w[y]
    # adds exactly `margin` to each token's target logit
    x += (margin / wy.pow(2).sum(1))[:, None] * wy
    del wy
    seq = min(SEQ_LEN, tokens)
    pos = torch.arange(tokens, device=device) % seq
    y = torch.where(pos < round(ignored_fraction * seq), torch.full_like(y, IGNORE_INDEX), y)
    return Inputs(x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y)


@dataclass
class Result:
    """What one provider computed: the loss and the gradients of hidden and weight."""

    loss: torch.Tensor
    dx: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]


def run_once(fn, inp: Inputs) -> Result:
    inp.hidden.grad = None
    inp.weight.grad = None
    loss = fn(inp.hidden, inp.weight, inp.target)
    loss.backward()
    return Result(loss.detach(), inp.hidden.grad, inp.weight.grad)


def ground_truth(inp: Inputs, objective: str, softcap: Optional[float]) -> Result:
    """The float64 reference on the same values (the reference backend computes in float64)."""
    h = inp.hidden.detach().double().requires_grad_()
    w = inp.weight.detach().double().requires_grad_()
    loss = fo.linear_objective_loss(h, w, inp.target, objective=objective, softcap=softcap,
                                    ignore_index=IGNORE_INDEX, backend="reference")
    loss.backward()
    return Result(loss.detach(), h.grad, w.grad)


def _normwise(a: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if a is None:
        return math.inf
    if a.shape != ref.shape:
        return math.inf
    diff = (a.detach().to(ref.device, torch.float64) - ref)
    scale = float(ref.norm())
    err = float(diff.norm())
    if math.isnan(err):
        return math.inf
    return err / scale if scale > 0 else err


def errors(res: Result, gt: Result) -> Dict[str, float]:
    """Normwise relative errors ``||a - gt|| / ||gt||`` of loss, dX and dW (inf for NaN or missing)."""
    return {"loss": _normwise(res.loss.reshape(()), gt.loss.reshape(())),
            "dx": _normwise(res.dx, gt.dx), "dw": _normwise(res.dw, gt.dw)}


def tolerance(dtype: torch.dtype, reference_error: float) -> float:
    return max(TOLERANCE_FLOOR[dtype], TOLERANCE_FACTOR * reference_error)


def check(res: Result, gt: Result, tol: float) -> Tuple[bool, float, Dict[str, float]]:
    errs = errors(res, gt)
    worst = max(errs.values())
    return worst <= tol, worst, errs
