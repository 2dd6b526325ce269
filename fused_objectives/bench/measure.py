"""Measure one provider on one configuration: correctness, time per pass, peak memory.

Time: median over repeats after warm-up; on CUDA, CUDA events around the forward and the backward
of each step (stream time, no host sync inside a step); on CPU, ``time.perf_counter``, and the
process CPU time of forward+backward (``os.times``, every thread) beside it.
Memory: on CUDA, peak allocated bytes over the allocation before the step
(``torch.cuda.max_memory_allocated``); on CPU, peak RSS growth (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, the heap trimmed first), run in a fresh process per provider by the runner.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .inputs import Inputs, Result, check, run_once

PASSES = ("fwd", "bwd", "fwd_bwd")
# On CPU, forward+backward also in process CPU time (all threads): less sensitive to other jobs on a
# shared machine than wall time, and the two together show whether threads sat idle.
CPU_TIME = "fwd_bwd_cpu"


@dataclass
class Measurement:
    status: str = "ok"  # ok | wrong | error
    reason: str = ""
    label: str = ""
    correct: Optional[bool] = None
    max_rel_error: Optional[float] = None
    errors: Dict[str, float] = field(default_factory=dict)
    tolerance: Optional[float] = None
    check_tokens: int = 0
    time_ms: Dict[str, float] = field(default_factory=dict)
    times_ms: Dict[str, List[float]] = field(default_factory=dict)
    peak_mem_mb: Dict[str, float] = field(default_factory=dict)
    grad_mem_mb: Optional[float] = None
    mem_method: str = ""


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, inp: Inputs, warmup: int, repeats: int,
               max_seconds: Optional[float] = None) -> Dict[str, List[float]]:
    """Per-step forward / backward / forward+backward times in ms (``repeats`` of each, fewer when
    the timed steps have taken ``max_seconds`` of wall time; at least one)."""
    device = inp.hidden.device
    out: Dict[str, List[float]] = {p: [] for p in PASSES}
    start = time.perf_counter()

    def out_of_time(i: int) -> bool:
        return (max_seconds is not None and i > warmup and time.perf_counter() - start > max_seconds)
    if device.type == "cuda":
        events = []
        for i in range(warmup + repeats):
            if i == warmup:
                start = time.perf_counter()
            if out_of_time(i):
                break
            inp.hidden.grad = inp.weight.grad = None
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            loss = fn(inp.hidden, inp.weight, inp.target)
            e[1].record()
            loss.backward()
            e[2].record()
            if i >= warmup:
                events.append(e)
            del loss
        torch.cuda.synchronize(device)
        for e in events:
            out["fwd"].append(e[0].elapsed_time(e[1]))
            out["bwd"].append(e[1].elapsed_time(e[2]))
            out["fwd_bwd"].append(e[0].elapsed_time(e[2]))
        return out
    out[CPU_TIME] = []
    for i in range(warmup + repeats):
        if i == warmup:
            start = time.perf_counter()
        if out_of_time(i):
            break
        inp.hidden.grad = inp.weight.grad = None
        c0 = _process_cpu_s()
        t0 = time.perf_counter()
        loss = fn(inp.hidden, inp.weight, inp.target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        c1 = _process_cpu_s()
        del loss
        if i >= warmup:
            out["fwd"].append((t1 - t0) * 1e3)
            out["bwd"].append((t2 - t1) * 1e3)
            out["fwd_bwd"].append((t2 - t0) * 1e3)
            out[CPU_TIME].append((c1 - c0) * 1e3)
    return out


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------- CPU resident-set measurement
def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ru_maxrss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _CpuPeak:
    """Peak RSS growth in MB of what runs between ``start`` and ``read`` (``reset`` starts a new window)."""

    def __init__(self):
        _trim_heap()
        self.exact = _reset_peak_rss() and _status_kb("VmHWM") is not None
        self.base_kb = _status_kb("VmRSS") if self.exact else _ru_maxrss_kb()
        self.method = ("RSS high-water mark (VmHWM, reset via /proc/self/clear_refs) over the RSS before the step"
                       if self.exact else "ru_maxrss growth (first measurement of a fresh process only)")

    def reset(self):
        if self.exact:
            _reset_peak_rss()

    def read(self) -> float:
        peak = _status_kb("VmHWM") if self.exact else _ru_maxrss_kb()
        return max(0, peak - self.base_kb) / 1024.0


def peak_memory(fn, inp: Inputs) -> (Dict[str, float], float, str):
    """Peak extra memory (MB) of the forward, the backward and the whole step, over the memory held
    before the step (inputs); plus the size of the gradients the step returns and the method."""
    device = inp.hidden.device
    inp.hidden.grad = inp.weight.grad = None
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = fn(inp.hidden, inp.weight, inp.target)
        torch.cuda.synchronize(device)
        fwd = torch.cuda.max_memory_allocated(device) - base
        torch.cuda.reset_peak_memory_stats(device)
        loss.backward()
        torch.cuda.synchronize(device)
        bwd = torch.cuda.max_memory_allocated(device) - base
        mb = {"fwd": fwd / 2**20, "bwd": bwd / 2**20}
        method = "CUDA peak allocated (torch.cuda.max_memory_allocated) over the allocation before the step"
    else:
        peak = _CpuPeak()
        loss = fn(inp.hidden, inp.weight, inp.target)
        mb = {"fwd": peak.read()}
        peak.reset()
        loss.backward()
        mb["bwd"] = peak.read()
        method = peak.method
    del loss
    mb["fwd_bwd"] = max(mb["fwd"], mb["bwd"])
    grads = sum(t.numel() * t.element_size() for t in (inp.hidden.grad, inp.weight.grad) if t is not None)
    inp.hidden.grad = inp.weight.grad = None
    return mb, grads / 2**20, method


def measure(provider, problem, inp: Inputs, check_inp: Inputs, gt: Result, tol: float,
            warmup: int, repeats: int, max_seconds: Optional[float] = None,
            measure_memory: bool = True) -> Measurement:
    """Correctness on ``check_inp`` (a slice of ``inp``), then memory and time on ``inp``.

    Warm-up: the correctness step counts as one when it ran on all of ``inp``, and so does the
    memory step; compilation and lazy initialisation are never inside the memory or timed steps.
    """
    device, dtype = inp.hidden.device, inp.hidden.dtype
    m = Measurement(tolerance=tol, check_tokens=int(check_inp.hidden.shape[0]))
    try:
        m.label = provider.label(device)
        fn = provider.build(device, dtype, problem)
        res = run_once(fn, check_inp)
        m.correct, m.max_rel_error, m.errors = check(res, gt, tol)
        del res
        check_inp.hidden.grad = check_inp.weight.grad = None
        m.status = "ok" if m.correct else "wrong"
        if not m.correct:
            m.reason = ("max normwise relative error " + ", ".join(f"{k} {v:.2e}" for k, v in m.errors.items())
                        + f" > tolerance {tol:.1e}")
        same_shape = check_inp.hidden.shape == inp.hidden.shape
        # at least one warm-up on the full shape before the memory step (compilation is not the step)
        extra = max(0 if same_shape else 1, warmup - (1 if same_shape else 0) - (1 if measure_memory else 0))
        if extra:
            time_steps(fn, inp, extra, 0)
        if measure_memory:
            m.peak_mem_mb, m.grad_mem_mb, m.mem_method = peak_memory(fn, inp)
        m.times_ms = time_steps(fn, inp, 0, repeats, max_seconds)
        m.time_ms = {p: statistics.median(v) for p, v in m.times_ms.items()}
    except Exception as exc:  # one failing provider (OOM, unsupported case) must not stop the sweep
        m.status, m.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        m.correct = False if m.correct is None else m.correct
    finally:
        inp.hidden.grad = inp.weight.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return m


def time_bare_gemms(inp: Inputs, warmup: int, repeats: int) -> Dict[str, float]:
    """The three GEMMs of the same shape (logits, dX, dW) in the input dtype: the physical limit."""
    x, w = inp.hidden.detach(), inp.weight.detach()
    device = x.device
    g = torch.randn(x.shape[0], w.shape[0], device=device, dtype=x.dtype)
    ops = {"logits": lambda: x @ w.T, "dx": lambda: g @ w, "dw": lambda: g.T @ x}
    med, cpu = {}, {}
    for name, op in ops.items():
        ts, cs = [], []
        for i in range(warmup + repeats):
            c0 = _process_cpu_s()
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = op()
                b.record()
                b.synchronize()
                t = a.elapsed_time(b)
            else:
                t0 = time.perf_counter()
                out = op()
                t = (time.perf_counter() - t0) * 1e3
            del out
            if i >= warmup:
                ts.append(t)
                cs.append((_process_cpu_s() - c0) * 1e3)
        med[name] = statistics.median(ts)
        cpu[name] = statistics.median(cs)
    del g
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out = {"fwd": med["logits"], "bwd": med["dx"] + med["dw"], "fwd_bwd": med["logits"] + med["dx"] + med["dw"]}
    if device.type == "cpu":
        out[CPU_TIME] = sum(cpu.values())
    return out


def flops(pass_: str, tokens: int, hidden: int, vocab: int) -> float:
    """Useful FLOPs: 2NHV forward (logits), 4NHV backward (dX and dW)."""
    return {"fwd": 2, "bwd": 4, "fwd_bwd": 6}[pass_] * tokens * hidden * vocab


def finite(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
