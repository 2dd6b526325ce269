"""Reports of a sweep: a table a person can read, JSON / CSV a script can read, PNG charts.

JSON: ``{"machine": {...}, "records": [...]}``.  CSV: ``# key: value`` lines with the machine, then
one header row and one row per record (``pandas.read_csv(path, comment="#")`` reads it).
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata as _md
import json
import math
import os
import platform
import subprocess
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import roofline

FIELDS = ["provider", "objective", "preset", "tokens", "hidden", "vocab", "dtype", "device", "pass", "time_ms",
          "peak_mem_mb", "tflops", "matmul_ratio", "correct", "max_rel_error", "status", "reason", "backend",
          "softcap", "ignored_fraction", "valid_tokens", "speedup_vs_reference", "extra_mem_mb", "grad_mem_mb",
          "tolerance", "check_tokens", "err_loss", "err_dx", "err_dw", "repeats", "cpu_time_ms", "cpu_matmul_ratio",
          "threads", "z_loss", "label_smoothing", "class_weight"]


def _version(dist: str) -> Optional[str]:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, note: str = "", command: str = "") -> Dict[str, object]:
    """Machine, GPU, library versions and git commit (no transformers import: versions come from metadata)."""
    import fused_objectives

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device,
        "gpu": None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy") or _version("cut_cross_entropy"),
        "fused_objectives": fused_objectives.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "command": command,
        "note": note,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    return info


# ---------------------------------------------------------------- table
def _fmt(x, spec: str, empty: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return empty
    return format(x, spec)


def table(records: Sequence[dict], machine: Dict[str, object], wide: bool = False) -> str:
    """The report a person reads: per configuration, one row per provider that ran (its main-pass time,
    the spread of its repeats, ratios to the reference and to the bare GEMMs, extra memory, the check)
    and a verdict; then one line per provider that could not run.  Fits 100 columns; ``wide=True``
    gives every pass, TFLOP/s and peak memory in one row per (configuration, provider) instead."""
    text = wide_table(records, machine) if wide else compact_table(records, machine)
    terms = terms_note(records)
    return text + ("\n" + terms if terms else "")


def terms_note(records: Sequence[dict]) -> str:
    """One line naming the loss terms every provider computed (records of runs before them have none)."""
    found = set()
    for r in records:
        parts = ([f"z_loss={r['z_loss']:g}"] if r.get("z_loss") else [])
        parts += ([f"label_smoothing={r['label_smoothing']:g}"] if r.get("label_smoothing") else [])
        parts += (["class_weight (seeded, in [0.5, 1.5])"] if r.get("class_weight") else [])
        if parts:
            found.add(", ".join(parts))
    if not found:
        return ""
    text = ("loss terms: " + "; ".join(sorted(found)) + " (every provider computes them, checked against float64 "
            "with them; one that cannot is skipped)")
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent="  ", break_on_hyphens=False))


def wide_table(records: Sequence[dict], machine: Dict[str, object]) -> str:
    """One row per (configuration, provider): times of each pass measured, and the checks."""
    passes = [p for p in ("fwd", "bwd", "fwd_bwd") if any(r["pass"] == p for r in records)]
    main = "fwd_bwd" if "fwd_bwd" in passes else passes[-1]
    rows: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        key = (r["preset"], r["tokens"], r["hidden"], r["vocab"], r["dtype"], r["objective"],
               r["ignored_fraction"], r["provider"])
        rows.setdefault(key, {})[r["pass"]] = r
    head = (["preset", "N", "objective", "ign", "provider"] + [f"{p} ms" for p in passes]
            + ["x ref", "x gemm", "cpu x gemm", "TFLOP/s", "peak MB", "extra MB", "check"])
    lines = [head]
    for key, by_pass in rows.items():
        r = by_pass.get(main) or next(iter(by_pass.values()))
        name = r["provider"] + (f" ({r['backend']})" if r["backend"] and r["backend"] not in r["provider"] else "")
        if r["status"] == "skipped":
            check = "skipped: " + r["reason"]
        elif r["status"] == "baseline":
            check = "baseline"
        elif r["status"] == "error":
            check = "ERROR: " + r["reason"]
        elif r["correct"]:
            check = f"ok (err {_fmt(r['max_rel_error'], '.1e')})"
        else:
            check = f"WRONG (err {_fmt(r['max_rel_error'], '.1e')} > {_fmt(r['tolerance'], '.0e')})"
        # GPU rows: the roofline model's prediction beside the measurement (EVIDENCE, issue 10)
        pred = roofline.predict_record(by_pass.get("fwd_bwd", r), machine)
        check += f"; roofline {pred:.1f} ms" if pred is not None else ""
        # time / the reference's time: the same direction as x gemm (lower is faster)
        speed = (_fmt(1 / r["speedup_vs_reference"], ".2f") if r["correct"] and r["speedup_vs_reference"]
                 else ("n/a" if r["status"] == "wrong" else "-"))
        lines.append([r["preset"], str(r["tokens"]), r["objective"], _fmt(r["ignored_fraction"], "g"), name]
                     + [_fmt(by_pass.get(p, {}).get("time_ms"), ".1f") for p in passes]
                     + [speed, _fmt(r["matmul_ratio"], ".2f"), _fmt(r.get("cpu_matmul_ratio"), ".2f"),
                        _fmt(r["tflops"], ".2f"),
                        _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["extra_mem_mb"], ".0f"), check])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    out = []
    for i, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 5 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                   + "  " + row[-1])
        if i == 0:
            out.append("-" * len(out[0]))
    where = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('torch_threads')} threads)"
    notes = [f"machine: {where}; torch {machine.get('torch')}, triton {machine.get('triton')}; "
             f"commit {str(machine.get('git_commit'))[:10]}{' (dirty)' if machine.get('git_dirty') else ''}",
             f"times: median of {records[0]['repeats'] if records else '?'} repeats; x ref = time / reference time "
             f"({main}; only for correct results); x gemm = time / three bare GEMMs (1.0 = physical limit; "
             "both: lower is faster); "
             "cpu x gemm = the same in process CPU time (CPU runs); "
             "TFLOP/s on 6*N_valid*H*V; peak MB = peak memory growth over the inputs, extra MB = peak minus gradients"]
    if machine.get("note"):
        notes.append(f"note: {machine['note']}")
    return "\n".join(out + notes)


WIDTH = 100
_CASE = ("preset", "tokens", "hidden", "vocab", "dtype", "objective", "ignored_fraction")


def main_pass(records: Sequence[dict]) -> str:
    passes = [p for p in ("fwd", "bwd", "fwd_bwd") if any(r["pass"] == p for r in records)]
    return "fwd_bwd" if "fwd_bwd" in passes else (passes[-1] if passes else "fwd_bwd")


def spread(r: dict) -> Optional[float]:
    """Noise of a measurement: (slowest - fastest) / median of its timed repeats; None with < 2."""
    ts = [t for t in (r.get("times_ms") or []) if t is not None]
    if len(ts) < 2 or not r.get("time_ms"):
        return None
    return (max(ts) - min(ts)) / r["time_ms"]


def short_reason(reason: str) -> str:
    """A skip reason in a bench user's terms, on one line."""
    text = (reason or "").strip().splitlines()[0] if reason else ""
    low = text.lower()
    if "cuda" in low and ("need" in low or "requires" in low):
        return "needs a CUDA GPU"
    return text if len(text) <= 80 else text[:77] + "..."


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def _check_cell(r: dict) -> str:
    if r["status"] == "baseline":
        return "baseline"
    if r["status"] == "error":
        return "ERROR (see below)"
    if r["correct"]:
        return f"ok {_fmt(r['max_rel_error'], '.0e')}"
    return f"WRONG {_fmt(r['max_rel_error'], '.0e')}>{_fmt(r['tolerance'], '.0e')}"


def verdict(rows: Sequence[dict]) -> List[str]:
    """Lines that say who wins this configuration, how fused compares, and whether noise decides it."""
    ok = [r for r in rows if r["correct"] and r["time_ms"] and r["provider"] != "bare_gemm"]
    by = {r["provider"]: r for r in rows}
    lines = []
    if not ok:
        return ["verdict: no provider passed the float64 check"]
    fastest = min(ok, key=lambda r: r["time_ms"])
    mem = [r for r in ok if r["extra_mem_mb"] is not None]
    parts = [f"fastest {fastest['provider']} ({fastest['time_ms']:.1f} ms)"]
    if mem:
        lean = min(mem, key=lambda r: r["extra_mem_mb"])
        parts.append(f"leanest {lean['provider']} ({lean['extra_mem_mb']:.0f} MB extra)")
    lines.append("verdict: " + "; ".join(parts))
    fused = next((r for r in rows if r["provider"] == "fused" or r["provider"].startswith("fused-")), None)
    ref, gemm = by.get("reference"), by.get("bare_gemm")
    if fused is not None and not fused["correct"]:
        lines.append(f"  {fused['provider']}: {fused['status'].upper()}, no ratio reported")
    elif fused is not None and fused["time_ms"]:
        bits = []
        if ref is not None and ref["correct"] and ref["time_ms"]:
            bits.append(f"{fused['time_ms'] / ref['time_ms']:.2f}x the reference's time")
            if fused["extra_mem_mb"] is not None and ref["extra_mem_mb"]:
                bits.append(f"{fused['extra_mem_mb'] / ref['extra_mem_mb']:.2f}x its extra memory")
        if gemm is not None and gemm["time_ms"]:
            bits.append(f"{fused['time_ms'] / gemm['time_ms']:.2f}x the bare GEMMs' time")
        if fused.get("cpu_matmul_ratio"):
            bits.append(f"{fused['cpu_matmul_ratio']:.2f}x their process CPU time")
        if bits:
            lines.append(f"  {fused['provider']}: " + ", ".join(bits))
        if ref is not None and ref["correct"] and ref["time_ms"]:
            noise = max([x for x in (spread(fused), spread(ref)) if x is not None], default=None)
            diff = abs(fused["time_ms"] - ref["time_ms"]) / min(fused["time_ms"], ref["time_ms"])
            if noise is not None and noise > diff:
                lines.append(f"  warning: fused and reference differ by {diff:.0%} in time but their repeats "
                             f"spread {noise:.0%}: within noise (a busy machine? more --repeats)")
    return lines


def compact_table(records: Sequence[dict], machine: Dict[str, object]) -> str:
    main = main_pass(records)
    cases: Dict[tuple, List[dict]] = {}
    for r in records:
        if r["pass"] == main:
            cases.setdefault(tuple(r[k] for k in _CASE), []).append(r)
    head = ["provider", f"{main} ms", "spread", "vs ref", "vs gemm", "extra MB", "check"]
    out: List[str] = []
    skipped: Dict[str, str] = {}
    errors: List[str] = []
    for key, rows in cases.items():
        preset, n, h, v, dtype, objective, ignored = key
        ran = [r for r in rows if r["status"] != "skipped"]
        for r in rows:
            if r["status"] == "skipped":
                skipped.setdefault(r["provider"], short_reason(r["reason"]))
            elif r["status"] == "error":
                errors.append(f"  {r['provider']} at {preset} N={n} {objective}: {short_reason(r['reason'])}")
        out.append(f"{preset} N={n} (H {h}, V {v}) {dtype} {objective}, ignored {ignored:g}")
        preds = {id(r): roofline.predict_record(r, machine) for r in ran}
        with_pred = any(v is not None for v in preds.values())
        cells = [head[:-1] + ["roofline ms"] + head[-1:]] if with_pred else [head]
        for r in ran:
            name = r["provider"] + (f" ({r['backend']})" if r["backend"] and r["backend"] not in r["provider"]
                                    else "")
            sp = spread(r)
            speed = (_ratio(1 / r["speedup_vs_reference"]) if r["speedup_vs_reference"] else
                     ("n/a" if r["status"] == "wrong" else "-"))
            cells.append([name, _fmt(r["time_ms"], ".1f"), "-" if sp is None else f"{sp:.0%}", speed,
                          _ratio(r["matmul_ratio"]) if r["status"] != "wrong" else "n/a",
                          _fmt(r["extra_mem_mb"], ".0f"), _check_cell(r)])
            if with_pred:  # EVIDENCE's roofline prediction of this fwd+bwd time (GPU rows only)
                cells[-1].insert(-1, _fmt(preds[id(r)], ".1f"))
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        for i, c in enumerate(cells):
            out.append("  " + "  ".join(x.ljust(w) if j in (0, len(c) - 1) else x.rjust(w)
                                        for j, (x, w) in enumerate(zip(c, widths))).rstrip())
        out += verdict(rows)
        out.append("")
    for name, reason in skipped.items():
        out.append(f"skipped: {name}: {reason}")
    if errors:
        out.append("errors:")
        out += errors
    where = machine.get("gpu") or f"{machine.get('cpu')} ({machine.get('torch_threads')} threads)"
    repeats = sorted({r["repeats"] for r in records if r.get("repeats")})
    out += [f"machine: {where}; torch {machine.get('torch')}; commit {str(machine.get('git_commit'))[:10]}"
            + (" (dirty)" if machine.get("git_dirty") else ""),
            f"{main} ms: median of {'/'.join(map(str, repeats)) or '?'} repeats; spread = (slowest - fastest) / "
            "median; vs ref, vs gemm = time / the reference's, / three bare GEMMs' (lower is faster); "
            "extra MB = peak memory beyond the gradients; check = error vs float64; roofline ms (GPU) = "
            "a prediction, not a measurement. "
            "--wide: every pass, TFLOP/s, peak MB; --json / --csv: everything"]
    if str(machine.get("device", "")).startswith("cpu"):
        out.append("on CPU the fused path is about memory (no [N, V] logits): its time is bounded by the same "
                   "GEMMs as everyone's")
    if machine.get("note"):
        out.append(f"note: {machine['note']}")
    return "\n".join(_wrap(line) for line in out)


def _wrap(line: str, width: int = WIDTH) -> str:
    if len(line) <= width:
        return line
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False))


# ---------------------------------------------------------------- files
def write_json(path: str, machine: Dict[str, object], records: Sequence[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine, "records": list(records)}, f, indent=1, allow_nan=False,
                  default=lambda o: None)
        f.write("\n")


def write_csv(path: str, machine: Dict[str, object], records: Sequence[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        for k, v in machine.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})


def _bars(axes, by_provider: Dict[str, List[dict]], pass_: str, title: str) -> None:
    """Time and extra memory per provider for one token count; wrong results hatched and labelled."""
    names = sorted(by_provider, key=lambda n: (n == "bare_gemm", by_provider[n][0]["time_ms"] or 0))
    recs = [by_provider[n][0] for n in names]
    wrong = [r["provider"] != "bare_gemm" and not r["correct"] for r in recs]
    labels = [n + ("\n(WRONG)" if w else "") for n, w in zip(names, wrong)]
    colors = ["0.35" if n == "bare_gemm" else ("#C44E52" if w else "#4C72B0") for n, w in zip(names, wrong)]
    for ax, key, what in ((axes[0], "time_ms", f"{pass_} time (ms)"),
                          (axes[1], "extra_mem_mb", f"{pass_} memory beyond gradients (MB)")):
        vals = [r[key] if r[key] is not None else 0.0 for r in recs]
        bars = ax.bar(range(len(recs)), vals, color=colors)
        for b, w in zip(bars, wrong):
            if w:
                b.set_hatch("//")
        for i, (v, r) in enumerate(zip(vals, recs)):
            if r[key] is not None:
                ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels(labels, fontsize=7, rotation=20)
        ax.set_ylabel(what)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)


def write_plot(path: str, machine: Dict[str, object], records: Sequence[dict], pass_: str = "fwd_bwd") -> bool:
    """Time and peak memory against tokens, one line per provider, one row of charts per
    (preset, dtype, objective, ignored fraction); bars per provider where a row has one token count.
    False (and nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [r for r in records if r["pass"] == pass_ and r["time_ms"]]
    if not recs:
        recs = [r for r in records if r["time_ms"]]
        pass_ = recs[0]["pass"] if recs else pass_
    groups: Dict[tuple, List[dict]] = {}
    for r in recs:
        if r["pass"] == pass_:
            groups.setdefault((r["preset"], r["dtype"], r["objective"], r["ignored_fraction"]), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n), squeeze=False)
    where = machine.get("gpu") or f"CPU, {machine.get('torch_threads')} threads"
    for row, ((preset, dtype, objective, ignored), rs) in enumerate(sorted(groups.items())):
        by_provider: Dict[str, List[dict]] = {}
        for r in rs:
            by_provider.setdefault(r["provider"], []).append(r)
        if len({r["tokens"] for r in rs}) == 1:  # one N: bars (a line through one point says nothing)
            _bars(axes[row], by_provider, pass_, f"{preset} N={rs[0]['tokens']} {dtype} {objective}, "
                                                 f"ignored {ignored:g}")
            continue
        for name, pts in sorted(by_provider.items()):
            pts = sorted(pts, key=lambda r: r["tokens"])
            wrong = any(not p["correct"] for p in pts if p["provider"] != "bare_gemm")
            style = dict(marker="o", linestyle="--" if (wrong or name == "bare_gemm") else "-",
                         color="black" if name == "bare_gemm" else None)
            label = name + (" (WRONG)" if wrong else "")
            xs = [p["tokens"] for p in pts]
            axes[row][0].plot(xs, [p["time_ms"] for p in pts], label=label, **style)
            mem = [(p["tokens"], p["peak_mem_mb"]) for p in pts if p["peak_mem_mb"] is not None]
            if mem:
                axes[row][1].plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], label=label, **style)
        title = f"{preset} {dtype} {objective}, ignored {ignored:g}"
        for ax, what in ((axes[row][0], f"{pass_} time (ms)"), (axes[row][1], f"{pass_} peak memory growth (MB)")):
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(what)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(f"fused_objectives bench on {where}, commit {str(machine.get('git_commit'))[:10]}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
