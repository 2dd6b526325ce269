"""Micro-benchmarks that feed the roofline model (fused_objectives/bench/roofline.py) on a GPU.

Measures, at the llama3-8b head (H 4096, V 128256, N 8192, bf16), with CUDA events, median of
``--repeats`` after warm-up:
- the three bare GEMMs (logits ``X W^T``, dX ``dz W``, dW ``dz^T X``) -> ``gemm_tflops["bf16"]``;
  fp32 GEMMs with and without TF32 at N = 1024 -> ``gemm_tflops["tf32"|"fp32"]`` (the reference's);
- the chunk GEMMs of the chunked strategy at M = 256, 512, 1024 rows: logits, dX, dW accumulated in
  place in bf16 (``addmm_``) and into an fp32 buffer -> ``chunk_tflops``;
- epilogue bandwidth: an elementwise read + write pass over a ``[1024, V]`` bf16 chunk and a 1 GiB
  copy -> ``bandwidth_gbs`` (the larger of the two: what a streaming kernel reaches).

The JSON is rewritten after every measurement, so a time limit leaves what was done.  ``--dry-run``
runs the same code on tiny CPU shapes (``perf_counter``): it tests the script, not a machine.

    python benchmarks/gpu_micro.py --json $OUT/micro.json
    python benchmarks/roofline.py --gpu auto --measured $OUT/micro.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    def cuda(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def cpu(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    return cuda if device.type == "cuda" else cpu


def device_info(device: torch.device, commit: Optional[str]) -> dict:
    info = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "git_commit": commit}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", l2_bytes=getattr(p, "L2_cache_size", None))
        try:
            q = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,driver_version"
            out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True,
                                 text=True, timeout=20)
            info["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    else:
        info["gpu"] = None
    return info


class Recorder:
    def __init__(self, path: Optional[str], machine: dict):
        self.path = path
        self.data = {"machine": machine, "gpu": machine.get("gpu"), "records": [], "gemm_tflops": {},
                     "chunk_tflops": {}, "bandwidth_gbs": None}

    def add(self, **rec):
        self.data["records"].append(rec)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        self.save()

    def save(self):
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps(self.data, indent=1) + "\n")


def run(args) -> dict:
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: use --dry-run to test this script on CPU")
    n, h, v = (64, 32, 500) if args.dry_run else (args.tokens, args.hidden, args.vocab)
    chunks = [16, 32] if args.dry_run else [256, 512, 1024]
    warm, reps = (0, 1) if args.dry_run else (args.warmup, args.repeats)
    timed = _timer(device)
    rec = Recorder(args.json, device_info(device, args.commit))
    bf = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, device=device, dtype=bf, generator=gen)
    w = torch.randn(v, h, device=device, dtype=bf, generator=gen)
    g = torch.randn(n, v, device=device, dtype=bf, generator=gen)
    # bare GEMMs at the full shape
    total = 0.0
    for name, fn in (("logits", lambda: x @ w.T), ("dx", lambda: g @ w), ("dw", lambda: g.T @ x)):
        ms = timed(fn, warm, reps)
        total += ms
        rec.add(kind="bare_gemm", op=name, dtype="bf16", M=n, H=h, V=v, ms=ms, tflops=2 * n * h * v / ms / 1e9)
    rec.data["gemm_tflops"]["bf16"] = 6 * n * h * v / total / 1e9
    rec.add(kind="bare_gemm", op="three", dtype="bf16", M=n, H=h, V=v, ms=total,
            tflops=rec.data["gemm_tflops"]["bf16"])
    del g
    # fp32 GEMMs (the reference upcasts): with and without TF32, at fewer rows
    m32 = min(n, 16 if args.dry_run else 1024)
    x32, w32 = x[:m32].float(), w.float()
    old = torch.backends.cuda.matmul.allow_tf32
    for label, tf32 in (("fp32", False), ("tf32", True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = timed(lambda: x32 @ w32.T, warm, reps)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rec.data["gemm_tflops"][label] = 2 * m32 * h * v / ms / 1e9
        rec.add(kind="bare_gemm", op="logits", dtype=label, M=m32, H=h, V=v, ms=ms,
                tflops=rec.data["gemm_tflops"][label])
    del x32, w32
    # chunk GEMMs of the chunked strategy
    dw_bf = torch.zeros(v, h, device=device, dtype=bf)
    dw32 = torch.zeros(v, h, device=device, dtype=torch.float32)
    for m in chunks:
        xc = x[:m]
        dz = torch.randn(m, v, device=device, dtype=bf, generator=gen)
        logits = torch.empty(m, v, device=device, dtype=bf)
        dx = torch.empty(m, h, device=device, dtype=bf)
        ops = {"logits": lambda: torch.mm(xc, w.T, out=logits), "dx": lambda: torch.mm(dz, w, out=dx),
               "dw": lambda: dw_bf.addmm_(dz.T, xc), "dw_fp32": lambda: dw32.add_(dz.T @ xc)}
        for op, fn in ops.items():
            ms = timed(fn, warm, reps)
            tf = 2 * m * h * v / ms / 1e9
            rec.data["chunk_tflops"].setdefault(op, {})[str(m)] = tf
            rec.add(kind="chunk_gemm", op=op, dtype="bf16", M=m, H=h, V=v, ms=ms, tflops=tf)
        del dz, logits, dx
    del dw_bf, dw32
    # epilogue bandwidth: read + write a [chunk, V] bf16 tile in place, and a large copy
    rows = chunks[-1]
    tile = torch.randn(rows, v, device=device, dtype=bf, generator=gen)
    ms = timed(lambda: tile.mul_(1.0001), warm, reps)
    bw_tile = 2 * tile.numel() * 2 / ms / 1e6
    rec.add(kind="bandwidth", op="inplace_mul_chunk", bytes=2 * tile.numel() * 2, ms=ms, gbs=bw_tile)
    del tile
    numel = (2**20 if args.dry_run else 2**29)  # 1 GiB of bf16 on a GPU
    src = torch.empty(numel, device=device, dtype=bf).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), warm, reps)
    bw_copy = 2 * numel * 2 / ms / 1e6
    rec.add(kind="bandwidth", op="copy", bytes=2 * numel * 2, ms=ms, gbs=bw_copy)
    rec.data["bandwidth_gbs"] = max(bw_tile, bw_copy)
    rec.save()
    return rec.data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="rewritten after every measurement")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", help="git commit of the code measured (the GPU copy may lack .git)")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes: tests the script only")
    args = p.parse_args(argv)
    data = run(args)
    print(f"gemm_tflops {json.dumps({k: round(x, 1) for k, x in data['gemm_tflops'].items()})}; "
          f"bandwidth {data['bandwidth_gbs']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
