"""Short summary of a ``fused-objectives bench`` JSON: fwd+bwd times per provider, and the project's
GPU performance goals checked on the recorded numbers.

    python benchmarks/summarize.py RESULTS.json [--markdown] [--goal-tokens 8192]

Goals (at the goal token count, fwd+bwd, per objective): ``fused`` within 1.15x of the three bare
GEMMs; at least 3x faster than Liger; peak extra memory (peak minus gradients) at most 2% of the
reference's; with 50% ignored tokens at most 0.6x its own all-valid time.  A goal whose inputs are
missing (provider skipped, wrong or not run) reads ``n/a``; a wrong ``fused`` fails every goal.  The
goals are set for a GPU: on a CPU run the values are shown with the verdict ``(GPU goal)``, not PASS/FAIL.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Tuple

PASS = "fwd_bwd"


def _index(records: List[dict]) -> Dict[Tuple, dict]:
    return {(r["preset"], r["tokens"], r["objective"], r["ignored_fraction"], r["provider"]): r
            for r in records if r["pass"] == PASS}


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return ""
    if r["status"] == "skipped":
        return "skipped"
    if r["status"] == "error":
        return "error"
    if r["time_ms"] is None:
        return "-"
    t = f"{r['time_ms']:.1f}"
    return t if r["status"] in ("ok", "baseline") else f"{t} WRONG"


def table(data: dict, markdown: bool = False) -> str:
    recs = [r for r in data["records"] if r["pass"] == PASS]
    providers = []
    for r in recs:
        if r["provider"] not in providers and r["status"] != "skipped":
            providers.append(r["provider"])
    idx = _index(recs)
    keys = sorted({(r["preset"], r["tokens"], r["objective"], r["ignored_fraction"]) for r in recs})
    head = ["preset", "N", "objective", "ignored"] + [f"{p} ms" for p in providers]
    rows = [[k[0], str(k[1]), k[2], f"{k[3]:g}"] + [_cell(idx.get(k + (p,))) for p in providers] for k in keys]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows])


def goals(data: dict, goal_tokens: int = 8192) -> List[Tuple[str, str, str]]:
    """``(goal, value, verdict)`` rows; verdict PASS, FAIL or n/a."""
    recs = [r for r in data["records"] if r["pass"] == PASS]
    idx = _index(recs)
    out = []
    for preset, objective in sorted({(r["preset"], r["objective"]) for r in recs}):
        ns = sorted({r["tokens"] for r in recs if r["preset"] == preset})
        n = goal_tokens if goal_tokens in ns else ns[-1]
        get = lambda prov, ign=0.0: idx.get((preset, n, objective, ign, prov))  # noqa: E731
        fused, gemm, liger, ref, half = get("fused"), get("bare_gemm"), get("liger"), get("reference"), get("fused", 0.5)
        ok = lambda r: r is not None and r["status"] == "ok" and r["time_ms"]  # noqa: E731
        where = f"{preset} N={n} {objective}"

        def row(name, value, limit, better_low=True, needs=()):
            if fused is not None and fused["status"] in ("wrong", "error"):
                out.append((f"{where}: {name}", "fused is " + fused["status"], "FAIL"))
            elif value is None or not all(needs):
                out.append((f"{where}: {name}", "missing", "n/a"))
            else:
                good = value <= limit if better_low else value >= limit
                out.append((f"{where}: {name}", f"{value:.3g}", "PASS" if good else "FAIL"))

        row("fused / bare GEMMs <= 1.15", fused["time_ms"] / gemm["time_ms"] if ok(fused) and gemm else None, 1.15,
            needs=(ok(fused), gemm))
        row("liger / fused >= 3", liger["time_ms"] / fused["time_ms"] if ok(fused) and ok(liger) else None, 3.0,
            better_low=False)
        mem = (fused["extra_mem_mb"] / ref["extra_mem_mb"]
               if ok(fused) and ok(ref) and fused["extra_mem_mb"] is not None and ref["extra_mem_mb"] else None)
        row("fused extra memory / reference's <= 0.02", mem, 0.02)
        row("fused 50% ignored / all valid <= 0.6",
            half["time_ms"] / fused["time_ms"] if ok(fused) and ok(half) else None, 0.6)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a results JSON written by fused-objectives bench --json")
    ap.add_argument("--markdown", action="store_true", help="Markdown table (for the README)")
    ap.add_argument("--goal-tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    m = data["machine"]
    where = m.get("gpu") or f"{m.get('cpu')}, {m.get('torch_threads')} threads"
    print(f"{args.json}: {where}; torch {m.get('torch')}, triton {m.get('triton')}, "
          f"commit {str(m.get('git_commit'))[:10]}; fwd+bwd median ms")
    print(table(data, args.markdown))
    rows = goals(data, args.goal_tokens)
    if rows:
        gpu = bool(m.get("gpu"))
        print("\nperformance goals" + (":" if gpu else " (set for a GPU run; this is a CPU run, so the values are "
                                      "shown for reference and not judged):"))
        w = max(len(r[0]) for r in rows)
        for name, value, verdict in rows:
            print(f"  {name.ljust(w)}  {value:>14}  {verdict if gpu or verdict == 'n/a' else '(GPU goal)'}")
    skipped = sorted({(r["provider"], r["reason"]) for r in data["records"] if r["status"] == "skipped"})
    from fused_objectives.bench.report import short_reason

    for prov in sorted({p for p, _ in skipped}):
        print(f"skipped {prov}: {short_reason(next(r for p, r in skipped if p == prov))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
