"""The sweep: shapes x token counts x objectives x ignored fractions x providers, one record per pass.

For each configuration the inputs are made once, the float64 ground truth is computed once on them
(on every token, or on the first ``--check-tokens`` when given), and every provider is checked against it
before it is timed.  On CPU each provider runs in a fresh process (its peak RSS is its own); on CUDA
in this process (peak allocated memory is exact there).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .inputs import DTYPES, ground_truth, make_class_weight, make_inputs, run_once, tolerance, worst_error
from .measure import CPU_TIME, PASSES, Measurement, finite, flops, measure, time_bare_gemms
from .providers import Problem, Reference, get_provider
from .report import short_reason



@dataclass(frozen=True)
class Shape:
    preset: str
    tokens: int
    hidden: int
    vocab: int
    softcap: Optional[float] = None


@dataclass
class Plan:
    shapes: List[Shape]
    objectives: List[str]
    providers: List[str]
    dtype: str
    device: str
    ignored_fractions: List[float] = field(default_factory=lambda: [0.0])
    passes: List[str] = field(default_factory=lambda: list(PASSES))
    warmup: int = 1
    repeats: int = 3
    check_tokens: Optional[int] = None
    isolate: bool = True
    seed: int = 0
    max_seconds: Optional[float] = None
    threads: Optional[int] = None  # torch.set_num_threads here and in every worker process
    # loss terms every provider must compute (or be skipped with the reason)
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    class_weight: bool = False  # seeded per-class weights in [0.5, 1.5] (inputs.make_class_weight)

    def problem(self, objective: str, softcap: Optional[float], vocab: int, device) -> Problem:
        cw = make_class_weight(vocab, device, self.seed) if self.class_weight else None
        return Problem(objective, softcap, self.z_loss, self.label_smoothing, cw)

    def terms_label(self) -> str:
        """``" z_loss=0.0001 label_smoothing=0.1 class_weight"``, or "" without loss terms."""
        parts = [f"z_loss={self.z_loss:g}"] if self.z_loss else []
        parts += [f"label_smoothing={self.label_smoothing:g}"] if self.label_smoothing else []
        parts += ["class_weight"] if self.class_weight else []
        return "".join(" " + p for p in parts)

    def units(self) -> int:
        return len(self.shapes) * len(self.objectives) * len(self.ignored_fractions) * len(self.providers)


def _record(shape: Shape, plan: Plan, provider: str, objective: str, ignored: float, n_valid: int,
            pass_: str, m: Optional[Measurement], status: str, reason: str, label: str = "") -> dict:
    rec = {
        "provider": provider, "objective": objective, "preset": shape.preset, "tokens": shape.tokens,
        "hidden": shape.hidden, "vocab": shape.vocab, "dtype": plan.dtype, "device": plan.device,
        "pass": pass_, "time_ms": None, "peak_mem_mb": None, "tflops": None, "matmul_ratio": None,
        "correct": None, "max_rel_error": None,
        "status": status, "reason": reason, "backend": label, "softcap": shape.softcap,
        "ignored_fraction": ignored, "valid_tokens": n_valid, "speedup_vs_reference": None,
        "extra_mem_mb": None, "grad_mem_mb": None, "tolerance": None, "check_tokens": None,
        "err_loss": None, "err_dx": None, "err_dw": None, "repeats": None, "times_ms": None,
        "cpu_time_ms": None, "cpu_matmul_ratio": None, "threads": plan.threads or torch.get_num_threads(),
        "z_loss": plan.z_loss, "label_smoothing": plan.label_smoothing, "class_weight": plan.class_weight,
    }
    if m is not None:
        t = m.time_ms.get(pass_)
        rec.update(correct=m.correct, max_rel_error=finite(m.max_rel_error), tolerance=m.tolerance,
                   check_tokens=m.check_tokens, time_ms=t, times_ms=m.times_ms.get(pass_),
                   repeats=len(m.times_ms.get(pass_) or []) or None,
                   err_loss=finite(m.errors.get("loss")), err_dx=finite(m.errors.get("dx")),
                   err_dw=finite(m.errors.get("dw")))
        if pass_ == "fwd_bwd":
            rec["cpu_time_ms"] = m.time_ms.get(CPU_TIME)
        if t:
            rec["tflops"] = flops(pass_, n_valid, shape.hidden, shape.vocab) / (t * 1e-3) / 1e12
        mem = m.peak_mem_mb.get(pass_)
        if mem is not None:
            rec["peak_mem_mb"] = mem
            rec["grad_mem_mb"] = m.grad_mem_mb if pass_ != "fwd" else 0.0
            rec["extra_mem_mb"] = max(0.0, mem - rec["grad_mem_mb"])
    return rec


def _run_isolated(provider: str, shape: Shape, plan: Plan, objective: str, ignored: float, check_tokens: int,
                  tol: float, gt_path: str, tmp: str) -> Measurement:
    spec = {"provider": provider, "tokens": shape.tokens, "hidden": shape.hidden, "vocab": shape.vocab,
            "softcap": shape.softcap, "dtype": plan.dtype, "device": plan.device, "objective": objective,
            "ignored_fraction": ignored, "seed": plan.seed, "warmup": plan.warmup, "repeats": plan.repeats,
            "max_seconds": plan.max_seconds, "threads": plan.threads, "z_loss": plan.z_loss,
            "label_smoothing": plan.label_smoothing, "class_weight": plan.class_weight,
            "check_tokens": check_tokens, "tolerance": tol, "gt_path": gt_path}
    spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "fused_objectives.bench._worker", spec_path, out_path],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return Measurement(status="error", correct=False,
                           reason=f"worker process exited with {proc.returncode}: {tail[0]}")
    with open(out_path) as f:
        return Measurement(**json.load(f))


def run(plan: Plan, progress: Optional[Callable[[str], None]] = None,
        checkpoint: Optional[Callable[[List[dict]], None]] = None,
        note: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Run the sweep; ``progress(line)`` is called after each provider measurement (or skip),
    ``note(line)`` when a configuration's shared work starts (inputs, float64 truth, bare GEMMs), and
    ``checkpoint(records so far)`` after each configuration (a run cut short keeps its results)."""
    say = progress or (lambda line: None)
    tell = note or (lambda line: None)
    device = torch.device(plan.device)
    dtype = DTYPES[plan.dtype]
    records: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="fo-bench-") as tmp:
        for shape in plan.shapes:
            tell(f"{shape.preset} N={shape.tokens}: timing the three bare GEMMs of the shape ...")
            base = make_inputs(shape.tokens, shape.hidden, shape.vocab, dtype, device, 0.0, plan.seed)
            gemm = time_bare_gemms(base, plan.warmup, plan.repeats)
            del base
            for objective in plan.objectives:
                for ignored in plan.ignored_fractions:
                    tell(f"{shape.preset} N={shape.tokens} {objective} ignored={ignored:g}: float64 reference ...")
                    recs = _run_config(plan, shape, objective, ignored, device, dtype, tmp, say)
                    for p in plan.passes:
                        recs.append(_gemm_record(shape, plan, objective, ignored, p, gemm[p], gemm.get(CPU_TIME)))
                    records += recs
                    if checkpoint is not None:
                        add_ratios(records)
                        checkpoint(records)
    add_ratios(records)
    return records


def _gemm_record(shape, plan, objective, ignored, pass_, t, cpu_t=None) -> dict:
    rec = _record(shape, plan, "bare_gemm", objective, ignored, shape.tokens, pass_, None, "baseline",
                  "the three GEMMs of this shape (logits, dX, dW), no softmax: the physical limit")
    if pass_ == "fwd_bwd":
        rec["cpu_time_ms"] = cpu_t
    rec.update(time_ms=t, repeats=plan.repeats, tflops=flops(pass_, shape.tokens, shape.hidden, shape.vocab) / (t * 1e-3) / 1e12,
               matmul_ratio=1.0)
    return rec


def _run_config(plan, shape, objective, ignored, device, dtype, tmp, say) -> List[dict]:
    problem = plan.problem(objective, shape.softcap, shape.vocab, device)
    inp = make_inputs(shape.tokens, shape.hidden, shape.vocab, dtype, device, ignored, plan.seed)
    n_valid = inp.n_valid
    # the float64 truth is computed in bounded chunks over every token (inputs.ground_truth): check
    # all of them by default, so a provider wrong on any chunk is caught
    n_check = min(plan.check_tokens or shape.tokens, shape.tokens)
    check_inp = inp.head(n_check)
    gt = ground_truth(check_inp, objective, shape.softcap, **problem.term_kwargs())
    # the same-dtype reference's own error sets how close a provider must be (see inputs.tolerance)
    ref_err = worst_error(run_once(Reference().build(device, dtype, problem), check_inp), gt)
    check_inp.hidden.grad = check_inp.weight.grad = None
    tol = tolerance(dtype, ref_err, device)
    gt_path = None
    isolate = plan.isolate and device.type == "cpu"
    if isolate:
        gt_path = os.path.join(tmp, "gt.pt")
        torch.save({k: (v.cpu() if v is not None else None) for k, v in dataclasses.asdict(gt).items()}, gt_path)
        del inp, check_inp
    out: List[dict] = []
    where = f"{shape.preset} N={shape.tokens} {plan.dtype} {objective}{plan.terms_label()} ignored={ignored:g}"
    for name in plan.providers:
        provider = get_provider(name)
        reason = provider.unavailable_reason(device, dtype, problem)
        if reason is not None:
            say(f"{where} {name}: skipped ({short_reason(reason)})")
            out += [_record(shape, plan, name, objective, ignored, n_valid, p, None, "skipped", reason)
                    for p in plan.passes]
            continue
        if isolate:
            m = _run_isolated(name, shape, plan, objective, ignored, n_check, tol, gt_path, tmp)
        else:
            m = measure(provider, problem, inp, check_inp, gt, tol, plan.warmup, plan.repeats, plan.max_seconds)
        out += [_record(shape, plan, name, objective, ignored, n_valid, p, m, m.status, m.reason, m.label)
                for p in plan.passes]
        summary = (f"{m.time_ms.get('fwd_bwd', float('nan')):.1f} ms fwd+bwd" if m.time_ms else "")
        verdict = {"ok": "correct", "wrong": "WRONG", "error": "ERROR"}[m.status]
        say(f"{where} {name}: {summary} {verdict}" + (f" ({m.reason})" if m.reason else ""))
    del gt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _key(r: dict) -> tuple:
    return (r["preset"], r["tokens"], r["hidden"], r["vocab"], r["dtype"], r["device"], r["objective"],
            r["ignored_fraction"], r["pass"])


def add_ratios(records: Sequence[dict]) -> None:
    """``matmul_ratio`` (time / bare GEMMs) and ``speedup_vs_reference`` (reference time / time), the
    latter only where both the provider and the reference passed the correctness check."""
    gemm = {_key(r): r["time_ms"] for r in records if r["provider"] == "bare_gemm"}
    gemm_cpu = {_key(r): r.get("cpu_time_ms") for r in records if r["provider"] == "bare_gemm"}
    ref = {_key(r): r["time_ms"] for r in records
           if r["provider"] == "reference" and r["correct"] and r["time_ms"]}
    for r in records:
        if r["provider"] == "bare_gemm" or not r["time_ms"]:
            continue
        g = gemm.get(_key(r))
        r["matmul_ratio"] = r["time_ms"] / g if g else None
        gc = gemm_cpu.get(_key(r))
        r["cpu_matmul_ratio"] = r["cpu_time_ms"] / gc if (gc and r.get("cpu_time_ms")) else None
        t_ref = ref.get(_key(r))
        r["speedup_vs_reference"] = t_ref / r["time_ms"] if (r["correct"] and t_ref) else None
