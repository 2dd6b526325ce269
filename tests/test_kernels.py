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


# ---------------------------------------------------------------- backend contract v2, called directly
# The fused strategy's forward rows (lse, entropy, dotz = sum_j u_j z_j) and its backward with the
# coefficient rows (c, b, g) of sum_i c_i logp_i + b_i lse_i + g_i dotz_i, against float64 written from
# the definitions (fused_objectives/backends/__init__.py): z materialised in float64, gradients by torch.autograd.

def _fused_backend():
    from fused_objectives.backends import _FUSED
    return _FUSED["triton_fused"]


def _truth64(h, w, b, t, scale, cap, u, coef):
    """float64 (logp, lse, entropy, dotz, argmax) and the gradients of sum c logp + b lse + g dotz."""
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    z = hd @ wd.T
    if bd is not None:
        z = z + bd
    if scale is not None:
        z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, dim=1)
    logp = z.gather(1, t.clamp(0, w.shape[0] - 1)[:, None])[:, 0] - lse
    p = torch.softmax(z, dim=1)
    entropy = -(p * torch.log_softmax(z, dim=1)).sum(dim=1)
    dotz = z @ u.double() if u is not None else None
    c = coef.double().reshape(-1, h.shape[0])
    total = (c[0] * logp).sum()
    if c.shape[0] > 1:
        total = total + (c[1] * lse).sum()
    if c.shape[0] > 2:
        total = total + (c[2] * dotz).sum()
    total.backward()
    return dict(logp=logp.detach(), lse=lse.detach(), entropy=entropy.detach(),
                dotz=None if dotz is None else dotz.detach(), argmax=z.argmax(dim=1),
                dx=hd.grad, dw=wd.grad, db=None if bd is None else bd.grad)


def _close(name, got, want, rtol):
    err = (got.double() - want).abs().max().item()
    bound = rtol * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


def _terms_case(N=21, H=17, V=70, terms=3, seed=0):
    """Inputs plus coefficients whose rows exercise every activity pattern: token 0 invalid (all zero),
    token 1 valid with all-zero coefficients (junk target and state: must not be read), token 2 only
    b, token 3 only g (when there is a g), the rest random."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    t = torch.randint(0, V, (N,), generator=g)
    h = h + 4.0 * torch.rand(N, 1, generator=g) * w[t] * H ** 0.5  # p(target) from ~0 to ~1
    valid = torch.ones(N, dtype=torch.bool)
    valid[0] = False
    t[0] = -100
    u = torch.rand(V, generator=g) + 0.5  # class-weight-like dot vector
    coef = torch.randn(terms, N, generator=g)
    coef[:, 0] = 0
    coef[:, 1] = 0
    if terms > 1:
        coef[:, 2] = torch.tensor([0.0, 0.7, 0.0][:terms])
    if terms > 2:
        coef[:, 3] = torch.tensor([0.0, 0.0, -0.4])
    return h, w, t, valid, u, coef if terms > 1 else coef[0]


@cpu_tensors
@pytest.mark.parametrize("terms", [1, 2, 3], ids=["c", "c-b", "c-b-g"])
@pytest.mark.parametrize("transforms", [False, True], ids=["plain", "bias-scale-softcap"])
@pytest.mark.parametrize("target_programs", [1, 10_000], ids=["one-split", "many-splits"])
def test_fused_backend_coefficient_rows_against_float64(monkeypatch, terms, transforms, target_programs):
    # V = 70: not a multiple of the interpreter's 32-wide tile; many splits merge the forward's partial
    # rows (dotz partials add) across vocabulary splits
    from fused_objectives.options import LogitOptions

    monkeypatch.setattr(configs, "TARGET_PROGRAMS", target_programs)
    h, w, t, valid, u, coef = _terms_case(terms=terms)
    b = torch.randn(w.shape[0]) * 0.5 if transforms else None
    scale, cap = (0.8, 6.0) if transforms else (None, None)
    dot = u if terms == 3 else None
    be = _fused_backend()
    logp, state, argmax, rows = be.forward(h, w, b, t, valid, LogitOptions(logit_scale=scale, softcap=cap),
                                           row_stats=True, dot=dot)
    assert rows.shape == (3, h.shape[0]) and rows.dtype == torch.float32
    want = _truth64(h, w, b, t, scale, cap, dot, coef)
    _close("logp", logp[valid], want["logp"][valid], 1e-6)
    _close("lse", rows[0][valid], want["lse"][valid], 1e-6)
    _close("entropy", rows[1][valid], want["entropy"][valid], 1e-5)
    if dot is not None:
        _close("dotz", rows[2][valid], want["dotz"][valid], 1e-6)
    assert torch.equal(argmax[valid], want["argmax"][valid])
    # token 1: all-zero coefficients; its target and state must not be read
    t_bad, state_bad = t.clone(), state.clone()
    t_bad[1] = 10 ** 6
    state_bad[:, 1] = float("nan")
    dx, dw, db = be.backward(h, w, b, t_bad, state_bad, coef, LogitOptions(logit_scale=scale, softcap=cap),
                             (True, True, b is not None), dot=dot)
    assert dx.dtype == h.dtype and dw.dtype == w.dtype
    _close("dx", dx, want["dx"], 2e-6)
    _close("dw", dw, want["dw"], 2e-6)
    if b is not None:
        _close("db", db, want["db"], 2e-6)
    else:
        assert db is None


@cpu_tensors
def test_fused_backend_terms_skip_inactive_and_partial_needs():
    # an all-zero token computes nothing: with only such tokens the gradients are exact zeros; a token
    # with only b (or only g) non-zero is active
    from fused_objectives.options import LogitOptions

    h, w, t, valid, u, coef = _terms_case(terms=3)
    opts = LogitOptions()
    be = _fused_backend()
    _, state, _, _ = be.forward(h, w, None, t, valid, opts, dot=u)
    zero = torch.zeros_like(coef)
    dx, dw, db = be.backward(h, w, None, t, state, zero, opts, (True, True, False), dot=u)
    assert db is None and not dx.any() and not dw.any()
    only_b = zero.clone()
    only_b[1, 5] = 1.0
    dx, dw, _ = be.backward(h, w, None, t, state, only_b, opts, (True, False, False), dot=u)
    want = _truth64(h, w, None, t, None, None, u, only_b)
    assert dw is None
    assert dx[5].abs().max() > 0 and not torch.cat([dx[:5], dx[6:]]).any()
    _close("dx (only b)", dx, want["dx"], 2e-6)


@cpu_tensors
def test_fused_backend_b_term_keeps_confident_token_accuracy():
    # a confident token (1 - p ~ 1e-6) with a b term of the same size: the target column is
    # c (1 - p) + b p with 1 - p from the forward's log p; 1 - p from the recomputed fp32 tile would be
    # all rounding (~6e-8 absolute: percents of the gradient)
    from fused_objectives.options import LogitOptions

    N, H, V = 3, 48, 40
    g = torch.Generator().manual_seed(3)
    w = torch.linalg.qr(torch.randn(H, V, generator=g, dtype=torch.float64))[0].T.float()  # orthonormal rows
    t = torch.tensor([5, 17, 33])
    # z = a at the target, ~0 elsewhere: 1 - p ~ (V - 1) exp(-a) ~ 1e-6 .. 1e-5
    h = torch.tensor([[16.0], [17.0], [18.0]]) * w[t] + 1e-3 * torch.randn(N, H, generator=g)
    valid = torch.ones(N, dtype=torch.bool)
    coef = torch.stack([torch.ones(N), torch.full((N,), 1e-6)])
    opts = LogitOptions()
    be = _fused_backend()
    logp, state, _, _ = be.forward(h, w, None, t, valid, opts)
    want = _truth64(h, w, None, t, None, None, None, coef)
    one_minus_p = -torch.expm1(want["logp"])
    assert one_minus_p.max() < 1e-4, one_minus_p  # really confident
    dx, dw, _ = be.backward(h, w, None, t, state, coef, opts, (True, True, False))
    for i in range(N):
        _close(f"dx row {i}", dx[i], want["dx"][i], 1e-3)
    _close("dw", dw, want["dw"], 1e-3)


@cpu_tensors
def test_fused_backend_rejects_bad_coefficient_shapes():
    from fused_objectives.options import LogitOptions

    h, w, t, valid, u, coef = _terms_case(terms=3)
    be = _fused_backend()
    _, state, _, _ = be.forward(h, w, None, t, valid, LogitOptions())
    with pytest.raises(ValueError, match="dot"):
        be.backward(h, w, None, t, state, coef, LogitOptions(), (True, False, False))  # [3, N] without dot
    with pytest.raises(ValueError, match="dot"):
        be.backward(h, w, None, t, state, coef[:2], LogitOptions(), (True, False, False), dot=u)
    with pytest.raises(ValueError, match="dot must be a"):
        be.forward(h, w, None, t, valid, LogitOptions(), dot=u[:-1])
    with pytest.raises(ValueError, match=r"\[N\], \[2, N\] or \[3, N\]"):
        be.backward(h, w, None, t, state, torch.zeros(4, h.shape[0]), LogitOptions(), (True, False, False))


@cpu_tensors
@pytest.mark.parametrize("fwd,bwd", [("FORWARD_ENTROPY_HALF", "BACKWARD_IEEE_TERMS_SM90"),
                                     ("FORWARD_ENTROPY_TF32_SM80", "BACKWARD_HALF_SM90")])
def test_terms_gpu_tile_configs_compute_the_same(monkeypatch, fwd, bwd):
    # the GPU tile shapes the dot forward and the terms backward get (configs.ENTROPY_FORWARD_CONFIGS,
    # TERMS_BACKWARD_CONFIGS), run by the interpreter: masking at the real block sizes
    from fused_objectives.options import LogitOptions

    monkeypatch.setattr(configs, "forward_config", lambda *a, **k: getattr(configs, fwd))
    monkeypatch.setattr(configs, "backward_config", lambda *a, **k: getattr(configs, bwd))
    h, w, t, valid, u, coef = _terms_case(N=70, H=40, V=150, terms=3)
    b = torch.randn(150) * 0.5
    opts = LogitOptions(logit_scale=0.9, softcap=6.0)
    be = _fused_backend()
    logp, state, _, rows = be.forward(h, w, b, t, valid, opts, row_stats=True, dot=u)
    want = _truth64(h, w, b, t, 0.9, 6.0, u, coef)
    _close("logp", logp[valid], want["logp"][valid], 1e-6)
    _close("entropy", rows[1][valid], want["entropy"][valid], 1e-5)
    _close("dotz", rows[2][valid], want["dotz"][valid], 1e-6)
    dx, dw, db = be.backward(h, w, b, t, state, coef, opts, (True, True, True), dot=u)
    for name, got in (("dx", dx), ("dw", dw), ("db", db)):
        _close(name, got, want[name], 2e-6)
