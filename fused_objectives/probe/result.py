"""The probe's result: statistics of p over the scored tokens (``summarise``), its report, JSON and plot."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from .continuum import ANCHORS, _continuum, _continuum_bar, recommend

PERCENTILES = (5, 10, 25, 50, 75, 90)
_LOW_P = 0.2  # the paper's main-table threshold (nll_top:0.2); share of tokens below it is reported
_HIST_BINS = 20


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


def summarise(logp: torch.Tensor, cut_points, examples: Optional[int], info: dict) -> ProbeResult:
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
