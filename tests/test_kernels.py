"""Properties of the Triton kernels beyond their numbers: no [N, V] tensor, skipped work, launch paths,
configs that fit the GPUs' shared memory, the TF32 switch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_objectives as fo
from fused_objectives.kernels import configs
from helpers import assert_no_worse, ground_truth, make_inputs, naive_same_dtype, run

REPO = Path(__file__).resolve().parents[1]
interpreter_only = pytest.mark.skipif(not configs.interpreting(), reason="counts the interpreter's tl.dot calls")
# CPU tensors through the Triton backends: the interpreter only (tests/test_gpu.py covers CUDA)
cpu_tensors = pytest.mark.skipif(not configs.interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes) any ATen op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


# The dispatch mode sees the Triton launchers' allocations; the CPU backend's C++ operators and
# budgeted chunk buffers are checked with the profiler in test_cpu_backend.py.  The chunked
# strategies hold one budgeted [rows, V] buffer: a budget of 8 rows keeps it far below N * V.
@cpu_tensors
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("objective", ["nll", "nll_top:0.3"])
@pytest.mark.parametrize("fused_backend", ["triton_fused", "triton_chunked", "triton"])
def test_no_tokens_by_vocab_tensor(monkeypatch, fused_backend, objective, reduction):
    N, H, V = 64, 8, 400  # N*V = 25600 dwarfs N*H = 512, V*H = 3200 and the split buffers
    monkeypatch.setattr(configs, "CHUNK_BUDGET_BYTES", 8 * V * 4)
    h, w, t, b = make_inputs(N=N, H=H, V=V, bias=True, peaked=3.0)
    h, w, b = h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    up = torch.randn(N) if reduction == "none" else 1.0
    with LargestAllocation() as fused:
        (fo.linear_objective_loss(h, w, t, b, objective=objective, reduction=reduction,
                                  backend=fused_backend) * up).sum().backward()
    # (under the interpreter, argument storages are copied too: the weight's is 12,800 bytes)
    assert fused.largest < N * V * 4 // 4, f"fused path allocated a tensor of {fused.largest} bytes"
    with LargestAllocation() as ref:
        fo.linear_objective_loss(h, w, t, b, objective=objective, backend="reference").backward()
    assert ref.largest >= N * V * 4  # the detector sees the reference's fp32 logits


def _check_triton(h, w, t, b=None, **kw):
    fused = run(h, w, t, b, backend="triton_fused", **kw)
    assert_no_worse(fused, naive_same_dtype(h, w, t, b, **kw), ground_truth(h, w, t, b, **kw))


@cpu_tensors
@pytest.mark.parametrize("target_programs", [1, 10_000], ids=["one-split", "many-splits"])
def test_vocabulary_split_paths(monkeypatch, target_programs):
    monkeypatch.setattr(configs, "TARGET_PROGRAMS", target_programs)
    h, w, t, b = make_inputs(N=20, H=16, V=150, bias=True, peaked=5.0)
    _check_triton(h, w, t, b, objective="neg_p")
    # argmax across splits: ties and a max in the last split
    w2 = w.clone()
    w2[149] = w2[0] = 3 * h[0] / h[0].norm()
    t2 = t.clone()
    t2[0] = 0
    _, stats = fo.linear_objective_loss(h, w2, t2, backend="triton_fused", return_stats=True)
    _, ref = fo.linear_objective_loss(h, w2, t2, backend="reference", return_stats=True)
    assert stats.accuracy.item() == ref.accuracy.item()


@cpu_tensors
def test_dw_slabs(monkeypatch):
    # a half-precision weight accumulates dW in fp32 one vocabulary slab at a time
    monkeypatch.setattr(configs, "DW_SLAB_BYTES", 4 * 16 * 32)  # 32 rows of H=16 -> 5 slabs for V=150
    h, w, t, b = make_inputs(N=20, H=16, V=150, bias=True, dtype=torch.float16, peaked=4.0)
    _check_triton(h, w, t, b, objective="nll")


def _count_dots(monkeypatch):
    import triton.runtime.interpreter as interp

    calls = []
    original = interp.InterpreterBuilder.create_dot

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", counting)
    return calls


@interpreter_only
def test_ignored_and_gated_tokens_cost_no_dots(monkeypatch):
    calls = _count_dots(monkeypatch)
    N, H, V = 64, 16, 64
    h, w, t, _ = make_inputs(N=N, H=H, V=V, ignore_frac=0.0)
    counts = {}
    for name, tt, obj in [("all", t, "nll"), ("half-ignored", torch.where(torch.arange(N) % 2 == 0, t, -100), "nll"),
                          ("all-gated-out", t, "nll_top:1.0")]:
        ww = w.clone().requires_grad_()
        calls.clear()
        fo.linear_objective_loss(h, ww, tt, objective=obj, backend="triton_fused").backward()
        counts[name] = len(calls)
    # 16-token blocks: half the tokens -> half the blocks; a gate keeping nothing -> no backward dots
    tiles = (V // 32) * (N // 16)  # one H block per tile
    assert counts["all"] == tiles * 3  # forward logits; backward recompute and dW (hidden is frozen)
    assert counts["half-ignored"] * 2 == counts["all"]
    assert counts["all-gated-out"] == tiles  # forward only


@interpreter_only
def test_frozen_weight_skips_dw_dots(monkeypatch):
    calls = _count_dots(monkeypatch)
    h, w, t, _ = make_inputs(N=32, H=16, V=64, ignore_frac=0.0)
    counts = {}
    for name, need_h, need_w in [("both", True, True), ("frozen-weight", True, False), ("frozen-hidden", False, True)]:
        hh, ww = h.clone().requires_grad_(need_h), w.clone().requires_grad_(need_w)
        calls.clear()
        fo.linear_objective_loss(hh, ww, t, backend="triton_fused").backward()
        counts[name] = len(calls)
    tiles = (32 // 16) * (64 // 32)
    assert counts["both"] == tiles * 4  # forward logits, backward recompute, dX, dW
    assert counts["frozen-weight"] == tiles * 3
    assert counts["frozen-hidden"] == tiles * 3


def _python(code: str, env_update: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, fused_objectives as fo\n"
            "h = torch.randn(4, 8); w = torch.randn(10, 8); t = torch.randint(0, 10, (4,))\n"
            "try:\n    fo.linear_objective_loss(h, w, t, backend='triton')\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    out = _python(code, {})
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_import_is_light():
    code = ("import sys, fused_objectives\n"
            "print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))\n")
    out = _python(code, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_tf32_switch_reads_the_new_api_first(monkeypatch):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"  # after this, torch 2.13 raises on reading allow_tf32
        assert configs.dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert configs.dot_precision(torch.float32) == "ieee"
        assert configs.dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = old



@cpu_tensors
@pytest.mark.parametrize("key", sorted(configs.FUSED_CONFIGS), ids=lambda k: "-".join(map(str, k)))
def test_every_gpu_tile_config_computes_the_same(monkeypatch, key):
    # the compiled GPU tile shapes, run by the interpreter: masking and slab logic at the real block
    # sizes (N, V, H smaller than one block, and not multiples of it)
    pass_, kind, _arch = key
    cfg = configs.FUSED_CONFIGS[key]
    monkeypatch.setattr(configs, f"{pass_}_config", lambda *a, **k: cfg)
    dtype = torch.float16 if kind == "half" else torch.float32
    h, w, t, b = make_inputs(N=70, H=40, V=150, bias=True, peaked=4.0, dtype=dtype)
    _check_triton(h, w, t, b, objective="neg_p", softcap=6.0)


@cpu_tensors
def test_gpu_row_kernel_configs_compute_the_same(monkeypatch):
    # the row kernels at their compiled block sizes (one 2048-wide row per program; 4 x 1024 dz tiles)
    monkeypatch.setattr(configs, "rows_config", lambda: configs.ROWS_DEFAULT)
    monkeypatch.setattr(configs, "dz_config", lambda: configs.DZ_DEFAULT)
    h, w, t, b = make_inputs(N=9, H=16, V=2500, bias=True, peaked=6.0)
    for kw in (dict(), dict(reduction="none", upstream=torch.randn(9))):
        fused = run(h, w, t, b, backend="triton_chunked", objective="nll", softcap=7.0, **kw)
        assert_no_worse(fused, naive_same_dtype(h, w, t, b, objective="nll", softcap=7.0, **kw),
                        ground_truth(h, w, t, b, objective="nll", softcap=7.0, **kw))
