"""Roofline model: predicted forward+backward time of each strategy from GEMM rate and memory bandwidth.

A prediction, not a measurement: each step costs ``max(FLOPs / rate, bytes / bandwidth)`` and the
steps of a strategy add up.  Rates come from spec sheets times a realistic efficiency
(``HARDWARE``), or from measured values (``Hardware.measured``, fed by ``benchmarks/gpu_micro.py``).
The useful work of an LM-head loss is ``6 N H V`` FLOPs (2 forward, 4 backward); strategies differ
in what they execute beyond it and in the bytes they move:

- ``bare_gemm``: the three GEMMs of the shape (logits, dX, dW) in the input dtype, all N tokens:
  the floor the bench reports ratios against;
- ``triton_chunked``: valid rows compacted, then per chunk of ``M`` rows a logits GEMM, row kernels
  that read the ``[M, V]`` logits and write ``dz`` in place (3 passes), and the dX and dW GEMMs
  (``dW`` accumulated over chunks: read + written once per chunk, in place or an fp32 buffer); fp16
  inputs run it all in fp32, as shipped;
- ``triton_fused``: tile kernels (at ``fused_vs_gemm`` of the GEMM rate): the forward computes
  logits (2 N H V), the backward recomputes them and adds ``dz @ W`` and ``dz^T @ X`` with fp32 atomics (6 N H V; 8 N H V in all), each atomic a
  read-modify-write that misses L2 at these sizes;
- ``liger``: Liger-Kernel's FLCE: chunks of ``next_pow2(N / ceil(V / H))`` rows over all tokens
  (ignored ones included), a Triton row kernel reading each row twice and writing it once, dW
  added in place in the weight dtype;
- ``reference``: eager PyTorch on fp32 logits (inputs upcast: fp32 GEMMs, TF32 only when allowed)
  and about ``eager_passes`` full ``[N, V]`` fp32 passes of elementwise work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
STRATEGIES = ("bare_gemm", "triton_chunked", "triton_fused", "liger", "reference")


@dataclass(frozen=True)
class Hardware:
    """Peak dense tensor-core TFLOP/s per dtype (``tf32``: fp32 inputs on tensor cores, ``fp32``:
    CUDA cores), HBM GB/s, and the fractions of them large kernels reach."""

    name: str
    tflops: Dict[str, float]
    bandwidth_gbs: float
    l2_mb: float
    gemm_efficiency: float = 0.75
    fused_vs_gemm: float = 0.8  # Triton tile kernels' rate as a fraction of the (cuBLAS) GEMM rate
    bandwidth_efficiency: float = 0.85
    # measured effective TFLOP/s of the chunk GEMMs by rows M ({"logits"|"dx"|"dw": {M: TF/s}})
    chunk_tflops: Dict[str, Dict[int, float]] = field(default_factory=dict)
    source: str = "spec sheet"
    capability: Tuple[int, int] = (9, 0)  # picks the shipped kernel configs of that architecture

    def gemm_rate(self, dtype: str, tf32: bool = False) -> float:
        """Effective FLOP/s of a large GEMM in ``dtype``."""
        key = "tf32" if (dtype == "fp32" and tf32) else dtype
        return self.tflops[key] * 1e12 * self.gemm_efficiency

    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    def measured(self, micro: dict) -> "Hardware":
        """This hardware with measured values: ``micro`` as written by ``benchmarks/gpu_micro.py``
        (``gemm_tflops`` {dtype: TF/s} of large GEMMs, ``bandwidth_gbs``, ``chunk_tflops``)."""
        tflops = dict(self.tflops)
        for dt, v in (micro.get("gemm_tflops") or {}).items():
            if v:
                tflops[dt] = float(v)
        chunk = {k: {int(m): float(t) for m, t in v.items()} for k, v in (micro.get("chunk_tflops") or {}).items()}
        bw = micro.get("bandwidth_gbs")
        return replace(self, tflops=tflops, gemm_efficiency=1.0 if micro.get("gemm_tflops") else self.gemm_efficiency,
                       bandwidth_gbs=float(bw) if bw else self.bandwidth_gbs,
                       bandwidth_efficiency=1.0 if bw else self.bandwidth_efficiency,
                       chunk_tflops=chunk or self.chunk_tflops, source="measured: " + str(micro.get("gpu", "?")))


# Dense (no sparsity) spec-sheet figures, SXM parts unless named.
HARDWARE: Dict[str, Hardware] = {
    "a100": Hardware("A100-SXM4-80GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, 2039.0, 40.0,
                     capability=(8, 0)),
    "h100": Hardware("H100-SXM5", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 3350.0, 50.0),
    "h100-pcie": Hardware("H100-PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}, 2000.0, 50.0),
    "h200": Hardware("H200-SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, 4800.0, 50.0),
}


def hardware_for(gpu_name: str) -> Hardware:
    """The spec-sheet entry for a device name such as ``torch.cuda.get_device_name()``."""
    name = gpu_name.lower()
    if "h200" in name:
        return HARDWARE["h200"]
    if "h100" in name and "pcie" in name:
        return HARDWARE["h100-pcie"]
    if "h100" in name or "h800" in name:
        return HARDWARE["h100"]
    if "a100" in name or "a800" in name:
        return HARDWARE["a100"]
    raise ValueError(f"no spec-sheet figures for GPU {gpu_name!r}; known: {sorted(HARDWARE)} "
                     "(pass measured values with Hardware.measured)")


@dataclass
class Prediction:
    strategy: str
    time_ms: float
    parts_ms: Dict[str, float]
    flops: float
    bytes: float
    notes: str = ""


def useful_flops(n: int, h: int, v: int) -> float:
    """Forward + backward FLOPs of the LM head: 2NHV logits, 2NHV dX, 2NHV dW."""
    return 6.0 * n * h * v


def _step(flops: float, nbytes: float, rate: float, bw: float) -> float:
    """Seconds of one step on the roofline."""
    return max(flops / rate, nbytes / bw)


def _chunk_rate(hw: Hardware, kind: str, m: int, default: float) -> float:
    """Measured rate of a chunk GEMM with ``m`` rows (log-linear between measured sizes), else None."""
    pts = sorted(hw.chunk_tflops.get(kind, {}).items())
    if not pts:
        return default
    if m <= pts[0][0]:
        return pts[0][1] * 1e12
    for (m0, t0), (m1, t1) in zip(pts, pts[1:]):
        if m <= m1:
            a = (math.log(m) - math.log(m0)) / (math.log(m1) - math.log(m0))
            return (t0 + a * (t1 - t0)) * 1e12
    return pts[-1][1] * 1e12


def _chunked(n_rows: int, h: int, v: int, e: int, hw: Hardware, rate: float, bw: float, m: int,
             logit_bytes: int, dw_bytes: int, epilogue_passes: int, measured_chunks: bool):
    """Per-chunk GEMMs + epilogue passes over ``n_rows`` rows in chunks of ``m``; (parts, flops, bytes)."""
    parts = {"logits_gemm": 0.0, "epilogue": 0.0, "dx_gemm": 0.0, "dw_gemm": 0.0}
    flops = nbytes = 0.0
    done = 0
    first = True
    while done < n_rows:
        c = min(m, n_rows - done)
        f = 2.0 * c * h * v
        b_log = v * h * e + c * h * e + c * v * logit_bytes
        b_dx = c * v * logit_bytes + v * h * e + c * h * e
        # dW: read the accumulator (not on the first chunk) and write it
        b_dw = c * v * logit_bytes + c * h * e + v * h * dw_bytes * (1 if first else 2)
        b_epi = epilogue_passes * c * v * logit_bytes
        for key, b in (("logits_gemm", b_log), ("dx_gemm", b_dx), ("dw_gemm", b_dw)):
            kind = key.split("_")[0]
            if kind == "dw" and dw_bytes == 4 and "dw_fp32" in hw.chunk_tflops:
                kind = "dw_fp32"  # measured: dW GEMM added into an fp32 buffer
            r = _chunk_rate(hw, kind, c, rate) if measured_chunks else rate
            parts[key] += _step(f, b, r, bw)
            nbytes += b
        parts["epilogue"] += b_epi / bw
        flops += 3 * f
        nbytes += b_epi
        done += c
        first = False
    return parts, flops, nbytes


def backward_tile(dtype: str, capability: Tuple[int, int], tf32: bool = False) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_V) of the shipped fused backward config for that dtype kind and architecture
    (kernels/configs.py FUSED_CONFIGS), 128 x 128 when it cannot be read."""
    try:
        from ..kernels import configs
        kind = "half" if dtype != "fp32" else ("tf32" if tf32 else "ieee")
        cfg = configs.FUSED_CONFIGS[("backward", kind, 90 if tuple(capability) >= (9, 0) else 80)]
        return cfg.block_n, cfg.block_v
    except (ImportError, AttributeError, KeyError):
        return 128, 128


# The chunked strategy's buffer budget (kernels/configs.py CHUNK_BUDGET_BYTES, read when importable).
CHUNK_BUDGET_BYTES = 192 * 1024 * 1024


def default_chunk_rows(v: int, dtype: str) -> int:
    """Rows per chunk of the shipped chunked strategy: the ``[rows, V]`` buffer within its budget,
    rounded down to a multiple of 64 (768 at V = 128256 in bf16)."""
    try:
        from ..kernels import configs
        budget = configs.CHUNK_BUDGET_BYTES
    except (ImportError, AttributeError):
        budget = CHUNK_BUDGET_BYTES
    rows = max(1, budget // (v * DTYPE_BYTES[dtype]))
    return rows // 64 * 64 if rows >= 64 else rows


def predict(strategy: str, n: int, h: int, v: int, dtype: str = "bf16", valid_fraction: float = 1.0,
            hw: Optional[Hardware] = None, *, tf32: bool = False, chunk_rows: Optional[int] = None,
            dw_accum: Optional[str] = None, block_n: Optional[int] = None, block_v: Optional[int] = None,
            eager_passes: int = 8) -> Prediction:
    """Predicted forward+backward time of ``strategy`` at ``N=n`` tokens (``valid_fraction`` of them
    not ignored), hidden ``h``, vocabulary ``v``, input ``dtype`` (bf16 | fp16 | fp32).

    ``chunk_rows`` (chunked: default the shipped budget's, ``default_chunk_rows``) and ``dw_accum``
    (chunked dW accumulation dtype: default the input dtype, as shipped; ``"fp32"`` for a buffer);
    ``block_n`` / ``block_v``: the fused backward's tile (default: the shipped config for the arch)."""
    hw = hw or HARDWARE["h100"]
    if dtype in DTYPE_BYTES:
        chunk_rows = default_chunk_rows(v, dtype) if chunk_rows is None else chunk_rows
        dw_accum = dtype if dw_accum is None else dw_accum
        if block_n is None or block_v is None:
            bn, bv = backward_tile(dtype, hw.capability, tf32)
            block_n, block_v = block_n or bn, block_v or bv
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1], got {valid_fraction}")
    if min(n, h, v, chunk_rows, block_n, block_v) <= 0:
        raise ValueError(f"sizes must be positive, got n={n} h={h} v={v} chunk_rows={chunk_rows} "
                         f"block_n={block_n} block_v={block_v}")
    if dw_accum not in DTYPE_BYTES:
        raise ValueError(f"dw_accum must be one of {sorted(DTYPE_BYTES)}, got {dw_accum!r}")
    e = DTYPE_BYTES[dtype]
    rate, bw = hw.gemm_rate(dtype, tf32), hw.bandwidth()
    n_valid = int(round(n * valid_fraction))
    if strategy == "bare_gemm":
        f = 2.0 * n * h * v
        parts = {"logits_gemm": _step(f, v * h * e + n * h * e + n * v * e, rate, bw),
                 "dx_gemm": _step(f, n * v * e + v * h * e + n * h * e, rate, bw),
                 "dw_gemm": _step(f, n * v * e + n * h * e + v * h * e, rate, bw)}
        nbytes = 3 * (n * v * e + v * h * e + n * h * e)
        return Prediction(strategy, 1e3 * sum(parts.values()), _ms(parts), 3 * f, nbytes,
                          "three GEMMs in the input dtype over all N tokens")
    if strategy == "triton_chunked" and dtype == "fp16":
        # shipped: fp16 scalar losses run the whole chunked path in fp32 (an fp32 copy of W, fp32
        # GEMMs: TF32 only when allowed) so that c * p cannot underflow fp16 before the upstream scalar
        p = predict(strategy, n, h, v, "fp32", valid_fraction, hw, tf32=tf32, dw_accum="fp32")
        copy = v * h * (2 + 4) + v * h * (4 + 2)  # W to fp32, dW back to fp16
        p.parts_ms["fp16_casts"] = 1e3 * copy / bw
        return Prediction(strategy, p.time_ms + p.parts_ms["fp16_casts"], p.parts_ms, p.flops, p.bytes + copy,
                          "fp16 runs in fp32: " + p.notes)
    if strategy == "triton_chunked":
        parts, flops, nbytes = _chunked(n_valid, h, v, e, hw, rate, bw, chunk_rows, e, DTYPE_BYTES[dw_accum], 3,
                                        measured_chunks=bool(hw.chunk_tflops))
        if dw_accum != dtype:  # the accumulator cast into the gradient once at the end
            parts["dw_cast"] = v * h * (DTYPE_BYTES[dw_accum] + e) / bw
            nbytes += v * h * (DTYPE_BYTES[dw_accum] + e)
        return Prediction(strategy, 1e3 * sum(parts.values()), _ms(parts), flops, nbytes,
                          f"{n_valid} valid rows in chunks of {chunk_rows}, dW accumulated in {dw_accum}")
    if strategy == "triton_fused":
        frate = rate * hw.fused_vs_gemm
        f_fwd, f_bwd = 2.0 * n_valid * h * v, 6.0 * n_valid * h * v
        # every (token block, vocab block) program adds a [block_n, H] tile to dX and a [block_v, H]
        # tile to dW, in fp32; each add reads and writes HBM (dX and the dW slab exceed L2 here)
        atomic = 4.0 * (n_valid * h * math.ceil(v / block_v) + v * h * math.ceil(n_valid / block_n))
        parts = {"forward_tiles": f_fwd / frate,
                 "backward_tiles": max(f_bwd / frate, 2.0 * atomic / bw)}
        return Prediction(strategy, 1e3 * sum(parts.values()), _ms(parts), f_fwd + f_bwd, 2.0 * atomic,
                          f"8NHV at {hw.fused_vs_gemm:.0%} of the GEMM rate; {atomic / 1e9:.0f} GB of fp32 atomic adds "
                          f"({block_n}x{block_v} tiles), each a read-modify-write")
    if strategy == "liger":
        inc = math.ceil(v / h)
        m = min(1 << max(0, math.ceil(math.log2(max(1, math.ceil(n / inc))))), n)
        parts, flops, nbytes = _chunked(n, h, v, e, hw, rate, bw, m, e, e, 3, measured_chunks=bool(hw.chunk_tflops))
        return Prediction(strategy, 1e3 * sum(parts.values()), _ms(parts), flops, nbytes,
                          f"all {n} rows (ignored included) in chunks of {m}, dW in place in {dtype}")
    # reference: fp32 GEMMs on upcast inputs, eager elementwise passes over fp32 [N, V]
    rrate = hw.gemm_rate("fp32", tf32)
    f = 2.0 * n * h * v
    upcast = 2 * (n * h + v * h) * (e + 4)
    parts = {"gemms": 3 * _step(f, n * v * 4 + (n + v) * h * 4, rrate, bw),
             "elementwise": (eager_passes * n * v * 4 + upcast) / bw}
    return Prediction(strategy, 1e3 * sum(parts.values()), _ms(parts), 3 * f,
                      eager_passes * n * v * 4 + upcast,
                      f"fp32 GEMMs ({'TF32' if tf32 else 'no TF32'}), {eager_passes} fp32 [N, V] passes")


def _ms(parts: Dict[str, float]) -> Dict[str, float]:
    return {k: 1e3 * s for k, s in parts.items()}


def predict_all(n: int, h: int, v: int, dtype: str = "bf16", valid_fraction: float = 1.0,
                hw: Optional[Hardware] = None, **kw) -> List[Prediction]:
    return [predict(s, n, h, v, dtype, valid_fraction, hw, **kw) for s in STRATEGIES]


# The bench's providers and backends -> strategies ("fused" is labelled with the backend it ran;
# "triton" chooses between the two Triton strategies, so its prediction is the faster of them).
PROVIDER_STRATEGY = {"bare_gemm": "bare_gemm", "reference": "reference", "liger": "liger",
                     "triton_chunked": "triton_chunked", "triton_fused": "triton_fused", "triton": "triton"}


def strategy_of(record: dict) -> Optional[str]:
    """The modelled strategy of a bench record: a name in ``STRATEGIES``, ``"triton"`` (the chooser),
    or None when the model has none for it."""
    provider = str(record.get("provider") or "")
    if provider in PROVIDER_STRATEGY:
        return PROVIDER_STRATEGY[provider]
    if provider.startswith("fused-"):
        return PROVIDER_STRATEGY.get(provider[len("fused-"):])
    if provider == "fused":
        return PROVIDER_STRATEGY.get(str(record.get("backend") or ""))
    return None


def predict_strategy(strategy: str, n: int, h: int, v: int, dtype: str = "bf16", valid_fraction: float = 1.0,
                     hw: Optional[Hardware] = None, per_token: bool = False, **kw) -> Prediction:
    """``predict``, plus ``"triton"``, the chooser (backends/triton.py): chunked for scalar losses
    (the bench's mean), and for per-token gradients the faster of the two by this model."""
    if strategy == "triton" and not per_token:
        best = predict("triton_chunked", n, h, v, dtype, valid_fraction, hw, **kw)
        return replace(best, notes=f"chooser -> triton_chunked (scalar loss): {best.notes}")
    if strategy == "triton":
        best = min((predict(s, n, h, v, dtype, valid_fraction, hw, **kw) for s in ("triton_chunked", "triton_fused")),
                   key=lambda p: p.time_ms)
        return replace(best, notes=f"chooser -> {best.strategy}: {best.notes}")
    return predict(strategy, n, h, v, dtype, valid_fraction, hw, **kw)


def predict_record(record: dict, machine: dict) -> Optional[float]:
    """Predicted forward+backward ms beside a measured GPU bench record (None off GPU, for other
    passes, unknown GPUs and providers the model does not cover)."""
    if (not str(record.get("device", "")).startswith("cuda") or record.get("pass") != "fwd_bwd"
            or not record.get("time_ms")):
        return None
    strategy = strategy_of(record)
    if strategy is None:
        return None
    try:
        hw = hardware_for(str(machine.get("gpu") or ""))
    except ValueError:
        return None
    n = int(record["tokens"])
    valid = (record.get("valid_tokens") or n) / n
    return predict_strategy(strategy, n, int(record["hidden"]), int(record["vocab"]), record["dtype"], valid,
                            hw).time_ms
