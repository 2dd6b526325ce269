#!/usr/bin/env python
"""Mutation check: plant small bugs one at a time in a scratch copy of the repository and report
which ones the test suite catches.  Not part of the default suite; run it before a release:

    .venv/bin/python scripts/mutation_check.py                   # every mutant
    .venv/bin/python scripts/mutation_check.py --only kept-count softcap-cpp --markdown out.md
    .venv/bin/python scripts/mutation_check.py --list

Each mutant is ``(file, exact original snippet, replacement)`` plus the tests that should catch it:
a targeted subset of the default suite (so "caught" here means caught by the default suite too),
run with ``pytest -x -p no:xdist``.  The scratch copy (tracked and untracked files of the working
tree, without .git and .venv) is imported through PYTHONPATH ahead of the editable install; the
script checks that before it starts.  C++ mutants rebuild the CPU extension into a scratch
TORCH_EXTENSIONS_DIR (about a minute each on 2 cores).  A snippet that no longer exists (the code
moved on) is reported as "snippet not found", never silently skipped.  Before the mutants, the
unmutated copy runs each distinct test selection once: a selection that fails unmutated would
"catch" everything, so its mutants are reported as "baseline fails".
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: Tuple[str, ...]  # pytest arguments (paths, -k expressions)
    why: str
    count: Optional[int] = None  # expected occurrences of the snippet (None: at least one); all are replaced


T_PATHS = "tests/test_paths.py"
T_FUNC = "tests/test_functional.py"
T_OBJ = "tests/test_objectives.py"
T_PREC = "tests/test_precision.py"
T_TERMS = "tests/test_loss_terms.py"
T_BENCH_GATE = "tests/test_bench.py::test_gate_rejects_planted_bugs"
T_BENCH_TRUTH = "tests/test_bench.py::test_gate_truth_covers_every_token_and_matches_the_test_truth"

MUTANTS: List[Mutant] = [
    # --- the list (issue 9) ---
    Mutant("kept-count", "fused_objectives/functional.py",
           'valid.sum() if normalize == "valid" else kept.sum()', "valid.sum()",
           (T_PATHS, "-k", "gate-kept"), 'normalize="kept" divides by the valid count'),
    Mutant("softcap-cpp-backward", "csrc/fused_objectives_cpu.cpp",
           "if (kCap) d *= 1.0f - t * t;", "if (kCap) d *= 1.0f - 0.5f * t * t;",
           (T_PATHS, "-k", "cpu and softcap"), "C++ backward soft-cap derivative 1 - 0.5 t^2", count=2),
    Mutant("triton-1-p-recomputed", "fused_objectives/kernels/backward.py",
           "one_minus_p[:, None], -p)", "1.0 - p, -p)",
           (T_PREC, "-k", "triton_fused"), "Triton backward takes 1 - p from the recomputed tile"),
    Mutant("cpp-merge-constant", "csrc/fused_objectives_cpu.cpp",
           "(st.rest[i] + 1.0f) * std::exp(m_old - m_new)", "st.rest[i] * std::exp(m_old - m_new)",
           (T_PATHS, "-k", "cpu and merges"), "C++ forward drops the old argmax's term when the max moves"),
    Mutant("chunked-total-assign", "fused_objectives/backends/chunked.py",
           "total += tot", "total = tot",
           (T_PATHS, "-k", "cpu and merges and scalar"), "gradient-in-forward keeps only the last chunk's loss"),
    # --- more of the same kinds ---
    Mutant("triton-merge-constant", "fused_objectives/kernels/forward.py",
           "rest = tl.where(new_max, (rest + 1.0) * tl.exp(m - m_new), rest)",
           "rest = tl.where(new_max, rest * tl.exp(m - m_new), rest)",
           (T_PATHS, "-k", "triton and nograd"), "Triton forward drops the old argmax's term on a new max"),
    Mutant("triton-split-merge", "fused_objectives/kernels/forward.py",
           "(rest + 1.0) * torch.exp(m - m_all[None, :])", "rest * torch.exp(m - m_all[None, :])",
           (T_PATHS, "-k", "triton and default and nograd"), "launcher's vocabulary-split merge constant"),
    Mutant("chunked-last-chunk-dropped", "fused_objectives/backends/chunked.py",
           "for start in range(0, n_act, rows):", "for start in range(0, n_act - rows + 1, rows):",
           (T_PATHS, "-k", "cpu and merges and scalar"), "gradient-in-forward skips a partial last chunk"),
    Mutant("triton-chunked-total-assign", "fused_objectives/backends/triton_chunked.py",
           "total += tot", "total = tot",
           (T_PATHS, "-k", "triton_chunked and merges and scalar"), "chunked Triton keeps only the last chunk's loss"),
    Mutant("triton-rows-lane-merge", "fused_objectives/kernels/rows.py",
           "tl.where(new_max, (lane_rest + 1.0) * e, lane_rest + e)", "tl.where(new_max, lane_rest * e, lane_rest + e)",
           (T_PATHS, "-k", "triton_chunked and nograd"), "row-statistics kernel's per-lane online merge constant"),
    Mutant("triton-rows-cross-lane-merge", "fused_objectives/kernels/rows.py",
           "(lane_rest + 1.0) * tl.exp(lane_m - m[:, None])", "lane_rest * tl.exp(lane_m - m[:, None])",
           (T_PATHS, "-k", "triton_chunked and nograd"), "row-statistics kernel's merge of its lanes"),
    Mutant("triton-rows-softcap-derivative", "fused_objectives/kernels/rows.py",
           "g = g * dcap", "g = g",
           (T_PATHS, "-k", "triton_chunked and softcap"), "chunked Triton dz forgets the soft-cap derivative"),
    Mutant("triton-rows-1-p-recomputed", "fused_objectives/kernels/rows.py",
           "omp[:, None], -p)", "1.0 - p, -p)",
           (T_PREC, "-k", "triton_chunked"), "chunked Triton dz takes 1 - p from the recomputed row"),
    Mutant("cpp-scale-backward", "csrc/fused_objectives_cpu.cpp",
           "float d = kScale ? tr.scale : 1.0f;", "float d = 1.0f;",
           (T_PATHS, "-k", "cpu and scale and (per_token or logprob)"), "C++ backward forgets the logit scale",
           count=2),
    Mutant("cpp-log1p", "csrc/fused_objectives_cpu.cpp",
           "at::Tensor log_norm = rest.log1p();", "at::Tensor log_norm = (rest + 1.0f).log();",
           (T_PREC, "-k", "cpu"), "C++ forward loses log1p: confident tokens' log p rounds to 0", count=2),
    Mutant("cpp-bias-grad-overwrite", "csrc/fused_objectives_cpu.cpp",
           "db[j] += to_f(gr[j]);", "db[j] = to_f(gr[j]);",
           (T_PATHS, "-k", "cpu and merges and bias"), "C++ bias gradient keeps only the last token chunk"),
    Mutant("cpp-scatter-rows-overwrite", "csrc/fused_objectives_cpu.cpp",
           "d[h] += to_f(s[h]);", "d[h] = to_f(s[h]);",
           (T_PATHS, "-k", "cpu and merges and gate-kept and per_token"),
           "C++ dX of gathered tokens keeps only the last vocabulary chunk"),
    Mutant("triton-scale-backward", "fused_objectives/kernels/backward.py",
           "g = g * logit_scale", "g = g",
           (T_PATHS, "-k", "triton and scale and per_token"), "Triton backward forgets the logit scale"),
    Mutant("shift-direction", "fused_objectives/functional.py",
           "target = torch.cat([target[..., 1:], pad], dim=-1)", "target = torch.cat([pad, target[..., :-1]], dim=-1)",
           (T_PATHS, "-k", "scale-shift and nograd"), "shift predicts the previous token"),
    Mutant("num-items-off-by-one", "fused_objectives/functional.py",
           "return torch.tensor(float(num_items_in_batch), dtype=torch.float64, device=device)",
           "return torch.tensor(float(num_items_in_batch) + 1, dtype=torch.float64, device=device)",
           (T_FUNC, "-k", "num_items"), "num_items_in_batch denominator off by one"),
    Mutant("gate-exclusive", "fused_objectives/objectives.py",
           "return p >= t", "return p > t",
           (T_OBJ,), "the top gate is no longer inclusive"),
    Mutant("unlikelihood-eps", "fused_objectives/objectives.py",
           "torch.log(_one_minus_exp(logp) + 1e-3)", "torch.log(_one_minus_exp(logp) + 1e-2)",
           (T_OBJ,), "unlikelihood's 1e-3 changed"),
    Mutant("dft-no-stopgrad", "fused_objectives/objectives.py",
           "-logp.detach().exp() * logp", "-logp.exp() * logp",
           (T_OBJ,), "dft's weight gets a gradient"),
    Mutant("reference-softcap-dropped", "fused_objectives/backends/reference.py",
           "z = opts.softcap * torch.tanh(z / opts.softcap)", "z = z",
           (T_FUNC, "-k", "reference and transforms"), "reference backend ignores the soft-cap"),
    Mutant("bench-gate-normwise-only", "fused_objectives/bench/inputs.py",
           '"dx_rows": _rowwise(res.dx, gt.dx), "dw_rows": _rowwise(res.dw, gt.dw)}', "}",
           (T_BENCH_GATE,), "bench gate checks norms only: one wrong chunk hides below the tolerance"),
    # --- loss terms (issue 14) ---
    Mutant("smoothing-sign", "fused_objectives/autograd.py",
           "smooth = (eps / vocab) * (dot_sum * lse - dotz)", "smooth = (eps / vocab) * (dot_sum * lse + dotz)",
           (T_TERMS, "-k", "reference and smooth"), "label smoothing adds u.z instead of subtracting it"),
    Mutant("zloss-kept-denominator", "fused_objectives/functional.py",
           "            z_denom = valid.sum()\n", "            z_denom = count\n",
           (T_TERMS, "-k", "reference and valid_tokens_whatever"),
           "z-loss mean over the kept count with normalize='kept' (it is on valid tokens)"),
    Mutant("zloss-weighted-denominator", "fused_objectives/functional.py",
           ".sum()\n            else:\n                denom = count\n",
           ".sum()\n                z_denom = denom\n            else:\n                denom = count\n",
           (T_TERMS, "-k", "reference and all and mean"), "z-loss divided by the objective's denominator"),
    Mutant("per-token-drops-dlse", "fused_objectives/autograd.py",
           "        elif g_lse is not None:", "        elif False:",
           (T_TERMS, "-k", "cpu and zloss and none"), "per-token backward drops the z-loss coefficient on p"),
    Mutant("class-weight-smoothing-unweighted", "fused_objectives/autograd.py",
           "        return terms.class_weight.detach().to(device=device, dtype=dtype).contiguous()",
           "        return torch.ones(vocab, dtype=dtype, device=device)",
           (T_TERMS, "-k", "cpu and all and sum"), "smoothing ignores the class weights"),
    Mutant("triton-rows-dot-term", "fused_objectives/kernels/rows.py",
           "g = g + cg[:, None] * u[None, :]", "g = g",
           (T_TERMS, "-k", "triton_chunked and smooth"), "chunked Triton dz drops the g u (smoothing) term"),
    Mutant("triton-fused-lse-term", "fused_objectives/kernels/backward.py",
           "(coef_b - coef)[:, None] * p)", "-coef[:, None] * p)",
           (T_TERMS, "-k", "triton_fused and zloss and none"), "fused Triton backward drops b p off the target"),
    Mutant("cpp-lse-term-target", "csrc/fused_objectives_cpu.cpp",
           "if (cf.b != nullptr) v += bc * std::exp(logp[r]);", "",
           (T_TERMS, "-k", "cpu and zloss"), "C++ dz drops b p at the target column"),
    Mutant("bench-truth-first-chunk", "fused_objectives/bench/inputs.py",
           "for start in range(0, idx_all.numel(), rows):", "for start in range(0, min(idx_all.numel(), rows), rows):",
           (T_BENCH_TRUTH,), "bench truth covers only the first chunk of tokens"),
]


def _copy_tree(dst: Path) -> None:
    """Tracked and untracked (not ignored) files of the working tree, as they are now."""
    proc = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:  # not a git checkout (an unpacked archive): everything but caches
        shutil.copytree(ROOT, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build"))
        return
    files = proc.stdout.decode().split("\0")
    for rel in files:
        if not rel:
            continue
        src = ROOT / rel
        if not src.is_file():
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)


def _env(scratch: Path, ext_dir: Optional[Path]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if ext_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    return env


def _pytest(scratch: Path, args: Tuple[str, ...], env: dict, timeout: int) -> Tuple[str, str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *args]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.time() - t0
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0:
        return "passed", tail, time.time() - t0
    if proc.returncode == 1:
        return "failed", tail, time.time() - t0
    return f"error (rc {proc.returncode})", tail or proc.stderr.strip()[-300:], time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--markdown", type=Path, help="write the result table to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            ap.error(f"--only: unknown mutant(s) {sorted(unknown)}; see --list")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name:28s} {m.file}: {m.why}\n{'':28s} tests: {' '.join(m.tests)}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="fo-mutants-"))
    rows = []
    try:
        _copy_tree(scratch)
        ext_dir = scratch / ".torch_extensions"
        env = _env(scratch, None)
        probe = subprocess.run([sys.executable, "-c", "import fused_objectives as f; print(f.__file__)"],
                               cwd=scratch, env=env, capture_output=True, text=True)
        where = probe.stdout.strip()
        if not where.startswith(str(scratch)):
            print(f"the scratch copy is not what Python imports ({where or probe.stderr.strip()}); aborting")
            return 2
        baseline = {}
        for m in mutants:
            if m.tests in baseline:
                continue
            status, tail, secs = _pytest(scratch, m.tests, env, args.timeout)
            baseline[m.tests] = status
            print(f"baseline {' '.join(m.tests)}: {status} ({tail}; {secs:.0f}s)", flush=True)
        for m in mutants:
            path = scratch / m.file
            text = path.read_text() if path.is_file() else None
            n = 0 if text is None else text.count(m.original)
            if n == 0 or (m.count is not None and n != m.count):
                verdict, detail, secs = ("snippet not found" if n == 0 else f"snippet found {n}x, expected {m.count}x",
                                         "", 0.0)
            elif baseline[m.tests] != "passed":
                verdict, detail, secs = "baseline fails", baseline[m.tests], 0.0
            else:
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    cpp = m.file.endswith((".cpp", ".h"))
                    status, detail, secs = _pytest(scratch, m.tests, _env(scratch, ext_dir if cpp else None),
                                                   args.timeout)
                finally:
                    path.write_text(text)
                verdict = {"failed": "caught", "passed": "MISSED"}.get(status, status)
            rows.append((m, verdict, detail, secs))
            print(f"{m.name:28s} {verdict:18s} {secs:5.0f}s  {detail}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch copy kept at {scratch}")
    caught = sum(1 for _, v, _, _ in rows if v == "caught")
    summary = f"{caught} of {len(rows)} mutants caught"
    print(summary)
    if args.markdown:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        lines = [f"# Mutation check ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit} "
                 f"plus the working tree)", "",
                 f"`{' '.join(['python', 'scripts/mutation_check.py'] + (argv or sys.argv[1:]))}`: {summary}.", "",
                 "| mutant | file | bug | tests run | result | seconds |", "|---|---|---|---|---|---|"]
        for m, v, _, s in rows:
            lines.append(f"| {m.name} | {m.file} | {m.why} | `{' '.join(m.tests)}` | {v} | {s:.0f} |")
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
