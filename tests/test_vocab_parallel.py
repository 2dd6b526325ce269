"""Vocabulary-parallel loss (fused_objectives/parallel.py) on gloo ranks on CPU: the sharded result
equals float64 truth computed from the definitions on the full, unsharded weight (the wrapper
called directly), or the same call / model without sharding (the functional API, a patched tiny
Llama with a ColwiseParallel head, FSDP2 x TP).

The two ranks are started once per module (``_results``): every 2-rank case runs in the same two
processes and rank 0 saves what each test then checks; the 4-rank (dp, tp) mesh is one more start
(marked slow).
"""
import os
import socket
import traceback

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from fused_objectives.options import LogitOptions  # noqa: E402
from fused_objectives.parallel import is_dtensor  # noqa: E402

WORLD = 2


# ----------------------------------------------------------------------------- float64 truth
def _logits64(h, w, b, opts):
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if opts.logit_scale is not None:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


def _stats64(h, w, b, t, opts, u):
    """float64 ``(logp, lse, entropy, dotz, argmax)`` of every row (target clamped into range)."""
    z = _logits64(h, w, b, opts)
    lse = torch.logsumexp(z, -1)
    ls = z - lse[:, None]
    logp = ls.gather(1, t.clamp(0, w.shape[0] - 1)[:, None])[:, 0]
    ent = -(ls.exp() * ls).sum(-1)
    dotz = z @ u.double()
    return logp, lse, ent, dotz, z.argmax(-1)


def _grads64(h, w, b, t, valid, coef, opts, u):
    """float64 gradients of ``sum_i valid_i (c_i logp_i + b_i lse_i + g_i dotz_i)``."""
    leaves = [x.detach().double().requires_grad_() for x in (h, w)] + (
        [] if b is None else [b.detach().double().requires_grad_()])
    logp, lse, _, dotz, _ = _stats64(leaves[0], leaves[1], leaves[2] if b is not None else None, t, opts, u)
    c, bb, g = coef.double()
    total = torch.where(valid, c * logp + bb * lse + g * dotz, torch.zeros((), dtype=torch.float64)).sum()
    grads = torch.autograd.grad(total, leaves)
    return list(grads) + ([None] if b is None else [])


class _Float64Inner:
    """A contract-v2 backend on materialised float64 logits (the shard's own truth): what the
    wrapper wraps in the direct tests, so they check the combination across ranks alone."""

    name = "float64"

    def unavailable_reason(self, device):
        return None

    def forward(self, hidden, weight, bias, target, valid, opts, row_stats=False, dot=None):
        u = dot if dot is not None else torch.ones(weight.shape[0])
        logp, lse, ent, dotz, am = _stats64(hidden, weight, bias, target, opts, u)
        return logp.float(), lse.float(), am, torch.stack([lse, ent, dotz]).float()

    def backward(self, hidden, weight, bias, target, state, coef, opts, needs, dot=None):
        coef = coef if coef.dim() == 2 else coef[None]
        coef = torch.cat([coef, torch.zeros(3 - coef.shape[0], coef.shape[1])])
        u = dot if dot is not None else torch.zeros(weight.shape[0])
        valid = torch.ones(target.shape[0], dtype=torch.bool)
        dx, dw, db = _grads64(hidden, weight, bias, target, valid, coef, opts, u)
        cast = [None if g is None or not n else g.to(x.dtype) for g, n, x in zip((dx, dw, db), needs, (hidden, weight, bias))]
        return tuple(cast)


# ----------------------------------------------------------------------------- the cases (run on every rank)
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _shard(mesh, x):
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(x, mesh, [Shard(0)])


def _inputs(n, h, v, seed, dtype=torch.float32, confident=False):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if confident:  # orthonormal rows, hidden = 20 * its target's row: 1 - p around (V - 1) e^-20
        w = torch.linalg.qr(torch.randn(h, v, generator=g, dtype=torch.float64))[0].T.to(dtype)
        hid = (20.0 * w[t].double() + 0.01 * torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype)
        b = b * 0.01
    valid = torch.ones(n, dtype=torch.bool)
    valid[1:2] = False
    t = torch.where(valid, t, torch.full_like(t, -100))
    coef = torch.randn(3, n, generator=g)
    coef[:, ~valid] = 0
    return hid, w, b, t, valid, coef


def _direct(mesh, n, h, v, opts, seed, confident=False, with_bias=True):
    """Wrapper forward/backward vs float64 truth on the full weight: pairs (got, want)."""
    from fused_objectives.parallel import localize

    hid, w, b, t, valid, coef = _inputs(n, h, v, seed, confident=confident)
    b = b if with_bias else None
    u = torch.rand(v, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    wd, bd = _shard(mesh, w), (None if b is None else _shard(mesh, b))
    out = {}
    for rs, dot, k in ((True, u, 3), (False, None, 1), (False, None, 2)):
        h_l, w_l, b_l, be = localize(hid, wd, bd, _Float64Inner())
        logp, state, am, rows = be.forward(h_l, w_l, b_l, t, valid, opts, row_stats=rs, dot=dot)
        c = coef[:k] if k > 1 else coef[0]
        dx, dw, db = be.backward(h_l, w_l, b_l, t, state, c.contiguous(), opts, (True, True, b is not None), dot=dot)
        ref_logp, ref_lse, ref_ent, ref_dotz, ref_am = _stats64(hid, w, b, t, opts, u)
        full_coef = torch.cat([coef[:k], torch.zeros(3 - k, n)])
        rdx, rdw, rdb = _grads64(hid, w, b, t, valid, full_coef, opts, u if dot is not None else torch.zeros(v))
        lo, hi = be.offset, be.offset + be.size
        tag = f"rs={rs} coef rows={k}"
        out[f"logp {tag}"] = (logp[valid], ref_logp[valid].float())
        out[f"lse {tag}"] = (rows[0][valid], ref_lse[valid].float())
        out[f"argmax {tag}"] = (am[valid], ref_am[valid])
        if rs:
            out[f"entropy {tag}"] = (rows[1][valid], ref_ent[valid].float())
            out[f"dotz {tag}"] = (rows[2][valid], ref_dotz[valid].float())
        out[f"dx {tag}"] = (dx, rdx.float())
        out[f"dw {tag}"] = (dw, rdw[lo:hi].float())
        if b is not None:
            out[f"db {tag}"] = (db, rdb[lo:hi].float())
    return out


def _case_direct(rank, mesh):
    return _direct(mesh, n=10, h=6, v=7, opts=LogitOptions(), seed=0)  # 7 rows: 4 + 3


def _case_direct_transforms(rank, mesh):
    return _direct(mesh, n=9, h=5, v=11, opts=LogitOptions(logit_scale=-1.7, softcap=2.5), seed=1,
                   with_bias=False)


def _case_empty_shard(rank, mesh):
    return _direct(mesh, n=6, h=4, v=1, opts=LogitOptions(), seed=2)  # rows 1 + 0


def _case_argmax_tie(rank, mesh):
    """Rows 1 (first shard) and 6 (second shard) equal, both the maximum: the global argmax is the
    first index, as torch.argmax of the full logits gives."""
    from fused_objectives.parallel import localize

    hid, w, b, t, valid, _ = _inputs(5, 4, 8, seed=4)
    w[6] = w[1] = hid[0] * 3
    b[6] = b[1] = 0.0
    h_l, w_l, b_l, be = localize(hid, _shard(mesh, w), _shard(mesh, b), _Float64Inner())
    am = be.forward(h_l, w_l, b_l, t, valid, LogitOptions())[2]
    return {"argmax of row 0": (am[0], torch.tensor(1))}


def _case_confident(rank, mesh):
    """fp32 inputs with 1 - p ~ 1e-9: the combined log-probability (and so 1 - P in the gradient)
    keeps its relative accuracy, as the owner's own value has it."""
    from fused_objectives.parallel import localize

    n, h, v = 8, 8, 6
    hid, w, b, t, valid, coef = _inputs(n, h, v, 3, confident=True)
    opts = LogitOptions()
    h_l, w_l, b_l, be = localize(hid, _shard(mesh, w), _shard(mesh, b), _Float64Inner())
    logp, state, am, rows = be.forward(h_l, w_l, b_l, t, valid, opts)
    c = torch.ones(n)
    c[~valid] = 0
    dx, dw, db = be.backward(h_l, w_l, b_l, t, state, c, opts, (False, False, True))
    ref_logp = _stats64(hid, w, b, t, opts, torch.ones(v))[0]
    rdb = _grads64(hid, w, b, t, valid, torch.stack([c, torch.zeros(n), torch.zeros(n)]), opts, torch.zeros(v))[2]
    lo, hi = be.offset, be.offset + be.size
    # relative error of log p (about -1e-9): compare the ratio to 1
    return {"logp/ref": ((logp[valid].double() / ref_logp[valid]).float(), torch.ones(int(valid.sum()))),
            "db (target column 1 - P)": (db, rdb[lo:hi].float())}


# ----------------------------------------------------------------------------- the functional API
# (backend, keyword arguments): every objective kind, reduction and loss term on a Shard(0) weight
FUNCTIONAL = {
    "nll_mean": ("reference", dict(objective="nll")),
    "neg_p_sum_transforms": ("reference", dict(objective="neg_p", reduction="sum", softcap=3.0, logit_scale=0.8)),
    "gated_none": ("reference", dict(objective="neg_p_top:0.05", reduction="none")),
    "kept_stats_no_bias": ("reference", dict(objective="nll_bottom:0.5", normalize="kept", return_stats=True,
                                             bias=False)),
    "terms_mean": ("reference", dict(z_loss=1e-2, label_smoothing=0.1, class_weight=True, return_stats=True)),
    "terms_none_dtensor_hidden": ("reference", dict(reduction="none", z_loss=1e-3, label_smoothing=0.2,
                                                    hidden_dtensor=True)),
    "triton_fused_nll": ("triton_fused", dict(objective="nll", return_stats=True)),
    "triton_fused_terms": ("triton_fused", dict(objective="neg_p", reduction="sum", label_smoothing=0.1,
                                                class_weight=True, z_loss=1e-2, softcap=4.0)),
    "cpu_gated_stats": ("cpu", dict(objective="nll_top:0.1", return_stats=True, logit_scale=1.3)),
    "cpu_terms_none": ("cpu", dict(reduction="none", z_loss=1e-2, label_smoothing=0.1, class_weight=True)),
    "cpu_bf16": ("cpu", dict(objective="neg_p", dtype=torch.bfloat16, z_loss=1e-3)),
    "cpu_3d_shift": ("cpu", dict(shape=(2, 6), shift=True, return_stats=True)),
    "cpu_no_tokens": ("cpu", dict(shape=(0,), z_loss=1e-3)),
}
# bf16: both sides round the same bf16 GEMM inputs; the sharded dX adds the ranks' bf16 partials
TOLERANCE = {"cpu_bf16": dict(rtol=2e-2, atol=2e-3)}


def _functional(mesh, backend, kw):
    """Loss, statistics and gradients of ``linear_objective_loss`` with a Shard(0) DTensor weight vs
    the same call on the full weight in one process."""
    from torch.distributed.tensor import DTensor, Replicate

    from fused_objectives import linear_objective_loss

    kw = dict(kw)
    use_bias, hidden_dt = kw.pop("bias", True), kw.pop("hidden_dtensor", False)
    shape = kw.pop("shape", (12,))
    n, h, v = torch.Size(shape).numel(), 6, 9  # 9 rows: 5 + 4
    hid, w, b, t, valid, _ = _inputs(n, h, v, seed=5, dtype=kw.pop("dtype", torch.float32))
    hid, t = hid.reshape(*shape, h), t.reshape(shape)
    g = torch.Generator().manual_seed(6)
    if kw.get("class_weight") is True:
        kw["class_weight"] = torch.rand(v, generator=g) + 0.5
    upstream = torch.rand(shape, generator=g)
    out = {}

    def run(weight, bias, hidden):
        res = linear_objective_loss(hidden, weight, t, bias, backend=backend, **kw)
        loss, stats = res if kw.get("return_stats") else (res, None)
        (loss * upstream if kw.get("reduction") == "none" else loss).sum().backward()
        return loss, stats

    h0, w0 = hid.clone().requires_grad_(), w.clone().requires_grad_()
    b0 = b.clone().requires_grad_() if use_bias else None
    loss0, stats0 = run(w0, b0, h0)
    h1 = hid.clone().requires_grad_()
    w1 = _shard(mesh, w).requires_grad_()
    b1 = _shard(mesh, b).requires_grad_() if use_bias else None
    loss1, stats1 = run(w1, b1, DTensor.from_local(h1, mesh, [Replicate()]) if hidden_dt else h1)
    out["loss"] = (loss1, loss0)
    out["d hidden"] = (h1.grad, h0.grad)
    out["d weight"] = (w1.grad.full_tensor(), w0.grad)
    if use_bias:
        out["d bias"] = (b1.grad.full_tensor(), b0.grad)
    if stats0 is not None:
        for key in ("logp", "lse", "entropy", "predicted", "hit", "kept", "accuracy", "mean_p", "z_loss"):
            if getattr(stats0, key, None) is not None:
                out[f"stats.{key}"] = (stats1[key], stats0[key])
    return out


def _case_functional(rank, mesh):
    res = {}
    for name, (backend, kw) in FUNCTIONAL.items():
        try:
            res[name] = _functional(mesh, backend, kw)
        except Exception:
            res[name] = traceback.format_exc()
    return res


def _case_refusals(rank, mesh):
    """What localize refuses, with the message each rank gets (no collective is reached)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from fused_objectives import linear_objective_loss

    hid, w, b, t, _, _ = _inputs(4, 6, 9, seed=7)
    calls = {
        "Shard(1) weight": lambda: (hid, distribute_tensor(w, mesh, [Shard(1)]), None),
        "Partial weight": lambda: (hid, DTensor.from_local(w, mesh, [Partial()]), None),
        "Replicate weight": lambda: (hid, distribute_tensor(w, mesh, [Replicate()]), None),
        "sharded hidden": lambda: (distribute_tensor(hid, mesh, [Shard(0)]), _shard(mesh, w), None),
        "plain bias": lambda: (hid, _shard(mesh, w), b),
    }
    out = {}
    # double backward would differentiate the shard's own recomputed graph only: refused by name
    h_ = hid.clone().requires_grad_()
    w_ = _shard(mesh, w).requires_grad_()
    per_tok = linear_objective_loss(h_, w_, t, backend="reference", reduction="none")
    try:
        torch.autograd.grad(per_tok.sum(), h_, create_graph=True)
        out["double backward"] = "no error"
    except RuntimeError as e:
        out["double backward"] = f"RuntimeError: {e}"
    out["is_dtensor"] = f"{is_dtensor(w_)} {is_dtensor(w)}"
    for name, make in calls.items():
        h_, w_, b_ = make()
        try:
            linear_objective_loss(h_, w_, t, b_, backend="reference")
            out[name] = "no error"
        except ValueError as e:
            out[name] = f"ValueError: {e}"
        except Exception as e:  # reported as a failure by the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------- a patched HF model
def _tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=63,
                               tie_word_embeddings=False)  # 63 rows: uneven shards
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _llama_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 63, (2, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6] = -100
    return ids, labels, (labels[:, 1:] != -100).sum()


def _llama_reference(objective):
    """The unpatched, unsharded model on the whole batch, its objective computed from its own logits in
    float64 (independent of the patch): ``(model with gradients, loss)``."""
    ids, labels, n_items = _llama_batch()
    ref = _tiny_llama()
    logits = ref(input_ids=ids).logits
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    lp = torch.log_softmax(logits.double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]
    per = {"nll": -lp, "neg_p": -torch.expm1(lp)}[objective]
    loss = per.sum() / n_items
    loss.backward()
    return ref, loss.detach().float()


def _grad_pairs(model, ref, scale=1.0):
    out = {}
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor() if is_dtensor(p.grad) else p.grad
        out[f"grad {name}"] = (g * scale, q.grad)
    return out


def _case_llama_tp(rank, mesh):
    """A patched tiny Llama whose lm_head is ColwiseParallel (output Shard(-1), DTensor or local output;
    input replicated or sequence-sharded): every rank runs the whole batch; loss and every gradient
    equal the unsharded model's."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "skip: transformers is not installed"
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleOutput, parallelize_module

    import fused_objectives as fo

    ids, labels, n_items = _llama_batch()
    res = {}
    variants = (("neg_p", False, "reference", False), ("nll", True, "auto", False), ("neg_p", False, "auto", True))
    for objective, local_output, backend, seq_parallel in variants:
        ref, ref_loss = _llama_reference(objective)
        m = _tiny_llama()
        plan = {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=local_output)}
        if seq_parallel:
            # torchtitan's head input: the final norm's output sharded over the sequence; the head's
            # own input hook gathers it (Shard(1) -> Replicate) before the fused loss sees it
            plan = {"model.norm": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
                    "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1),
                                               use_local_output=local_output)}
        parallelize_module(m, mesh, plan)
        fo.patch_model(m, objective=objective, backend=backend)
        loss = m(input_ids=ids, labels=labels, num_items_in_batch=n_items).loss
        loss.backward()
        pairs = {"loss": (loss.detach(), ref_loss)}
        pairs.update(_grad_pairs(m, ref))
        res[f"{objective} local_output={local_output} backend={backend} seq_parallel={seq_parallel}"] = pairs
    return res


CASES = {name[6:]: fn for name, fn in dict(globals()).items() if name.startswith("_case_")}


def _worker(rank, port, out, names):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=180))
    torch.set_num_threads(1)
    try:
        mesh = _mesh()
        results = {}
        for name in names:
            torch.manual_seed(0)
            try:
                results[name] = CASES[name](rank, mesh)
            except Exception:
                results[name] = traceback.format_exc()
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def _results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("vocab_parallel") / "results.pt")
    mp.spawn(_worker, args=(_free_port(), out, list(CASES)), nprocs=WORLD, join=True)
    return torch.load(out)


def _check(result, rtol=1e-5, atol=1e-6):
    if isinstance(result, str):
        pytest.fail(result)
    for name, (got, want) in result.items():
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ["direct", "direct_transforms", "empty_shard", "argmax_tie"])
def test_wrapper_matches_unsharded_truth(_results, case):
    _check(_results[case])


def test_wrapper_keeps_confident_tokens_accurate(_results):
    _check(_results["confident"], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_sharded_weight_equals_unsharded(_results, name):
    _check(_results["functional"][name], **TOLERANCE.get(name, dict(rtol=2e-5, atol=2e-6)))


def test_unsupported_layouts_are_refused(_results):
    got = _results["refusals"]
    assert got.pop("is_dtensor") == "True False"
    double = got.pop("double backward")
    assert double.startswith("RuntimeError: ") and "double backward" in double, double
    for name, message in got.items():
        assert message.startswith("ValueError: "), (name, message)
    assert "Shard(dim=1)" in got["Shard(1) weight"] and "Shard(0)" in got["Shard(1) weight"]
    assert "Partial" in got["Partial weight"]
    assert "exactly one mesh dimension" in got["Replicate weight"]
    assert "hidden is a DTensor" in got["sharded hidden"] and "Replicate" in got["sharded hidden"]
    assert "bias is a plain tensor" in got["plain bias"]


def test_patched_llama_colwise_parallel_head_equals_unsharded(_results):
    got = _results["llama_tp"]
    if isinstance(got, str) and got.startswith("skip:"):
        pytest.skip(got[5:])
    assert isinstance(got, dict), got
    for name, pairs in got.items():
        _check(pairs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 2-D mesh (4 ranks)
MESH_2D = (2, 2)  # (dp, tp)


def _case2d_functional(rank, mesh):
    """Weight (Replicate, Shard(0)) on the (dp, tp) mesh: sharded over the tp dimension only."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fused_objectives import linear_objective_loss

    hid, w, b, t, _, _ = _inputs(10, 6, 11, seed=8)
    kw = dict(objective="neg_p", softcap=5.0, z_loss=1e-2, label_smoothing=0.1, return_stats=True)
    h0, w0, b0 = (x.clone().requires_grad_() for x in (hid, w, b))
    loss0, st0 = linear_objective_loss(h0, w0, t, b0, backend="reference", **kw)
    loss0.backward()
    h1 = hid.clone().requires_grad_()
    w1 = distribute_tensor(w, mesh, [Replicate(), Shard(0)]).requires_grad_()
    b1 = distribute_tensor(b, mesh, [Replicate(), Shard(0)]).requires_grad_()
    loss1, st1 = linear_objective_loss(h1, w1, t, b1, backend="reference", **kw)
    loss1.backward()
    return {"loss": (loss1, loss0), "d hidden": (h1.grad, h0.grad), "d weight": (w1.grad.full_tensor(), w0.grad),
            "d bias": (b1.grad.full_tensor(), b0.grad), "entropy": (st1.entropy, st0.entropy),
            "predicted": (st1.predicted, st0.predicted)}


def _case2d_llama_fsdp_tp(rank, mesh):
    """FSDP2 over dp (each dp rank its half of the batch) x ColwiseParallel lm_head over tp."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "skip: transformers is not installed"
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import fused_objectives as fo

    ids, labels, n_items = _llama_batch()
    ref, ref_loss = _llama_reference("neg_p")
    m = _tiny_llama()
    parallelize_module(m, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(m, mesh=mesh["dp"])
    fo.patch_model(m, objective="neg_p")  # backend "auto": the C++ cpu backend on each shard
    dp = mesh["dp"].get_local_rank()
    loss = m(input_ids=ids[dp:dp + 1], labels=labels[dp:dp + 1], num_items_in_batch=n_items).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=mesh["dp"].get_group())
    pairs = {"loss": (total, ref_loss)}
    pairs.update(_grad_pairs(m, ref, scale=MESH_2D[0]))  # FSDP averages the gradients over dp
    return pairs


CASES_2D = {name[8:]: fn for name, fn in dict(globals()).items() if name.startswith("_case2d_")}


def _worker2d(rank, port, out):
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=MESH_2D[0] * MESH_2D[1], timeout=timedelta(seconds=300))
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", MESH_2D, mesh_dim_names=("dp", "tp"))
        results = {}
        for name, fn in CASES_2D.items():
            try:
                results[name] = fn(rank, mesh)
            except Exception:
                results[name] = traceback.format_exc()
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_dimensional_mesh_fsdp2_x_tp(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "results2d.pt")
    mp.spawn(_worker2d, args=(_free_port(), out), nprocs=MESH_2D[0] * MESH_2D[1], join=True)
    results = torch.load(out)
    _check(results["functional"], rtol=2e-5, atol=2e-6)
    got = results["llama_fsdp_tp"]
    if isinstance(got, str) and got.startswith("skip:"):
        pytest.skip(got[5:])
    _check(got, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- single process
def test_import_does_not_import_dtensor():
    """``import fused_objectives`` and ``is_dtensor`` of a plain tensor import nothing of
    torch.distributed.tensor (a first call may: torch's own dynamo imports it)."""
    import subprocess
    import sys

    code = ("import sys, torch, fused_objectives as fo\n"
            "from fused_objectives.parallel import is_dtensor\n"
            "assert not is_dtensor(torch.zeros(2)) and not is_dtensor(None)\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch.distributed.tensor')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
