"""torch.compile(fullgraph=True) around the fused loss on CPU (issue 13, item 2).

The compiled loss and its gradients equal eager and a float64 truth written here from the
definition; the CPU target-range check still raises inside a compiled graph; a fresh process can
compile before any eager call (the C++ kernels' loader runs once at trace time, not in the graph).
"""
import os
import subprocess
import sys

import pytest
import torch

import fused_objectives as fo
from truth import logits64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _no_persistent_compile_caches():
    """Compile from the current code: the on-disk FX-graph / AOTAutograd caches key on the traced
    graph, not on a custom operator's Python autograd formula, so an edited formula could be
    served from a stale cache (seen while planting a bug in autograd.row_logprob_op's backward)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def truth64(hidden, weight, target, bias, objective, reduction, softcap, logit_scale, ignore_index=-100):
    """The definition in float64: log_softmax of the (scaled, soft-capped) logits at the target."""
    z = logits64(hidden, weight, bias, softcap=softcap, logit_scale=logit_scale)
    valid = target != ignore_index
    lp = torch.log_softmax(z, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    per = -lp if objective == "nll" else 1 - lp.exp()  # neg_p: 1 - p
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    return per.sum() / valid.sum() if reduction == "mean" else per.sum()


def inputs(seed=0, B=2, T=7, H=24, V=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :2] = -100
    return h, w, b, t


def grads_of(fn, h, w, b, t, upstream):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    hh, ww = leaves[:2]
    bb = leaves[2] if b is not None else None
    loss = fn(hh, ww, bb, t)
    (loss * upstream).sum().backward()
    return [loss.detach()] + [x.grad for x in leaves]


CASES = [  # backend, objective, reduction, bias, softcap, logit_scale
    ("auto", "neg_p", "mean", False, None, None),  # CPU: 'auto' -> 'cpu', eager takes gradients-in-forward
    ("auto", "nll", "none", True, 3.0, 0.7),
    ("reference", "neg_p", "sum", False, None, None),
]


@pytest.mark.parametrize("backend,objective,reduction,bias,softcap,logit_scale", CASES)
def test_fullgraph_loss_equals_eager_and_truth(backend, objective, reduction, bias, softcap, logit_scale):
    torch._dynamo.reset()
    h, w, b, t = inputs(bias=bias)
    kw = dict(objective=objective, reduction=reduction, softcap=softcap, logit_scale=logit_scale, backend=backend)

    def loss_fn(h, w, b, t):
        return fo.linear_objective_loss(h, w, t, b, **kw)

    upstream = torch.linspace(0.5, 1.5, t.numel()).reshape(t.shape) if reduction == "none" else torch.tensor(1.0)
    compiled = grads_of(torch.compile(loss_fn, fullgraph=True), h, w, b, t, upstream)
    eager = grads_of(loss_fn, h, w, b, t, upstream)
    exact = grads_of(lambda h, w, b, t: truth64(h.double(), w.double(), t, None if b is None else b.double(),
                                                objective, reduction, softcap, logit_scale),
                     h.double(), w.double(), None if b is None else b.double(), t, upstream.double())
    for c, e, x in zip(compiled, eager, exact):
        assert c.dtype == e.dtype
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.double(), x, rtol=1e-4, atol=1e-6)


def test_range_check_raises_inside_compiled_graph():
    torch._dynamo.reset()
    h, w, b, t = inputs()
    fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t, objective="neg_p"), fullgraph=True)
    fn(h, w, t)  # compiles; in range
    bad = t.clone()
    bad[1, 3] = w.shape[0]  # V: one past the vocabulary
    with pytest.raises(ValueError, match=r"target holds 50 at flat position 10, outside \[0, 50\)"):
        fn(h, w, bad)
    bad[1, 3] = -7
    with pytest.raises(ValueError, match=r"target holds -7 at flat position 10"):
        fn(h.requires_grad_(), w, bad)


FRESH = r"""
import torch, fused_objectives as fo
g = torch.Generator().manual_seed(0)
h = torch.randn(3, 16, generator=g, requires_grad=True); w = torch.randn(40, 16, generator=g, requires_grad=True)
t = torch.randint(0, 40, (3,), generator=g)
fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t), fullgraph=True, backend="aot_eager")
loss = fn(h, w, t); loss.backward()
ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, t)
assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
print("ok", loss.item())
"""


def test_fullgraph_in_fresh_process_before_any_eager_call():
    # the first use of backend 'cpu' happens while tracing: the loader must not end up in the graph
    env = dict(os.environ, FUSED_OBJECTIVES_QUIET="1")
    res = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def _tiny_llama(V=64):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()


def _llama_batch(V=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_patched_llama_compiles_without_extra_graph_breaks_and_equals_eager():
    from fused_objectives.integrations.hf import patch_model

    inp = _llama_batch()
    plain = _tiny_llama()
    torch._dynamo.reset()
    breaks_plain = torch._dynamo.explain(lambda **k: plain(**k).loss)(**inp).graph_break_count
    with torch.no_grad():  # float64 truth of neg_p (loss 1 - p) from the unpatched model's logits
        logits = plain(**{k: v for k, v in inp.items() if k != "labels"}).logits.double()
    target = torch.cat([inp["labels"][:, 1:], torch.full_like(inp["labels"][:, :1], -100)], 1)
    valid = target != -100
    p = torch.softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    truth = (1 - p)[valid].mean()

    model = patch_model(_tiny_llama(), objective="neg_p")
    torch._dynamo.reset()
    breaks_patched = torch._dynamo.explain(lambda **k: model(**k).loss)(**inp).graph_break_count
    assert breaks_patched <= breaks_plain, (breaks_patched, breaks_plain)

    def step(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(**inp)
        loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
        return loss.detach(), grads

    torch._dynamo.reset()
    eager_loss, eager_grads = step(lambda **k: model(**k).loss)
    compiled = torch.compile(lambda **k: model(**k).loss, fullgraph=True)
    step(compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the patch's state must not defeat the guards
        comp_loss, comp_grads = step(compiled)
    torch.testing.assert_close(comp_loss.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(comp_grads) == set(eager_grads) and len(comp_grads) == len(list(model.parameters()))
    scale = max(g.abs().max().item() for g in eager_grads.values())
    for k in eager_grads:
        torch.testing.assert_close(comp_grads[k], eager_grads[k], rtol=0, atol=1e-5 * scale, msg=k)


def _neg_p_with_graph_break(logp):
    torch._dynamo.graph_break()  # e.g. a family or an objective that dynamo cannot trace
    return 1 - logp.exp()


def test_patched_llama_with_a_graph_break_compiles_and_equals_eager():
    # a graph break inside the patched forward used to recurse forever (the resumed frame resolved the
    # model's bound forward to the patched one again)
    from fused_objectives.integrations.hf import patch_model

    inp = _llama_batch()
    model = patch_model(_tiny_llama(), objective=_neg_p_with_graph_break)
    torch._dynamo.reset()
    eager = model(**inp).loss
    compiled = torch.compile(lambda **k: model(**k).loss)(**inp)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_compiled_patched_model_still_refuses_an_undeclared_logits_transform():
    transformers = pytest.importorskip("transformers")
    from fused_objectives.integrations.hf import patch_model

    class ScaledLlama(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            h = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(h) * 3.0  # not declared by the config
            loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    model = ScaledLlama(_tiny_llama().config).train()
    patch_model(model, objective="nll")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="transforms the logits between its head and its loss"):
        torch.compile(lambda **k: model(**k).loss, fullgraph=True)(**_llama_batch())


def test_fullgraph_stats_and_target_logprob_equal_truth():
    torch._dynamo.reset()
    h, w, b, t = inputs(seed=3)
    z = h.double() @ w.double().T
    valid = t != -100
    lp = torch.where(valid, torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    hit = valid & (z.argmax(-1) == t)

    loss, stats = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t, return_stats=True),
                                fullgraph=True)(h, w, t)
    torch.testing.assert_close(loss.double(), -lp[valid].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.logp.double(), lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.hit, hit) and int(stats.n_valid) == int(valid.sum())
    torch.testing.assert_close(stats.mean_p.double(), lp.exp()[valid].mean(), rtol=1e-5, atol=1e-6)
    got = torch.compile(lambda h, w, t: fo.target_logprob(h, w, t, backend="cpu"), fullgraph=True)(h, w, t)
    torch.testing.assert_close(got.double(), lp, rtol=1e-5, atol=1e-5)


def test_constant_marker_is_dynamos():
    """backends/cpu.py sets dynamo's assume_constant_result marker by hand (to keep torch._dynamo,
    and triton, out of the package import): fail if torch changes what the decorator does."""
    import torch._dynamo

    def f():
        return 0

    marked = torch._dynamo.assume_constant_result(f)
    assert marked is f and set(vars(f)) == {"_dynamo_marked_constant"} and f._dynamo_marked_constant is True


@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "triton_chunked", "triton_fused"])
def test_fullgraph_with_loss_terms(backend):
    """z_loss, label smoothing and class weights trace into the same graph (the row sums lse and
    u.z are outputs of the same operator) and equal eager and the float64 truth, on every backend:
    the fused ones run as the one operator pair fused_objectives::row_logprob(_backward), whose
    schema does not depend on the backend (the Triton ones under the interpreter here)."""
    import truth as T

    torch._dynamo.reset()
    h, w, b, t = inputs(bias=True, H=16, V=37)
    cw = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(4)) + 0.25
    kw = dict(objective="nll", z_loss=1e-2, label_smoothing=0.1, class_weight=cw, backend=backend)

    def loss_fn(h, w, b, t):
        return fo.linear_objective_loss(h, w, t, b, **kw)

    one = torch.tensor(1.0)
    compiled = grads_of(torch.compile(loss_fn, fullgraph=True), h, w, b, t, one)
    eager = grads_of(loss_fn, h, w, b, t, one)
    exact = T.truth(h, w, t, b, objective="nll", z_loss=1e-2, label_smoothing=0.1, class_weight=cw)
    for c, e, x in zip(compiled, eager, (exact["loss"], exact["dh"], exact["dw"], exact["db"])):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.double(), x, rtol=1e-4, atol=1e-6)


def test_class_weight_check_raises_inside_compiled_graph():
    torch._dynamo.reset()
    h, w, b, t = inputs()
    fn = torch.compile(lambda h, w, t, cw: fo.linear_objective_loss(h, w, t, class_weight=cw, backend="reference"),
                       fullgraph=True)
    cw = torch.ones(w.shape[0])
    fn(h, w, t, cw)  # compiles
    cw[7] = -0.5
    with pytest.raises(ValueError, match=r"class_weight must be finite and >= 0, got -0.5 at index 7"):
        fn(h, w, t, cw)


def test_compiled_graph_holds_the_shared_operators():
    """Under compile a fused backend is one opaque operator pair, not traced launcher code."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    h, w, b, t = inputs(H=16, V=37)
    fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t, backend="triton_chunked", reduction="none"),
                       backend=rec, fullgraph=True)
    fn(h, w, t)
    code = rec.graphs[0].code
    assert "fused_objectives.row_logprob" in code and "triton" not in code.replace("'triton_chunked'", "")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_chunked", "triton_fused"])
def test_compile_on_cuda(backend):
    """The compiled loss on the GPU's compiled kernels equals eager (bf16 and the loss terms)."""
    torch._dynamo.reset()
    h, w, b, t = (x.cuda() if x is not None else None for x in inputs(bias=True, H=64, V=1000))
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    kw = dict(objective="neg_p", z_loss=1e-3, label_smoothing=0.1, backend=backend)

    def loss_fn(h, w, b, t):
        return fo.linear_objective_loss(h, w, t, b, **kw)

    one = torch.tensor(1.0, device="cuda")
    compiled = grads_of(torch.compile(loss_fn, fullgraph=True), h, w, b, t, one)
    eager = grads_of(loss_fn, h, w, b, t, one)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("terms,rows", [({}, 1), ({"z_loss": 1e-3}, 2), ({"label_smoothing": 0.1}, 3)])
def test_compiled_backward_gets_the_classic_coefficients_without_terms(monkeypatch, terms, rows):
    """A plain objective under compile reaches the backend's classic [N] backward (the generated
    autograd formula zero-fills unused outputs' gradients: without the operator's n_coef it would
    always run the lse-term kernels)."""
    from fused_objectives.backends import registered_backend

    torch._dynamo.reset()
    cpu = registered_backend("cpu")
    seen = []
    real = cpu.backward

    def recording(*args, **kw):
        seen.append(args[5].dim() and (args[5].shape[0] if args[5].dim() == 2 else 1))
        return real(*args, **kw)

    monkeypatch.setattr(cpu, "backward", recording)
    h, w, b, t = inputs(H=16, V=37)
    fn = torch.compile(lambda h, w, t: fo.linear_objective_loss(h, w, t, backend="cpu", **terms), fullgraph=True)
    hh = h.clone().requires_grad_()
    fn(hh, w, t).backward()
    assert seen == [rows]


def test_compiled_loss_with_a_transposed_weight_and_a_tensor_count():
    """A head stored [H, V] and passed as param.T (non-contiguous) and a CPU tensor
    num_items_in_batch (Hugging Face's) compile fullgraph and equal eager."""
    torch._dynamo.reset()
    h, w, b, t = inputs(H=16, V=37)
    stored = w.T.contiguous()  # [H, V]
    n_items = torch.tensor(11)

    def run_once(fn):
        hh = h.clone().requires_grad_()
        ww = stored.clone().requires_grad_()
        loss = fo.linear_objective_loss(hh, ww.T, t, backend="cpu", num_items_in_batch=n_items) if fn is None \
            else fn(hh, ww, t)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    compiled = torch.compile(lambda hh, ww, t: fo.linear_objective_loss(hh, ww.T, t, backend="cpu",
                                                                        num_items_in_batch=n_items), fullgraph=True)
    got, want = run_once(compiled), run_once(None)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    counted = torch.compile(lambda hh, n: fo.linear_objective_loss(hh, w, t, num_items_in_batch=n), fullgraph=True)
    counted(h, torch.tensor(5))  # compiles; the count is a graph input
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0, got -3"):
        counted(h, torch.tensor(-3))
