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

# Relative error a provider may show against float64, whatever the same-dtype reference does.  fp32:
# CPU GEMMs are IEEE fp32 (observed errors ~6e-7), CUDA providers may use TF32 tensor-core dots;
# bf16/fp16 allow logits computed in the input dtype.
TOLERANCE_FLOOR = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
TOLERANCE_FLOOR_CPU = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# ... and a provider may be this many times worse than the same-dtype reference.
TOLERANCE_FACTOR = 8.0
# The worst single row (token of dX, vocabulary row of dW) may be this many times the tolerance: a
# maximum over thousands of rows exceeds the normwise error (bf16 logits: worst rows ~2x normwise),
# while a wrong row or chunk is off by its whole error.
ROW_FACTOR = 4.0
# The float64 truth walks the tokens in chunks whose float64 [rows, V] buffers stay within this many bytes.
TRUTH_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


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
    """What one provider computed: the loss and the gradients of hidden and weight (and bias)."""

    loss: torch.Tensor
    dx: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]
    db: Optional[torch.Tensor] = None


def make_class_weight(vocab: int, device, seed: int = 0) -> torch.Tensor:
    """Seeded per-class weights for ``--class-weight``: float32 ``[V]`` uniform in [0.5, 1.5]."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed + 7919)
    return 0.5 + torch.rand(vocab, device=device, generator=g)


def run_once(fn, inp: Inputs) -> Result:
    inp.hidden.grad = None
    inp.weight.grad = None
    loss = fn(inp.hidden, inp.weight, inp.target)
    loss.backward()
    return Result(loss.detach(), inp.hidden.grad, inp.weight.grad)


def ground_truth(inp: Inputs, objective: str, softcap: Optional[float], *, bias: Optional[torch.Tensor] = None,
                 logit_scale: Optional[float] = None, chunk_bytes: Optional[int] = None, z_loss: float = 0.0,
                 label_smoothing: float = 0.0, class_weight: Optional[torch.Tensor] = None) -> Result:
    """float64 loss and gradients over **every** token of ``inp`` (mean over valid tokens).

    Written here from the definitions (logits ``(x W^T + b) * logit_scale``, soft-capped, float64
    log-softmax, the objective's per-token loss), walking the tokens in chunks so the float64
    ``[rows, V]`` buffers stay within ``chunk_bytes`` (default ``TRUTH_CHUNK_BYTES`` of the device):
    no token count is too large to check in full.  Each chunk is differentiated by float64 autograd.

    Loss terms (``z_loss``, ``label_smoothing`` = eps, ``class_weight`` = w, u = w or ones), per
    token: ``(1 - eps) w[y] f(log p_y) - (eps / V) sum_j u_j log p_j`` on kept tokens plus
    ``z_loss * logsumexp(z)^2`` on valid ones; the first part is divided by the sum of ``w[y]`` over
    valid tokens (their count without weights), the z-loss by the count (Liger's and
    ``F.cross_entropy(weight=..., label_smoothing=...)``'s means).
    """
    x_all = inp.hidden.detach()
    device = x_all.device
    f64 = torch.float64
    w = inp.weight.detach().to(f64).requires_grad_()
    b = None if bias is None else bias.detach().to(f64).requires_grad_()
    target = inp.target
    valid = target != IGNORE_INDEX
    n_valid = int(valid.sum())
    obj = fo.get_objective(objective)
    N, H = x_all.shape
    V = w.shape[0]
    u = None if class_weight is None else class_weight.detach().to(device, f64)
    w_sum = float(u[target[valid]].sum()) if u is not None else float(n_valid)
    budget = chunk_bytes or TRUTH_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = max(1, budget // (8 * V * 6))  # logits, transforms, softmax and their gradients
    dx = torch.zeros(N, H, dtype=f64, device=device)
    dw = torch.zeros(V, H, dtype=f64, device=device)
    db = None if b is None else torch.zeros(V, dtype=f64, device=device)
    total = torch.zeros((), dtype=f64, device=device)
    idx_all = valid.nonzero().squeeze(1)
    for start in range(0, idx_all.numel(), rows):
        idx = idx_all[start:start + rows]
        x = x_all.index_select(0, idx).to(f64).requires_grad_()
        t = target.index_select(0, idx)
        z = x @ w.T
        if b is not None:
            z = z + b
        if logit_scale is not None:
            z = z * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logsm = torch.log_softmax(z, dim=-1)
        logp = logsm.gather(1, t[:, None])[:, 0]
        per_tok, kept = obj.per_token(logp, torch.ones_like(logp, dtype=torch.bool))
        if u is not None:
            per_tok = per_tok * u[t]
        if label_smoothing:
            smooth = -(logsm.sum(-1) if u is None else (logsm * u).sum(-1)) * (label_smoothing / V)
            per_tok = (1 - label_smoothing) * per_tok + torch.where(kept, smooth, torch.zeros_like(smooth))
        part = per_tok.sum() / w_sum if w_sum > 0 else per_tok.sum() * 0.0
        if z_loss:
            part = part + z_loss * torch.logsumexp(z, dim=-1).pow(2).sum() / max(n_valid, 1)
        grads = torch.autograd.grad(part, [x, w] + ([b] if b is not None else []))
        dx.index_copy_(0, idx, grads[0])
        dw += grads[1]
        if b is not None:
            db += grads[2]
        total += part.detach()
    return Result(total, dx, dw, db)


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


def _rowwise(a: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    """Worst row: ``max_i ||a_i - ref_i|| / max(||ref_i||, rms row norm)``, so one wrong token (or
    vocabulary row) shows at full size however many rows are right; tiny rows are judged against a
    typical row, not against their own rounding."""
    if a is None or a.shape != ref.shape:
        return math.inf
    if ref.dim() < 2 or ref.shape[0] == 0:
        return _normwise(a, ref)
    diff = (a.detach().to(ref.device, torch.float64) - ref).norm(dim=1)
    row = ref.norm(dim=1)
    typical = float(ref.norm()) / math.sqrt(ref.shape[0])
    if typical == 0:
        return float(diff.max()) if not torch.isnan(diff).any() else math.inf
    err = float((diff / row.clamp(min=typical)).max())
    return math.inf if math.isnan(err) else err


def errors(res: Result, gt: Result) -> Dict[str, float]:
    """Relative errors against the truth (inf for NaN or missing): normwise ``||a - gt|| / ||gt||``
    of loss, dX, dW (and db when the truth has one), and row by row for dX (every token) and dW
    (every vocabulary row)."""
    errs = {"loss": _normwise(res.loss.reshape(()), gt.loss.reshape(())),
            "dx": _normwise(res.dx, gt.dx), "dw": _normwise(res.dw, gt.dw),
            "dx_rows": _rowwise(res.dx, gt.dx), "dw_rows": _rowwise(res.dw, gt.dw)}
    if gt.db is not None:
        errs["db"] = _normwise(res.db, gt.db)
    return errs


def tolerance(dtype: torch.dtype, reference_error: float, device=None) -> float:
    """The gate's bound: the dtype's floor on ``device`` (IEEE fp32 on CPU; TF32 allowed on CUDA;
    without a device, the CUDA floors), or ``TOLERANCE_FACTOR`` times the same-dtype reference's
    own error, whichever is larger."""
    cpu = device is not None and torch.device(device).type == "cpu"
    floor = (TOLERANCE_FLOOR_CPU if cpu else TOLERANCE_FLOOR)[dtype]
    return max(floor, TOLERANCE_FACTOR * reference_error)


def worst_error(res: Result, gt: Result) -> float:
    """The largest error of ``res`` as :func:`check` weighs it (row errors divided by ``ROW_FACTOR``):
    what :func:`tolerance` scales when ``res`` is the same-dtype reference's result."""
    return check(res, gt, float("inf"))[1]


def check(res: Result, gt: Result, tol: float) -> Tuple[bool, float, Dict[str, float]]:
    """``(passed, worst error, errors)``: every normwise error in :func:`errors` within ``tol`` and
    every row error within ``ROW_FACTOR * tol``; ``worst`` is the largest error in units of its
    own bound times ``tol`` (so ``passed == worst <= tol``)."""
    errs = errors(res, gt)
    worst = max(v / ROW_FACTOR if k.endswith("_rows") else v for k, v in errs.items())
    return worst <= tol, worst, errs
