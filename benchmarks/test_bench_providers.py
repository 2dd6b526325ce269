"""pytest-benchmark suite: every available provider, forward+backward, on one LM-head shape.

    pytest benchmarks/ --benchmark-only                        # CPU: cpu-small at N=1024; CUDA: llama3-8b, N=8192, bf16
    FO_BENCH_SHAPE=4096,4096,128256 FO_BENCH_DTYPE=bf16 pytest benchmarks/ --benchmark-only

Each provider is checked against the float64 reference before it is timed; a wrong one fails its
test and is never timed (no figure a comparison could pick up).  ``fused-objectives bench`` is the
fuller tool (memory, bare-GEMM ratio, sweeps, JSON/CSV/plots); this suite plugs the same providers
into pytest-benchmark's statistics, history and comparison (``--benchmark-autosave``,
``--benchmark-compare``).
"""
import os

import pytest
import torch

from fused_objectives.bench.inputs import DTYPES, check, ground_truth, make_inputs, run_once, tolerance, worst_error
from fused_objectives.bench.presets import DEFAULT_CPU_PRESET, DEFAULT_GPU_PRESET, PRESETS
from fused_objectives.bench.providers import Problem, Reference, default_provider_names, get_provider

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shape():
    if os.environ.get("FO_BENCH_SHAPE"):
        try:
            n, h, v = (int(x) for x in os.environ["FO_BENCH_SHAPE"].split(","))
        except ValueError:
            raise pytest.UsageError(f"FO_BENCH_SHAPE must be N,H,V (integers), got {os.environ['FO_BENCH_SHAPE']!r}")
        return n, h, v, None
    p = PRESETS[DEFAULT_GPU_PRESET if DEVICE.type == "cuda" else DEFAULT_CPU_PRESET]
    return (8192 if DEVICE.type == "cuda" else p.tokens[-1]), p.hidden, p.vocab, p.softcap


N, H, V, SOFTCAP = _shape()
DTYPE = DTYPES[os.environ.get("FO_BENCH_DTYPE", "bf16" if DEVICE.type == "cuda" else "fp32")]
IGNORED = float(os.environ.get("FO_BENCH_IGNORED", "0"))


@pytest.fixture(scope="module")
def inputs():
    return {}


def _inputs(cache, objective):
    if objective not in cache:
        inp = make_inputs(N, H, V, DTYPE, DEVICE, IGNORED)
        chk = inp
        gt = ground_truth(chk, objective, SOFTCAP)
        ref_err = worst_error(run_once(Reference().build(DEVICE, DTYPE, Problem(objective, SOFTCAP)), chk), gt)
        cache[objective] = (inp, chk, gt, tolerance(DTYPE, ref_err, DEVICE))
    return cache[objective]


@pytest.mark.parametrize("objective", ["nll", "neg_p"])
@pytest.mark.parametrize("provider", default_provider_names(DEVICE))
def test_fwd_bwd(benchmark, inputs, provider, objective):
    prov = get_provider(provider)
    problem = Problem(objective, SOFTCAP)
    reason = prov.unavailable_reason(DEVICE, DTYPE, problem)
    if reason is not None:
        pytest.skip(reason)
    inp, chk, gt, tol = _inputs(inputs, objective)
    fn = prov.build(DEVICE, DTYPE, problem)
    ok, err, errs = check(run_once(fn, chk), gt, tol)
    assert ok, f"{provider} is wrong on {objective}: {errs} > {tol:.1e}; not timed"

    def step():
        inp.hidden.grad = inp.weight.grad = None
        fn(inp.hidden, inp.weight, inp.target).backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(shape=f"N={N} H={H} V={V}", dtype=str(DTYPE), max_rel_error=err,
                                backend=prov.label(DEVICE), gflop=6 * N * H * V / 1e9)
    benchmark.pedantic(step, rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=1, iterations=1)
