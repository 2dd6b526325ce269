"""Roofline predictions of each strategy's forward+backward time (see fused_objectives/bench/roofline.py).

Predictions, not measurements: GEMM FLOPs at a realistic fraction of the spec-sheet tensor-core rate
and bytes at a realistic fraction of HBM bandwidth, or at measured rates (--measured, the JSON that
benchmarks/gpu_micro.py writes on a GPU).  --bench puts the prediction beside each measured GPU row
of a `fused-objectives bench --json` file.

    python benchmarks/roofline.py                                  # llama3-8b N=8192 bf16 on A100/H100/H200
    python benchmarks/roofline.py --gpu h200 --preset qwen2.5-7b --tokens 4096 8192 --ignored-fraction 0 0.5
    python benchmarks/roofline.py --gpu h100 --measured gpu_micro.json
    python benchmarks/roofline.py --bench results/gpu-h100.json   # measured vs predicted
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fused_objectives.bench import roofline as rl  # noqa: E402
from fused_objectives.bench.presets import PRESETS  # noqa: E402


def prediction_table(hardware, presets, tokens, dtype, fractions, micro=None, **kw) -> str:
    rows = [("gpu", "preset", "N", "ign", "strategy", "pred ms", "x gemm", "TFLOP/s", "bound by")]
    for hw in hardware:
        hw = hw if micro is None else hw.measured(micro)
        for name in presets:
            p = PRESETS[name]
            for n in tokens or [8192]:
                for frac in fractions:
                    preds = rl.predict_all(n, p.hidden, p.vocab, dtype, 1.0 - frac, hw, **kw)
                    floor = next(x for x in preds if x.strategy == "bare_gemm").time_ms
                    useful = rl.useful_flops(int(round(n * (1 - frac))), p.hidden, p.vocab)
                    for x in preds:
                        top = max(x.parts_ms, key=x.parts_ms.get)
                        rows.append((hw.name if micro is None else hw.name + "*", name, str(n), f"{frac:g}",
                                     x.strategy, f"{x.time_ms:.1f}", f"{x.time_ms / floor:.2f}",
                                     f"{useful / (x.time_ms * 1e-3) / 1e12:.0f}", top))
    out = _format(rows)
    out += ("\nPREDICTIONS (roofline model), not measurements. x gemm = predicted time / predicted bare "
            "GEMMs (all N tokens); TFLOP/s on 6*N_valid*H*V; 'bound by' = the largest part.\n"
            + ("* = measured rates from --measured.\n" if micro is not None else
               f"Rates: spec sheet x {rl.Hardware.gemm_efficiency:.0%} for GEMMs (Triton tile kernels: "
               f"{rl.Hardware.fused_vs_gemm:.0%} of that), x {rl.Hardware.bandwidth_efficiency:.0%} of HBM bandwidth.\n"))
    return out


def bench_table(path: str) -> str:
    data = json.loads(Path(path).read_text())
    machine, records = data["machine"], data["records"]
    rows = [("preset", "N", "objective", "ign", "provider", "measured ms", "predicted ms", "meas/pred")]
    for r in records:
        pred = rl.predict_record(r, machine)
        if r.get("pass") != "fwd_bwd" or not r.get("time_ms"):
            continue
        rows.append((r["preset"], str(r["tokens"]), r["objective"], f"{r['ignored_fraction']:g}", r["provider"],
                     f"{r['time_ms']:.1f}", "-" if pred is None else f"{pred:.1f}",
                     "-" if pred is None else f"{r['time_ms'] / pred:.2f}"))
    return (_format(rows) + f"\nmachine: {machine.get('gpu') or machine.get('cpu')}; predictions from the "
            "spec-sheet roofline (a lower bound for each strategy), not measurements.\n")


def _format(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if c[:1].isdigit() or c == "-" else c.ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", nargs="+", choices=list(rl.HARDWARE) + ["auto"], default=["a100", "h100", "h200"],
                   help="spec-sheet entries; auto: the GPU named in --measured")
    p.add_argument("--preset", nargs="+", choices=list(PRESETS), default=["llama3-8b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[8192])
    p.add_argument("--dtype", choices=list(rl.DTYPE_BYTES), default="bf16")
    p.add_argument("--ignored-fraction", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--chunk-rows", type=int, help="triton_chunked rows per chunk (default: the shipped budget's)")
    p.add_argument("--dw-accum", choices=list(rl.DTYPE_BYTES),
                   help="triton_chunked dW accumulation dtype (default: the input dtype, as shipped)")
    p.add_argument("--tf32", action="store_true", help="fp32 GEMMs on TF32 tensor cores")
    p.add_argument("--measured", metavar="JSON", help="measured rates (benchmarks/gpu_micro.py output)")
    p.add_argument("--bench", metavar="JSON", help="a bench --json file: measured vs predicted per GPU row")
    args = p.parse_args(argv)
    if args.bench:
        print(bench_table(args.bench))
        return 0
    for f in args.ignored_fraction:
        if not 0.0 <= f < 1.0:
            p.error(f"--ignored-fraction must be in [0, 1), got {f}")
    micro = json.loads(Path(args.measured).read_text()) if args.measured else None
    if "auto" in args.gpu:
        if not micro or not micro.get("gpu"):
            p.error("--gpu auto needs --measured JSON naming a GPU (benchmarks/gpu_micro.py on a GPU)")
        try:
            hardware = [rl.hardware_for(micro["gpu"])]
        except ValueError as exc:
            p.error(str(exc))
    else:
        hardware = [rl.HARDWARE[g] for g in args.gpu]
    print(prediction_table(hardware, args.preset, args.tokens, args.dtype, args.ignored_fraction, micro,
                           chunk_rows=args.chunk_rows, dw_accum=args.dw_accum, tf32=args.tf32))
    return 0


if __name__ == "__main__":
    sys.exit(main())
