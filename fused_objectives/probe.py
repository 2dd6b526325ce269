"""Capability probe: where does a (model, dataset) pair sit on the model-capability continuum?

arXiv 2510.00526 places a pair by the base model's **mean probability of the reference tokens**
(teacher forcing, response tokens and EOS only): math ~0.76-0.81 (prior-leaning objectives such as
``neg_p`` and ``nll_top:0.2`` beat NLL), medical ~0.5 (no clear winner), figfont ~0.01 (NLL wins).
:func:`probe` measures it with a forward pass only: the model's decoder gives the final hidden
states and :func:`fused_objectives.target_logprob` the per-token ``log p`` of the reference tokens,
so the ``[tokens, vocab]`` logits are never materialised on GPU (on CPU the reference backend holds
one bounded ``[chunk, vocab]`` block at a time).

The paper states no selection rule: the recommendation here is a heuristic with explicit
cut-points (:data:`DEFAULT_CUT_POINTS`), always reported with the statistics it was based on.

Python API: :func:`probe` (plus :func:`load_records`, :func:`encode_records`, :func:`make_batches`
to turn JSON Lines or a saved ``datasets`` dataset into batches).  Command line:
``fused-objectives probe`` (:func:`add_arguments` and :func:`run`).  This module imports neither
transformers, datasets, matplotlib nor tqdm until they are needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .functional import target_logprob

__all__ = [
    "probe", "ProbeResult", "recommend", "ANCHORS", "DEFAULT_CUT_POINTS", "PERCENTILES",
    "load_records", "encode_records", "make_batches", "add_arguments", "run", "main",
]

IGNORE_INDEX = -100
PERCENTILES = (5, 10, 25, 50, 75, 90)
# Heuristic cut-points on mean p (ours, not the paper's): <= low -> nll, >= high -> neg_p.
DEFAULT_CUT_POINTS = (0.2, 0.6)
_LOW_P = 0.2  # the paper's main-table threshold (nll_top:0.2); share of tokens below it is reported
_HIST_BINS = 20
# On CPU the reference backend materialises [chunk, V] fp32 logits: bound that block (~256 MB).
_CPU_LOGIT_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Anchor:
    """A dataset of the paper placed on the continuum by its mean p (a range when several models)."""

    name: str
    low: float
    high: float
    finding: str
    mark: str

    @property
    def label(self) -> str:
        span = f"{self.low:g}" if self.low == self.high else f"{self.low:g}-{self.high:g}"
        return f"{self.name} ~{span}"


ANCHORS = (
    Anchor("figfont", 0.01, 0.01, "NLL wins outright (exact match 35.2 vs 0.0 for neg_p, Qwen2.5-7B)", "1"),
    Anchor("medical", 0.5, 0.5, "no clear winner (differences within noise)", "2"),
    Anchor("math", 0.76, 0.81, "prior-leaning objectives win (Qwen2.5-Math-1.5B, 5 benchmarks: "
                               "NLL 17.00, nll_top:0.2 32.04, neg_p 32.75)", "3"),
)


def recommend(mean_p: float, frac_below_0_2: float, cut_points: Sequence[float] = DEFAULT_CUT_POINTS) -> dict:
    """The heuristic recommendation for a pair with this mean p: a dict with ``objective``,
    ``alternatives``, ``zone``, ``rationale``, ``cut_points`` and ``heuristic=True``."""
    low, high = _check_cut_points(cut_points)
    rule = (f"mean p >= {high:g}: neg_p (or nll_top:0.2); mean p <= {low:g}: nll; "
            f"between: no clear winner, nll as the default")
    if mean_p >= high:
        zone, objective, alternatives = "model-strong", "neg_p", ["nll_top:0.2"]
        why = (f"mean p {mean_p:.3f} >= {high:g}: the base model already assigns high probability to the "
               f"reference tokens, like the paper's math data (mean p 0.76-0.81), where prior-leaning "
               f"objectives beat NLL (Qwen2.5-Math-1.5B, 5 benchmarks: NLL 17.00, nll_top:0.2 32.04, "
               f"neg_p 32.75; Qwen2.5-Math-7B: NLL 22.67, nll_top:0.2 38.16, neg_p 36.51, so either is a good "
               f"choice). "
               f"nll_top:0.2 would at first leave out the {frac_below_0_2:.1%} of tokens with p < 0.2.")
    elif mean_p <= low:
        zone, objective, alternatives = "model-weak", "nll", []
        why = (f"mean p {mean_p:.3f} <= {low:g}: the base model gives the reference tokens little "
               f"probability, like the paper's figfont data (mean p ~0.01), where NLL wins outright "
               f"(exact match 35.2 vs 0.0 for neg_p on Qwen2.5-7B); -p and its thresholded variants weight "
               f"a token's gradient by p, so they barely learn the {frac_below_0_2:.1%} of tokens with p < 0.2.")
    else:
        zone, objective, alternatives = "no clear winner", "nll", ["nll_top:0.2", "neg_p"]
        why = (f"{low:g} < mean p {mean_p:.3f} < {high:g}: between the cut-points, like the paper's medical "
               f"data (mean p ~0.5), where the objectives were within noise of each other; nll is the "
               f"conventional default. If you can afford two runs, compare it with nll_top:0.2 on held-out data "
               f"({frac_below_0_2:.1%} of tokens have p < 0.2).")
    return {
        "objective": objective,
        "alternatives": alternatives,
        "zone": zone,
        "rationale": why,
        "heuristic": True,
        "cut_points": {"nll_at_or_below": low, "neg_p_at_or_above": high},
        "rule": rule,
    }


def _check_cut_points(cut_points) -> Tuple[float, float]:
    try:
        low, high = (float(c) for c in cut_points)
    except (TypeError, ValueError):
        raise ValueError(f"cut_points must be two numbers (low, high), got {cut_points!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"cut_points must satisfy 0 <= low < high <= 1, got ({low:g}, {high:g})")
    return low, high


def _continuum(mean_p: float) -> dict:
    def dist(a: Anchor) -> float:
        return 0.0 if a.low <= mean_p <= a.high else min(abs(mean_p - a.low), abs(mean_p - a.high))

    nearest = min(ANCHORS, key=dist)
    return {
        "position": mean_p,
        "nearest_anchor": nearest.name,
        "anchors": [{"name": a.name, "mean_p": [a.low, a.high], "finding": a.finding} for a in ANCHORS],
    }


def _continuum_bar(mean_p: float, width: int = 51) -> str:
    cells = ["."] * width

    def at(x: float) -> int:
        return min(width - 1, max(0, round(x * (width - 1))))

    for a in ANCHORS:
        for i in range(at(a.low), at(a.high) + 1):
            cells[i] = a.mark
    cells[at(mean_p)] = "*"
    return "0 |" + "".join(cells) + "| 1"


@dataclass
class ProbeResult:
    """Statistics of the base model's probability ``p`` of the reference tokens.

    ``probs`` (float32, CPU) holds every scored token's p; every other field is a plain number or
    dict and goes to :meth:`to_dict` / JSON.
    """

    tokens: int
    mean_p: float
    mean_logp: float
    percentiles: Dict[str, float]
    frac_below_0_2: float
    histogram: Dict[str, list]
    continuum: dict
    recommendation: dict
    examples: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)
    probs: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("tokens", "examples", "mean_p", "mean_logp", "percentiles",
                                              "frac_below_0_2", "histogram", "continuum", "recommendation")}
        out.update(self.info)
        return out

    def report(self) -> str:
        """A human-readable report: statistics, histogram, continuum and the labelled recommendation."""
        rec = self.recommendation
        lines = []
        title = "Capability probe"
        if self.info.get("model"):
            title += f": {self.info['model']}"
        if self.info.get("data"):
            title += f" on {self.info['data']}"
        lines.append(title)
        head = f"  tokens scored {self.tokens:,}"
        if self.examples is not None:
            head += f" in {self.examples:,} examples"
        if self.info.get("truncated"):
            head += f" ({self.info['truncated']} truncated at {self.info.get('max_length')} tokens)"
        lines.append(head)
        lines.append(f"  mean p {self.mean_p:.4f}    mean log p {self.mean_logp:.4f}")
        lines.append("  percentiles of p  " + "  ".join(f"{k}%: {v:.3f}" for k, v in self.percentiles.items()))
        lines.append(f"  tokens with p < 0.2: {self.frac_below_0_2:.1%}")
        lines.append("  histogram of p")
        counts, edges = self.histogram["counts"], self.histogram["edges"]
        # two source bins per printed row keep the table short (10 rows of 0.1)
        rows = [(edges[i], edges[min(i + 2, len(edges) - 1)], sum(counts[i:i + 2])) for i in range(0, len(counts), 2)]
        top = max(c for _, _, c in rows) or 1
        for lo, hi, c in rows:
            lines.append(f"    [{lo:.1f}, {hi:.1f}{']' if hi >= 1.0 else ')'} {'#' * round(40 * c / top):<40} "
                         f"{c / max(self.tokens, 1):6.1%}")
        lines.append("  continuum (the paper's anchors; mean p of the reference tokens)")
        lines.append("    " + _continuum_bar(self.mean_p))
        lines.append("    " + "  ".join(f"{a.mark} {a.label}" for a in ANCHORS)
                     + f"  * this pair {self.mean_p:.3f} (nearest: {self.continuum['nearest_anchor']})")
        alt = f" (alternatives: {', '.join(rec['alternatives'])})" if rec["alternatives"] else ""
        lines.append(f"  recommendation [HEURISTIC, not a rule from the paper]: {rec['objective']}{alt}")
        lines.append(f"    zone: {rec['zone']}")
        lines.append(f"    cut-points used: {rec['rule']}")
        lines.append(f"    why: {rec['rationale']}")
        return "\n".join(lines)

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """Write a PNG: the histogram of p and the pair's position on the continuum."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("plotting needs matplotlib: pip install matplotlib") from e
        if self.probs is None:
            raise ValueError("this ProbeResult holds no per-token probabilities to plot")
        p = self.probs.double().numpy()
        low = self.recommendation["cut_points"]["nll_at_or_below"]
        high = self.recommendation["cut_points"]["neg_p_at_or_above"]
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(8, 6), gridspec_kw={"height_ratios": [3, 1]})
        ax.hist(p, bins=50, range=(0.0, 1.0), color="#4C72B0", weights=[1.0 / len(p)] * len(p))
        ax.axvline(self.mean_p, color="black", label=f"mean p {self.mean_p:.3f}")
        ax.axvline(self.percentiles["50"], color="black", ls=":", label=f"median {self.percentiles['50']:.3f}")
        ax.axvline(_LOW_P, color="#C44E52", ls="--", label=f"p = 0.2 ({self.frac_below_0_2:.1%} below)")
        ax.set_xlim(0, 1)
        ax.set_xlabel("p of the reference token")
        ax.set_ylabel("share of tokens")
        ax.legend(loc="upper center")
        ax.set_title(title or f"{self.info.get('model', 'model')}: {self.tokens:,} tokens")
        bx.axvspan(0, low, color="#C44E52", alpha=0.15)
        bx.axvspan(low, high, color="grey", alpha=0.12)
        bx.axvspan(high, 1, color="#55A868", alpha=0.15)
        for a in ANCHORS:
            bx.plot([a.low, a.high], [0.5, 0.5], lw=6, marker="o", ms=7, solid_capstyle="round", color="#8172B2")
            bx.annotate(a.label, ((a.low + a.high) / 2, 0.5), xytext=(0, 8), textcoords="offset points",
                        ha="center", fontsize=8)
        for x0, x1, zone in ((0, low, "nll"), (low, high, "no clear winner"), (high, 1, "neg_p / nll_top:0.2")):
            bx.text((x0 + x1) / 2, 0.92, zone, ha="center", va="top", fontsize=8, color="dimgray")
        bx.plot([self.mean_p], [0.5], marker="v", ms=12, color="black")
        bx.annotate(f"this pair {self.mean_p:.3f}", (self.mean_p, 0.5), xytext=(0, -16),
                    textcoords="offset points", ha="center", fontsize=8)
        bx.set_xlim(0, 1)
        bx.set_ylim(0, 1)
        bx.set_yticks([])
        bx.set_xlabel(f"mean p (heuristic zones: nll <= {low:g} < no clear winner < {high:g} <= neg_p); "
                      f"recommended: {self.recommendation['objective']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# ----------------------------------------------------------------------------------------------
# The model: decoder -> final hidden states -> fused target log-probabilities
# ----------------------------------------------------------------------------------------------

@dataclass
class _Route:
    decoder: Any
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    logit_scale: Optional[float]


def _number(x) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _route(model) -> _Route:
    """Find the decoder, the LM head and the config's logit transforms through public APIs."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):  # PEFT wrappers
        model = model.get_base_model()
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"cannot probe {name}: it is an encoder-decoder model; the probe measures decoder-only "
                         f"causal LMs (the paper's setting)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"cannot probe {name}: it has no LM head (get_output_embeddings() is missing or "
                         f"returned None); the probe needs a causal language model")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"cannot probe {name}: its LM head {type(head).__name__} has no floating [vocab, hidden] "
                         f"weight (quantised heads are not supported)")
    if type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor":
        raise ValueError(f"cannot probe {name}: its LM head weight is a sharded DTensor; probe an unsharded copy")
    bias = getattr(head, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(model, "model", None)
    if decoder is None or not callable(decoder) or decoder is model:
        raise ValueError(f"cannot probe {name}: no decoder found (model.get_decoder() / model.model)")
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    softcap = _number(getattr(text, "final_logit_softcapping", None)) or None  # Gemma-2/3
    scale = _number(getattr(model, "logit_scale", None))  # Cohere keeps it on the model
    if scale is None:
        scale = _number(getattr(text, "logit_scale", None))
    divide = _number(getattr(text, "logits_scaling", None))  # Granite divides the logits
    if divide is not None and divide != 1.0:
        scale = (scale if scale is not None else 1.0) / divide
    if scale == 1.0:
        scale = None
    return _Route(decoder, weight, bias, softcap, scale)


def _hidden(route: _Route, input_ids, attention_mask) -> torch.Tensor:
    out = route.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _verify(model, route: _Route, input_ids: torch.Tensor, attention_mask, backend: str) -> None:
    """Check on a few real tokens that decoder + LM head + transforms reproduce the model's logits,
    so a model family with another head transform is refused instead of silently mismeasured, and
    that the fused log-probabilities agree with the log-softmax of those logits."""
    row = input_ids[0]
    if attention_mask is not None:
        row = row[attention_mask[0].bool()]
    x = row[:32][None]
    out = model(input_ids=x, use_cache=False)
    ref = getattr(out, "logits", None)
    if not isinstance(ref, torch.Tensor):
        warnings.warn(f"{type(model).__name__} returned no logits; the probe could not verify that it "
                      f"reproduces the model's LM head", stacklevel=3)
        return
    hidden = _hidden(route, x, None)[0].to(route.weight.device)
    z = hidden.float() @ route.weight.float().T
    if route.bias is not None:
        z = z + route.bias.float()
    if route.logit_scale is not None:
        z = z * route.logit_scale
    if route.softcap is not None:
        z = route.softcap * torch.tanh(z / route.softcap)
    ref = ref[0].float().to(z.device)
    if ref.shape != z.shape:
        raise ValueError(f"cannot probe {type(model).__name__}: its logits have shape {tuple(ref.shape)}, "
                         f"the decoder + LM head give {tuple(z.shape)}")
    half = route.weight.dtype in (torch.float16, torch.bfloat16)
    tol = (2e-2 if half else 1e-3) * (1.0 + float(ref.abs().max()))
    err = float((z - ref).abs().max())
    if not err <= tol:
        raise ValueError(
            f"cannot probe {type(model).__name__}: decoder + LM head (softcap={route.softcap}, "
            f"logit_scale={route.logit_scale}) do not reproduce the model's own logits (max |diff| {err:.3g} > "
            f"{tol:.3g}); its forward transforms the logits in a way the probe does not know. "
            f"Pass verify=False only if you know the difference is harmless.")
    if x.shape[1] < 2:
        return
    target = x[0, 1:].to(route.weight.device)
    want = torch.log_softmax(z[:-1], dim=-1).gather(-1, target[:, None])[:, 0]
    got = target_logprob(hidden[:-1].to(route.weight.dtype), route.weight, target, route.bias,
                         softcap=route.softcap, logit_scale=route.logit_scale, backend=backend).float()
    err = float((got - want).abs().max())
    if not err <= (2e-2 if half else 1e-4) * (1.0 + float(want.abs().max())):
        raise RuntimeError(
            f"fused_objectives.target_logprob (backend={backend!r}) disagrees with the log-softmax of the model's "
            f"logits by up to {err:.3g} on {target.numel()} tokens; refusing to report its statistics. This is a "
            f"bug in that backend: please report it, and pass backend='reference' meanwhile.")


def _as_tensor(x, name: str, device) -> torch.Tensor:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"batch field {name!r} must have shape [batch, seq], got {tuple(t.shape)}")
    return t.to(device)


def _summarise(logp: torch.Tensor, cut_points, examples: Optional[int], info: dict) -> ProbeResult:
    import numpy as np

    if logp.numel() == 0:
        raise ValueError("no tokens were scored: every label is ignore_index (empty responses, or every "
                         "response truncated away by max_length?)")
    lp = logp.double()
    p = lp.exp()
    p_np = p.numpy()
    pct = np.percentile(p_np, PERCENTILES)
    counts, edges = np.histogram(p_np, bins=_HIST_BINS, range=(0.0, 1.0))
    mean_p = float(p.mean())
    frac = float((p < _LOW_P).double().mean())
    return ProbeResult(
        tokens=int(p.numel()),
        mean_p=mean_p,
        mean_logp=float(lp.mean()),
        percentiles={str(k): float(v) for k, v in zip(PERCENTILES, pct)},
        frac_below_0_2=frac,
        histogram={"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
        continuum=_continuum(mean_p),
        recommendation=recommend(mean_p, frac, cut_points),
        examples=examples,
        info=dict(info),
        probs=p.float(),
    )


def _progress(iterable, enabled: bool, total: Optional[int]):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="probe", unit="batch", file=sys.stderr)


def probe(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    ignore_index: int = IGNORE_INDEX,
    cut_points: Sequence[float] = DEFAULT_CUT_POINTS,
    verify: bool = True,
    progress: bool = False,
    total: Optional[int] = None,
    backend: str = "auto",
    chunk_tokens: Optional[int] = None,
) -> ProbeResult:
    """Measure the base model's probability of the reference tokens: a forward pass only.

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM``, possibly wrapped by PEFT or patched by
            :func:`fused_objectives.patch_model`); its decoder and LM head are used directly, with
            the config's ``final_logit_softcapping`` / ``logit_scale`` / ``logits_scaling``.
        batches: iterable of mappings with ``input_ids`` ``[B, T]``, optional ``attention_mask``
            and ``labels`` (Hugging Face layout: same shape as ``input_ids``, ``ignore_index`` where
            not scored; the token at ``t`` is scored from position ``t - 1``).  Without ``labels``
            every attended token but the first is scored.  :func:`make_batches` builds them.
        cut_points: ``(low, high)`` heuristic cut-points on mean p for the recommendation.
        verify: first check on up to 32 tokens that decoder + LM head reproduce ``model(...).logits``
            (a model whose forward transforms logits otherwise is refused with a ``ValueError``) and
            that ``target_logprob`` agrees with their log-softmax (else ``RuntimeError``).
        progress: show a tqdm progress bar (``total`` batches, when known).
        backend: passed to :func:`fused_objectives.target_logprob`.
        chunk_tokens: tokens per ``target_logprob`` call; default all of a batch on GPU and a
            bounded block on CPU (where the reference backend materialises that block's logits).

    Returns a :class:`ProbeResult`: the mean p over all scored tokens equals
    ``softmax(model(input_ids).logits)`` at the shifted labels, averaged over the same tokens.
    """
    _check_cut_points(cut_points)
    route = _route(model)
    weight = route.weight
    if chunk_tokens is None and weight.device.type != "cuda":
        chunk_tokens = max(1, _CPU_LOGIT_ELEMENTS // weight.shape[0])
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    try:
        total = total if total is not None else len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    in_device = weight.device
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and isinstance(getattr(embed, "weight", None), torch.Tensor):
        in_device = embed.weight.device

    was_training = getattr(model, "training", False)
    model.eval()
    logps: List[torch.Tensor] = []
    n_batches = 0
    try:
        with torch.no_grad():
            for b, batch in enumerate(_progress(batches, progress, total)):
                if not isinstance(batch, Mapping) or "input_ids" not in batch:
                    raise ValueError(f"batch {b}: expected a mapping with 'input_ids' (and optionally "
                                     f"'attention_mask', 'labels'), got {type(batch).__name__}")
                ids = _as_tensor(batch["input_ids"], "input_ids", in_device).long()
                mask = _as_tensor(batch.get("attention_mask"), "attention_mask", in_device)
                labels = _as_tensor(batch.get("labels"), "labels", in_device)
                if labels is None:
                    labels = ids.masked_fill(mask == 0, ignore_index) if mask is not None else ids
                for name, t in (("attention_mask", mask), ("labels", labels)):
                    if t is not None and t.shape != ids.shape:
                        raise ValueError(f"batch {b}: {name} shape {tuple(t.shape)} differs from "
                                         f"input_ids shape {tuple(ids.shape)}")
                if verify and n_batches == 0:
                    _verify(model, route, ids, mask, backend)
                n_batches += 1
                hidden = _hidden(route, ids, mask)
                # hidden[:, t] predicts labels[:, t + 1]; score only those positions, before any GEMM
                target = labels[:, 1:].long()
                keep = target != ignore_index
                if mask is not None:
                    keep &= mask[:, 1:].bool()
                h = hidden[:, :-1][keep].to(weight.device)
                t = target[keep].to(weight.device)
                if h.dtype != weight.dtype:
                    h = h.to(weight.dtype)
                step = chunk_tokens or max(1, t.numel())
                for s in range(0, t.numel(), step):
                    lp = target_logprob(h[s:s + step], weight, t[s:s + step], route.bias,
                                        ignore_index=ignore_index, softcap=route.softcap,
                                        logit_scale=route.logit_scale, backend=backend)
                    logps.append(lp.float().cpu())
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("no batches to probe: the data is empty")
    logp = torch.cat(logps) if logps else torch.empty(0)
    return _summarise(logp, cut_points, None, {"batches": n_batches})


# ----------------------------------------------------------------------------------------------
# Data: JSON Lines or a saved `datasets` dataset -> token ids and labels -> padded batches
# ----------------------------------------------------------------------------------------------

def load_records(path: str, *, split: Optional[str] = None, limit: Optional[int] = None) -> List[Tuple[str, dict]]:
    """Read ``(where, record)`` pairs: ``where`` names the source line (JSON Lines, 1-based, blank
    lines skipped) or row (a dataset saved with ``datasets.save_to_disk``, 0-based)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        return _load_saved_dataset(path, split, limit)
    records: List[Tuple[str, dict]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: line {lineno} is not UTF-8 text; expected JSON Lines "
                                 f"(one JSON object per line) or a directory saved with datasets") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ""
                if lineno == 1 and line.lstrip().startswith("["):
                    hint = " (the file looks like one JSON array; write one object per line instead)"
                elif line.strip() in ("{", "["):
                    hint = " (the file looks like pretty-printed JSON; write one object per line instead)"
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                                 f"expected JSON Lines, one JSON object per line{hint}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno} holds a JSON {type(rec).__name__}, expected an object "
                                 f"with the prompt/response or messages fields")
            records.append((f"{path}: line {lineno}", rec))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def _load_saved_dataset(path: str, split: Optional[str], limit: Optional[int]) -> List[Tuple[str, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a saved dataset directory needs the datasets package: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path!r} is a directory but not a dataset saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) == 1 or "train" in names:
                split = "train" if "train" in names else names[0]
            else:
                raise ValueError(f"{path}: the dataset has splits {names}; choose one with --split")
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; the dataset has splits {names}")
        ds, where = ds[split], f"{path} [{split}]"
    else:
        where = path
    n = len(ds) if limit is None else min(limit, len(ds))
    records = [(f"{where}: row {i}", dict(ds[i])) for i in range(n)]
    if not records:
        raise ValueError(f"{where}: no records (the dataset is empty)")
    return records


@dataclass
class Encoded:
    """One example: token ids, labels (``-100`` where not scored) and whether it was truncated."""

    input_ids: List[int]
    labels: List[int]
    truncated: bool = False
    where: str = ""


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    return record[name]


def _text_field(record: dict, name: str, where: str, *, allow_empty: bool) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty: there is nothing to score")
    return value


def _ids(tokenizer, text: str, *, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(tokenizer, record, where, prompt_field, response_field):
    prompt = _text_field(record, prompt_field, where, allow_empty=True)
    response = _text_field(record, response_field, where, allow_empty=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: the probe scores the response followed by EOS")
    prompt_ids = _ids(tokenizer, prompt, special=True)
    response_ids = _ids(tokenizer, response, special=False) + [eos]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _check_messages(messages, where, field_name):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {field_name!r} must be a non-empty list of {{'role', 'content'}} "
                         f"messages, got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {field_name}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {field_name}[{i}]['content'] must be a string, got "
                             f"{type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: {field_name}[{i}] is an assistant turn with empty content: "
                             f"there is nothing to score")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: field {field_name!r} has no assistant turn: there is nothing to score")


def _encode_chat(tokenizer, record, where, messages_field):
    """Render the conversation with the chat template, prefix by prefix: the text each assistant
    turn adds after the generation prompt (its content and end-of-turn tokens) is scored."""
    messages = _field(record, messages_field, where)
    _check_messages(messages, where, messages_field)

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja2 TemplateError, or a template's own raise_exception(...)
            raise ValueError(f"{where}: the chat template cannot render the first {len(msgs)} messages "
                             f"({type(e).__name__}: {e})") from None

    segments: List[Tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before) or len(upto) == len(before):
            raise ValueError(f"{where}: the tokenizer's chat template does not render this conversation prefix "
                             f"by prefix at message {i}, so the assistant tokens cannot be located")
        segments.append((before[len(done):], False))
        segments.append((upto[len(before):], True))
        done = upto
    ids: List[int] = []
    labels: List[int] = []
    for text, scored in segments:
        if not text:
            continue
        piece = _ids(tokenizer, text, special=False)
        ids += piece
        labels += piece if scored else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_records(
    tokenizer,
    records: Iterable[Tuple[str, dict]],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: Optional[str] = None,
    max_length: Optional[int] = None,
) -> List[Encoded]:
    """Token ids and labels for each record.

    Without ``messages_field``: ``tokenizer(prompt).input_ids`` (special tokens as the tokenizer
    adds them), then ``tokenizer(response, add_special_tokens=False).input_ids + [eos]``; only the
    response tokens and EOS are labelled.  With ``messages_field``: the chat template renders the
    conversation and the assistant turns are labelled.  Sequences longer than ``max_length`` are
    truncated on the right.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token and one scored token), got {max_length}")
    if messages_field is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--messages-field needs a tokenizer with a chat template; {type(tokenizer).__name__} "
                         f"has none (use --prompt-field/--response-field instead)")
    out = []
    for where, rec in records:
        if messages_field is not None:
            ids, labels = _encode_chat(tokenizer, rec, where, messages_field)
        else:
            ids, labels = _encode_pair(tokenizer, rec, where, prompt_field, response_field)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Encoded(ids, labels, truncated, where))
    return out


def make_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int, *, sort: bool = True) -> List[dict]:
    """Right-padded batches of ``input_ids``, ``attention_mask``, ``labels`` (int64 tensors).

    ``sort=True`` groups examples of similar length (longest first, so an out-of-memory shows at
    once); the statistics do not depend on the order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids)) if sort else range(len(encoded))
    order = list(order)
    batches = []
    for s in range(0, len(order), batch_size):
        group = [encoded[i] for i in order[s:s + batch_size]]
        T = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        labels = torch.full((len(group), T), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(group):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


# ----------------------------------------------------------------------------------------------
# Command line: fused-objectives probe
# ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand's arguments to ``parser``."""
    parser.add_argument("--model", required=True, help="model directory or Hugging Face name (causal LM)")
    parser.add_argument("--data", required=True,
                        help="JSON Lines file, or a directory saved with datasets' save_to_disk")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: --model)")
    parser.add_argument("--prompt-field", default="prompt", help="prompt field (default: prompt)")
    parser.add_argument("--response-field", default="response", help="response field (default: response)")
    parser.add_argument("--messages-field", default=None,
                        help="conversation field (list of {role, content}); renders it with the chat template "
                             "and scores the assistant turns, instead of the prompt/response fields")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: train)")
    parser.add_argument("--max-length", type=int, default=4096, help="truncate sequences to N tokens (default 4096)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="probe only the first K examples")
    parser.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG histogram and continuum chart")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="model dtype (auto: the checkpoint's dtype on GPU, float32 on CPU)")
    parser.add_argument("--cut-points", type=float, nargs=2, default=list(DEFAULT_CUT_POINTS),
                        metavar=("LOW", "HIGH"),
                        help="heuristic cut-points on mean p: <= LOW recommends nll, >= HIGH neg_p "
                             f"(default {DEFAULT_CUT_POINTS[0]:g} {DEFAULT_CUT_POINTS[1]:g})")
    parser.add_argument("--backend", default="auto", help="fused_objectives backend (auto, triton, cpu, reference)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (transformers)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _load_tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing tokenizer
        raise ValueError(f"could not load a tokenizer from {source!r} ({type(e).__name__}: {e}); the probe needs "
                         f"the model's tokenizer: save it with the model or pass --tokenizer PATH") from None
    if isinstance(tok, bool) or not callable(tok):
        raise ValueError(f"{source!r} gave no usable tokenizer ({type(tok).__name__})")
    return tok


def _load_model(source: str, device: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = "auto" if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ValueError(f"could not load a causal LM from {source!r} ({type(e).__name__}: {e})") from None
    return model.to(device)


def run(args: argparse.Namespace) -> int:
    """Run ``fused-objectives probe``: print the report, optionally write JSON and a PNG; 0 on success,
    2 on bad input (the message names the file, line or field)."""
    try:
        return _run(args)
    except ValueError as e:
        print(f"fused-objectives probe: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    for name in ("max_length", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    tokenizer = _load_tokenizer(args.tokenizer or args.model, args.trust_remote_code)
    records = load_records(args.data, split=args.split, limit=args.limit)
    encoded = encode_records(tokenizer, records, prompt_field=args.prompt_field, response_field=args.response_field,
                             messages_field=args.messages_field, max_length=args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = make_batches(encoded, args.batch_size, pad if pad is not None else 0)
    model = _load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None:
        for e in encoded:
            lo, hi = min(e.input_ids), max(e.input_ids)
            if lo < 0 or hi >= vocab:
                raise ValueError(f"{e.where}: token id {hi if hi >= vocab else lo} is outside the model's "
                                 f"vocabulary [0, {vocab}): the tokenizer and the model do not match")
    result = probe(model, batches, cut_points=args.cut_points, progress=not args.no_progress, backend=args.backend)
    result.examples = len(encoded)
    result.info.update({
        "model": args.model, "data": args.data, "max_length": args.max_length,
        "truncated": sum(e.truncated for e in encoded),
        "mode": "messages" if args.messages_field else "prompt/response",
        "device": str(next(model.parameters()).device), "backend": args.backend,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    })
    print(result.report())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fused-objectives probe`` as a function (the console script's subcommand calls :func:`run`)."""
    parser = add_arguments(argparse.ArgumentParser(prog="fused-objectives probe", description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))
