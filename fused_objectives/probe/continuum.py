"""The capability continuum: the paper's anchors, the heuristic cut-points and the recommendation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple


# Heuristic cut-points on mean p (ours, not the paper's): <= low -> nll, >= high -> neg_p.
DEFAULT_CUT_POINTS = (0.2, 0.6)


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
