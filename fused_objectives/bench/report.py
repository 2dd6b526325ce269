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
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import roofline

FIELDS = ["provider", "objective", "preset", "tokens", "hidden", "vocab", "dtype", "device", "pass", "time_ms",
          "peak_mem_mb", "tflops", "matmul_ratio", "correct", "max_rel_error", "status", "reason", "backend",
          "softcap", "ignored_fraction", "valid_tokens", "speedup_vs_reference", "extra_mem_mb", "grad_mem_mb",
          "tolerance", "check_tokens", "err_loss", "err_dx", "err_dw", "repeats"]


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


def table(records: Sequence[dict], machine: Dict[str, object]) -> str:
    """One row per (configuration, provider): times of each pass measured, and the checks."""
    passes = [p for p in ("fwd", "bwd", "fwd_bwd") if any(r["pass"] == p for r in records)]
    main = "fwd_bwd" if "fwd_bwd" in passes else passes[-1]
    rows: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        key = (r["preset"], r["tokens"], r["hidden"], r["vocab"], r["dtype"], r["objective"],
               r["ignored_fraction"], r["provider"])
        rows.setdefault(key, {})[r["pass"]] = r
    head = (["preset", "N", "objective", "ign", "provider"] + [f"{p} ms" for p in passes]
            + [f"x ref", "x gemm", "TFLOP/s", "peak MB", "extra MB", "check"])
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
        speed = _fmt(r["speedup_vs_reference"], ".2f") if r["correct"] else ("n/a" if r["status"] == "wrong" else "-")
        lines.append([r["preset"], str(r["tokens"]), r["objective"], _fmt(r["ignored_fraction"], "g"), name]
                     + [_fmt(by_pass.get(p, {}).get("time_ms"), ".1f") for p in passes]
                     + [speed, _fmt(r["matmul_ratio"], ".2f"), _fmt(r["tflops"], ".2f"),
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
             f"times: median of {records[0]['repeats'] if records else '?'} repeats; x ref = reference time / time "
             f"({main}; only for correct results); x gemm = time / three bare GEMMs (1.0 = physical limit); "
             "TFLOP/s on 6*N_valid*H*V; peak MB = peak memory growth over the inputs, extra MB = peak minus gradients"]
    if machine.get("note"):
        notes.append(f"note: {machine['note']}")
    return "\n".join(out + notes)


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


def write_plot(path: str, machine: Dict[str, object], records: Sequence[dict], pass_: str = "fwd_bwd") -> bool:
    """Time and peak memory against tokens, one line per provider, one row of charts per
    (preset, dtype, objective, ignored fraction).  False (and nothing written) without matplotlib."""
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
