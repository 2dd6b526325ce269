"""The roofline model's arithmetic (FLOPs, bytes, chunking, rates), not its truth: whether GPUs reach
these predictions is for a GPU run to say."""
import math

import pytest

from fused_objectives.bench import report, roofline as rl

N, H, V = 8192, 4096, 128256  # the llama3-8b head of the bench


def exact():
    """Round figures at 100% efficiency: predictions equal FLOPs / peak or bytes / bandwidth exactly."""
    return rl.Hardware("test", {"bf16": 1000.0, "fp16": 1000.0, "tf32": 500.0, "fp32": 50.0}, 4000.0, 50.0,
                       gemm_efficiency=1.0, fused_vs_gemm=1.0, bandwidth_efficiency=1.0)


def test_useful_flops_of_llama3_8b_head():
    assert rl.useful_flops(N, H, V) == 6 * N * H * V
    assert rl.useful_flops(N, H, V) / 1e12 == pytest.approx(25.82, abs=0.01)


def test_bare_gemms_are_flops_over_rate_when_compute_bound():
    p = rl.predict("bare_gemm", N, H, V, "bf16", 1.0, exact())
    assert p.flops == 6 * N * H * V
    assert p.time_ms == pytest.approx(6 * N * H * V / 1000e12 * 1e3, rel=1e-12)
    # the spec-sheet default applies its efficiency: 989.4 TF/s x 0.75
    d = rl.predict("bare_gemm", N, H, V, "bf16", 1.0, rl.HARDWARE["h100"])
    assert d.time_ms == pytest.approx(6 * N * H * V / (989.4e12 * 0.75) * 1e3, rel=1e-9)
    # ignored tokens do not shrink the bare GEMMs (the bench times them over all N)
    assert rl.predict("bare_gemm", N, H, V, "bf16", 0.5, exact()).time_ms == p.time_ms


def test_bare_gemm_becomes_memory_bound_at_tiny_bandwidth():
    slow = rl.Hardware("slow", exact().tflops, 1.0, 50.0, 1.0, 1.0, 1.0)
    p = rl.predict("bare_gemm", 64, 128, 1000, "bf16", 1.0, slow)
    assert p.time_ms == pytest.approx(p.bytes / 1e9 * 1e3, rel=1e-12)


def test_chunked_counts_chunks_epilogue_and_dw_traffic():
    n, h, v, m = 2500, 64, 1000, 1000  # 3 chunks: 1000, 1000, 500
    hw = rl.Hardware("mem", {"bf16": 1e9, "fp16": 1e9, "tf32": 1e9, "fp32": 1e9}, 1.0, 50.0, 1.0, 1.0, 1.0)
    p = rl.predict("triton_chunked", n, h, v, "bf16", 1.0, hw, chunk_rows=m, dw_accum="fp32")
    e = 2
    assert p.parts_ms["epilogue"] == pytest.approx(3 * n * v * e / 1e9 * 1e3)
    # dW: written on the first chunk, read and written on the other two, then cast once
    dw = sum(c * v * e + c * h * e for c in (1000, 1000, 500)) + v * h * 4 * (1 + 2 + 2)
    assert p.parts_ms["dw_gemm"] == pytest.approx(dw / 1e9 * 1e3)
    assert p.parts_ms["dw_cast"] == pytest.approx(v * h * (4 + 2) / 1e9 * 1e3)
    assert p.flops == 6 * n * h * v


def test_chunked_defaults_follow_the_shipped_strategy():
    # 192 MiB budget / (128256 x 2 B) = 784 rows -> 768 (multiple of 64); dW in place in bf16
    assert rl.default_chunk_rows(V, "bf16") == 768
    p = rl.predict("triton_chunked", N, H, V, "bf16", 1.0, exact())
    assert "chunks of 768" in p.notes and "dW accumulated in bf16" in p.notes and "dw_cast" not in p.parts_ms


def test_chunked_fp16_runs_in_fp32():
    p16 = rl.predict("triton_chunked", N, H, V, "fp16", 1.0, exact())
    p32 = rl.predict("triton_chunked", N, H, V, "fp32", 1.0, exact(), dw_accum="fp32")
    assert p16.parts_ms["fp16_casts"] == pytest.approx(V * H * 12 / 4000e9 * 1e3)
    assert p16.time_ms == pytest.approx(p32.time_ms + p16.parts_ms["fp16_casts"])


def test_chunked_compacts_ignored_rows():
    full = rl.predict("triton_chunked", N, H, V, "bf16", 1.0, exact(), chunk_rows=1024)
    half = rl.predict("triton_chunked", N, H, V, "bf16", 0.5, exact(), chunk_rows=1024)
    assert half.flops == full.flops / 2
    gemms = lambda p: p.parts_ms["logits_gemm"] + p.parts_ms["dx_gemm"]
    assert gemms(half) == pytest.approx(gemms(full) / 2, rel=1e-9)


def test_fused_atomic_traffic_is_the_issues_269_gb():
    p = rl.predict("triton_fused", N, H, V, "bf16", 1.0, exact(), block_n=128, block_v=128)
    atomic = 4 * (N * H * math.ceil(V / 128) + V * H * math.ceil(N / 128))
    assert atomic / 1e9 == pytest.approx(269, abs=1)
    assert p.bytes == 2 * atomic  # read-modify-write
    assert p.flops == 8 * N * H * V
    assert p.parts_ms["forward_tiles"] == pytest.approx(2 * N * H * V / 1000e12 * 1e3)
    assert p.parts_ms["backward_tiles"] == pytest.approx(max(6 * N * H * V / 1000e12, 2 * atomic / 4000e9) * 1e3)


def test_fused_defaults_to_the_shipped_backward_tile():
    from fused_objectives.kernels import configs
    cfg = configs.FUSED_CONFIGS[("backward", "half", 90)]
    assert rl.backward_tile("bf16", (9, 0)) == (cfg.block_n, cfg.block_v)
    shipped = rl.predict("triton_fused", N, H, V, "bf16", 1.0, exact())
    explicit = rl.predict("triton_fused", N, H, V, "bf16", 1.0, exact(), block_n=cfg.block_n, block_v=cfg.block_v)
    assert shipped.bytes == explicit.bytes


def test_liger_chunk_rows_and_all_tokens():
    p = rl.predict("liger", N, H, V, "bf16", 1.0, exact())
    assert "chunks of 256" in p.notes  # next_pow2(8192 / ceil(128256 / 4096))
    assert rl.predict("liger", N, H, V, "bf16", 0.5, exact()).time_ms == p.time_ms


def test_reference_runs_fp32_gemms():
    p = rl.predict("reference", N, H, V, "bf16", 1.0, exact(), eager_passes=0)
    assert p.parts_ms["gemms"] == pytest.approx(6 * N * H * V / 50e12 * 1e3, rel=1e-9)
    t = rl.predict("reference", N, H, V, "bf16", 1.0, exact(), eager_passes=0, tf32=True)
    assert t.parts_ms["gemms"] == pytest.approx(6 * N * H * V / 500e12 * 1e3, rel=1e-9)


def test_measured_rates_replace_the_spec_sheet():
    hw = rl.HARDWARE["h100"].measured({"gpu": "H100", "gemm_tflops": {"bf16": 600.0}, "bandwidth_gbs": 3000.0,
                                       "chunk_tflops": {"logits": {"256": 300.0, "1024": 500.0}}})
    assert hw.gemm_rate("bf16") == 600e12 and hw.bandwidth() == 3000e9
    assert rl.predict("bare_gemm", N, H, V, "bf16", 1.0, hw).time_ms == pytest.approx(6 * N * H * V / 600e12 * 1e3)
    # log-linear between measured chunk sizes: 512 is halfway from 256 to 1024
    assert rl._chunk_rate(hw, "logits", 512, 0.0) == pytest.approx(400e12)
    assert rl._chunk_rate(hw, "dx", 512, 7.0) == 7.0  # unmeasured kind: the default


def test_record_mapping_and_gpu_only():
    rec = dict(provider="fused-triton_chunked", device="cuda", **{"pass": "fwd_bwd"}, tokens=N, hidden=H, vocab=V,
               dtype="bf16", valid_tokens=N // 2, time_ms=30.0)
    machine = {"gpu": "NVIDIA H200"}
    assert rl.predict_record(rec, machine) == pytest.approx(
        rl.predict("triton_chunked", N, H, V, "bf16", 0.5, rl.HARDWARE["h200"]).time_ms)
    assert rl.predict_record({**rec, "device": "cpu"}, machine) is None
    assert rl.predict_record({**rec, "pass": "fwd"}, machine) is None
    assert rl.predict_record(rec, {"gpu": "Tesla T4"}) is None
    # the chooser takes the chunked strategy for the bench's scalar (mean) loss
    chooser = rl.predict_record({**rec, "provider": "fused", "backend": "triton"}, machine)
    assert chooser == rl.predict("triton_chunked", N, H, V, "bf16", 0.5, rl.HARDWARE["h200"]).time_ms
    per_token = rl.predict_strategy("triton", N, H, V, "bf16", 0.5, rl.HARDWARE["h200"], per_token=True)
    assert per_token.time_ms == min(rl.predict(s, N, H, V, "bf16", 0.5, rl.HARDWARE["h200"]).time_ms
                                    for s in ("triton_chunked", "triton_fused"))
    assert rl.strategy_of({"provider": "fused", "backend": "cpu"}) is None
    assert rl.strategy_of({"provider": "liger"}) == "liger"


def test_bench_table_prints_the_prediction_beside_gpu_rows():
    rec = dict(preset="llama3-8b", tokens=N, hidden=H, vocab=V, dtype="bf16", objective="nll", ignored_fraction=0.0,
               provider="bare_gemm", backend=None, status="baseline", reason="", correct=None, max_rel_error=None,
               tolerance=None, speedup_vs_reference=None, matmul_ratio=1.0, tflops=700.0, peak_mem_mb=None,
               extra_mem_mb=None, time_ms=36.0, repeats=3, device="cuda", valid_tokens=N, **{"pass": "fwd_bwd"})
    want = rl.predict("bare_gemm", N, H, V, "bf16", 1.0, rl.HARDWARE["h100"]).time_ms
    gpu = report.table([rec], {"gpu": "NVIDIA H100 80GB HBM3"})
    assert "roofline" in gpu and f"{want:.1f}" in gpu
    assert f"{want:.1f}" not in report.table([{**rec, "device": "cpu"}], {"cpu": "x"})


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="strategy"):
        rl.predict("nope", N, H, V)
    with pytest.raises(ValueError, match="dtype"):
        rl.predict("bare_gemm", N, H, V, "int8")
    with pytest.raises(ValueError, match="valid_fraction"):
        rl.predict("bare_gemm", N, H, V, "bf16", 1.5)
    with pytest.raises(ValueError, match="Tesla"):
        rl.hardware_for("Tesla T4")
