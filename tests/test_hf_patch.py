"""fo.patch_model / unpatch_model / patched / set_objective on tiny random transformers models."""
import os
import subprocess
import sys

import pytest
import torch

import fused_objectives as fo

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from fused_objectives.integrations.hf import UnsupportedModelError  # noqa: E402

V = 64


def tiny(model_type="llama", dtype=torch.float32, **overrides):
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, vocab_size=V, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=dtype)
    return model.train()


def batch(B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_grads_close(g0, g1, rtol=1e-5):
    assert set(g0) == set(g1)
    scale = max(g.abs().max().item() for g in g0.values())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=rtol * scale, msg=k)


def logits_objective(logits, labels, fn):
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    lp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return fn(lp[valid]).mean()


def valid_logprobs64(logits, labels):
    """float64 log p of every valid shifted label, from the model's own logits."""
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    return torch.log_softmax(logits.double(), -1).gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]


def test_import_does_not_import_transformers():
    code = "import sys, fused_objectives as fo; fo.patch_model; assert 'transformers' not in sys.modules, 'imported'"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_version_gate_names_the_required_version(monkeypatch):
    m = tiny()
    # the module object patch_model imports (transformers' lazy module can re-register itself in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(ImportError, match=r"transformers >= 4\.56\.0, found 4\.40\.0"):
        fo.patch_model(m, objective="nll")


def test_patch_instance_nll_exact_and_unpatch_restores():
    m = tiny()
    inputs = batch()
    out0, g0 = loss_and_grads(m, inputs)
    assert fo.patch_model(m, objective="nll") is m
    assert "forward" in m.__dict__ and callable(m.forward)  # a picklable callable on the instance
    out1, g1 = loss_and_grads(m, inputs)
    assert out1.logits is None
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g0, g1)
    other = tiny()
    assert "forward" not in other.__dict__  # only that instance
    fo.unpatch_model(m)
    assert "forward" not in m.__dict__ and m.forward.__func__ is LlamaForCausalLM.forward
    out2 = m(**inputs)
    assert out2.logits is not None and torch.equal(out2.loss, out0.loss)


@pytest.mark.parametrize("objective,fn", [
    ("neg_p", lambda lp: 1 - lp.exp()),
    ("power:10", lambda lp: (1 - (10 * lp).exp()) / 10),
    ("nll_top:0.0", lambda lp: -lp),
], ids=["neg_p", "power10", "nll_top0"])
def test_objective_matches_unpatched_logits(objective, fn):
    m = tiny()
    inputs = batch()
    with torch.no_grad():
        logits = m(**inputs).logits
    expected = logits_objective(logits, inputs["labels"], fn)
    with fo.patched(m, objective=objective):
        got = m(**inputs).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in m.__dict__


def test_patch_class_and_model_type_string():
    inputs = batch()
    m0 = tiny()
    ref = m0(**inputs).loss
    saved = LlamaForCausalLM.__dict__["forward"]
    fo.patch_model("llama", objective="nll")
    try:
        assert LlamaForCausalLM.__dict__["forward"] is not saved
        m = tiny()  # a future instance
        out = m(**inputs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
        fo.set_objective("llama", "neg_p")
        with torch.no_grad():
            lg = m0(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        torch.testing.assert_close(m(**inputs).loss, logits_objective(lg, inputs["labels"], lambda lp: 1 - lp.exp()),
                                   rtol=1e-5, atol=1e-6)
        # an instance patch on top of the class patch runs the original forward once, with its own options
        fo.patch_model(m, objective="nll")
        torch.testing.assert_close(m(**inputs).loss, ref, rtol=1e-6, atol=1e-6)
        fo.unpatch_model(m)
    finally:
        fo.unpatch_model(LlamaForCausalLM)
    assert LlamaForCausalLM.__dict__["forward"] is saved and "__call__" not in LlamaForCausalLM.__dict__
    assert tiny()(**inputs).logits is not None


def test_patch_twice_replaces_options_and_set_objective():
    m = tiny()
    inputs = batch()
    fo.patch_model(m, objective="nll")
    fwd = m.__dict__["forward"]
    nll = m(**inputs).loss
    fo.patch_model(m, objective="neg_p")
    assert m.__dict__["forward"] is fwd
    negp = m(**inputs).loss
    assert not torch.allclose(nll, negp)
    fo.set_objective(m, "nll")
    torch.testing.assert_close(m(**inputs).loss, nll)
    fo.unpatch_model(m)
    with pytest.raises(ValueError, match="not patched"):
        fo.unpatch_model(m)
    with pytest.raises(ValueError, match="not patched"):
        fo.set_objective(m, "nll")


def test_patched_context_restores_previous_options():
    m = tiny()
    inputs = batch()
    fo.patch_model(m, objective="nll")
    nll = m(**inputs).loss
    with fo.patched(m, objective="nll_top:0.2"):
        assert not torch.allclose(m(**inputs).loss, nll)
    torch.testing.assert_close(m(**inputs).loss, nll)
    fo.unpatch_model(m)


def test_without_labels_forward_and_generate_unchanged():
    m = tiny().eval()
    ids = batch()["input_ids"][:1, :4]
    ref_logits = m(input_ids=ids).logits
    ref_gen = m.generate(ids, max_new_tokens=5, do_sample=False)
    fo.patch_model(m, objective="neg_p")
    torch.testing.assert_close(m(input_ids=ids).logits, ref_logits)
    assert torch.equal(m.generate(ids, max_new_tokens=5, do_sample=False), ref_gen)


def test_return_logits_option_and_tuple_output():
    m = tiny()
    inputs = batch()
    out0 = m(**inputs)
    fo.patch_model(m, objective="nll", return_logits=True)
    out1 = m(**inputs)
    torch.testing.assert_close(out1.logits, out0.logits)
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    fo.patch_model(m, objective="nll")
    tup = m(**inputs, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out0.loss, rtol=1e-6, atol=1e-6)


def test_shift_labels_and_logits_to_keep():
    m = tiny()
    inputs = batch()
    labels = inputs.pop("labels")
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    ref = m(**inputs, labels=labels).loss
    fo.patch_model(m, objective="nll")
    torch.testing.assert_close(m(**inputs, shift_labels=shift, labels=labels).loss, ref, rtol=1e-6, atol=1e-6)
    # logits_to_keep with shift_labels for the kept positions (as HF allows)
    keep = 3
    out0 = fo.unpatch_model(m)(**inputs, labels=labels, shift_labels=shift[:, -keep:].contiguous(), logits_to_keep=keep)
    fo.patch_model(m, objective="nll")
    out1 = m(**inputs, labels=labels, shift_labels=shift[:, -keep:].contiguous(), logits_to_keep=keep)
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        m(**inputs, labels=labels, logits_to_keep=keep)


@pytest.mark.parametrize("model_type,overrides", [
    ("gemma2", dict(final_logit_softcapping=3.0)),
    ("cohere", dict(logit_scale=0.5)),
    ("granite", dict(logits_scaling=4.0)),
], ids=["gemma2-softcap", "cohere-logit_scale", "granite-logits_scaling"])
def test_config_logit_transforms(model_type, overrides):
    m = tiny(model_type, **overrides)
    inputs = batch()
    out0, g0 = loss_and_grads(m, inputs)
    fo.patch_model(m, objective="nll")
    out1, g1 = loss_and_grads(m, inputs)
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g0, g1)


def test_tied_embeddings_and_bf16():
    m = tiny(tie_word_embeddings=True)
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    inputs = batch()
    out0, g0 = loss_and_grads(m, inputs)
    fo.patch_model(m, objective="nll")
    out1, g1 = loss_and_grads(m, inputs)
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g0, g1)

    mb = tiny(dtype=torch.bfloat16)
    ref = mb(**inputs).loss
    fo.patch_model(mb, objective="nll")
    out = mb(**inputs)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert mb.lm_head.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref.float(), rtol=2e-2, atol=2e-2)


def test_autocast_bf16_like_trainer_bf16():
    m = tiny()
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = m(**inputs)
        fo.patch_model(m, objective="nll")
        out = m(**inputs)
    out.loss.backward()
    assert m.lm_head.weight.grad.dtype == torch.float32 and torch.isfinite(m.lm_head.weight.grad).all()
    torch.testing.assert_close(out.loss, ref.loss.float(), rtol=1e-2, atol=1e-2)


def test_moe_router_aux_loss_added_like_unpatched():
    m = tiny("mixtral", num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
             router_aux_loss_coef=0.5)
    inputs = batch()
    out0, g0 = loss_and_grads(m, inputs)
    assert out0.aux_loss is not None
    fo.patch_model(m, objective="nll")
    out1, g1 = loss_and_grads(m, inputs)
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out1.aux_loss, out0.aux_loss)
    assert_grads_close(g0, g1)


def test_eval_objective_and_no_grad_eval():
    m = tiny()
    inputs = batch()
    fo.patch_model(m, objective="neg_p", eval_objective="nll")
    train_loss = m(**inputs).loss
    m.eval()
    with torch.no_grad():
        eval_loss = m(**inputs).loss
    fo.unpatch_model(m)
    with torch.no_grad():
        ref = m(**inputs).loss
    torch.testing.assert_close(eval_loss, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(train_loss, eval_loss)


def test_num_items_in_batch_and_normalize_kept():
    m = tiny()
    inputs = batch()
    ref = m(**inputs, num_items_in_batch=torch.tensor(40)).loss
    fo.patch_model(m, objective="nll")
    torch.testing.assert_close(m(**inputs, num_items_in_batch=torch.tensor(40)).loss, ref, rtol=1e-6, atol=1e-6)
    fo.patch_model(m, objective="nll_top:0.2", normalize="kept")
    m(**inputs)  # fine without num_items_in_batch
    with pytest.raises(ValueError, match="normalize='kept'.*num_items_in_batch"):
        m(**inputs, num_items_in_batch=40)


def test_normalize_kept_value_and_gradient():
    """normalize="kept" divides by the tokens that pass the gate, "valid" by all valid tokens: both
    against the objective computed from the unpatched model's logits in float64."""
    m = tiny()
    inputs = batch(B=3, T=12)
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=inputs["input_ids"]).logits
    lp = valid_logprobs64(logits, inputs["labels"])
    ps = lp.detach().exp().sort().values
    k = ps.numel() // 2
    t = float((ps[k - 1] + ps[k]) / 2)  # keeps about half of the tokens, none of them near the edge
    kept = lp.detach().exp() >= t
    assert 0 < kept.sum() < lp.numel()
    want_kept = (-lp * kept).sum() / kept.sum()
    want_kept.backward()
    g_want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    want_valid = (-lp.detach() * kept).sum() / lp.numel()
    spec = f"nll_top:{t!r}"
    fo.patch_model(m, objective=spec, normalize="kept")
    out, g_got = loss_and_grads(m, inputs)
    torch.testing.assert_close(out.loss.double(), want_kept.detach(), rtol=1e-5, atol=1e-7)
    assert_grads_close(g_want, g_got, rtol=1e-4)
    fo.patch_model(m, objective=spec, normalize="valid")
    with torch.no_grad():
        torch.testing.assert_close(m(**inputs).loss.double(), want_valid, rtol=1e-5, atol=1e-7)


def test_bad_options_raise_clear_errors():
    m = tiny()
    with pytest.raises(TypeError, match="unexpected loss option 'temperature'"):
        fo.patch_model(m, objective="nll", temperature=2.0)
    with pytest.raises(ValueError, match="softcap.*config"):
        fo.patch_model(m, objective="nll", softcap=30.0)
    with pytest.raises(ValueError, match="reduction"):
        fo.patch_model(m, objective="nll", reduction="sum")
    with pytest.raises(ValueError, match="normalize"):
        fo.patch_model(m, objective="nll", normalize="tokens")
    with pytest.raises(ValueError):
        fo.patch_model(m, objective="no_such_objective")
    with pytest.raises(ValueError, match="unknown causal-LM model type 'lama'.*llama"):
        fo.patch_model("lama")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fo.patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fo.patch_model(int)
    assert "forward" not in m.__dict__


class _OddHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_refuses_unsupported_head_at_patch_time():
    m = tiny()
    m.lm_head = _OddHead(32, V, bias=False)
    with pytest.raises(UnsupportedModelError, match="'llama'.*_OddHead.*not nn.Linear"):
        fo.patch_model(m, objective="nll")


class _ScaledLlama(LlamaForCausalLM):
    """A family whose forward changes the logits in a way its config does not declare."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        h = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(h) * 3.0
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _InlineCELlama(LlamaForCausalLM):
    """A family that computes its loss inline instead of through ``self.loss_function``."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids, **kwargs).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1)) if labels is not None else None
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize("cls,match", [
    (_ScaledLlama, "transforms the logits.*does not declare"),
    (_InlineCELlama, "does not hand the head's logits to model.loss_function"),
], ids=["undeclared-transform", "inline-cross-entropy"])
def test_refuses_forward_it_cannot_reproduce(cls, match):
    base = tiny()
    m = cls(base.config)
    m.load_state_dict(base.state_dict())
    m.train()
    inputs = batch()
    m(**inputs).loss.backward()  # the unpatched forward works
    fo.patch_model(m, objective="nll")
    with pytest.raises(UnsupportedModelError, match=match):
        m(**inputs)
    fo.unpatch_model(m)


class _Zero3Head:
    """Emulates DeepSpeed ZeRO-3 on ``lm_head``: the weight is gathered only inside the module's call and
    re-gathered by a hook on its output's gradient before the backward that needs it."""

    def __init__(self, head):
        self.head, self.full = head, head.weight.data
        head.weight.data = torch.empty(0)
        self.inside = 0
        head.register_forward_pre_hook(self.gather)
        head.register_forward_hook(self.release)

    def gather(self, module, args):
        module.weight.data = self.full
        self.inside += 1

    def release(self, module, args, output):
        module.weight.data = torch.empty(0)
        gather = self.gather

        class PreBackward(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                gather(module, ())
                return g

        return PreBackward.apply(output)


def test_sharded_head_weight_is_used_inside_its_own_call():
    m = tiny()
    inputs = batch()
    out0, g0 = loss_and_grads(m, inputs)
    _Zero3Head(m.lm_head)
    assert m.lm_head.weight.numel() == 0  # read by attribute outside the head's call: not gathered
    out_z, g_z = loss_and_grads(m, inputs)  # the unpatched model calls its head, so the emulation is faithful
    torch.testing.assert_close(out_z.loss, out0.loss)
    fo.patch_model(m, objective="nll")
    m.zero_grad(set_to_none=True)
    out1 = m(**inputs)
    assert m.lm_head.weight.numel() == 0  # released after the head's call
    out1.loss.backward()
    g1 = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(g0, g1)


def test_trl_fused_lm_head_protocol_gets_the_objective():
    m = tiny()
    inputs = batch()
    fo.patch_model(m, objective="neg_p")
    out = m(**inputs, fused_lm_head=True)
    # SFTTrainer's reduction of the protocol's fields is the objective
    trl_loss = -out.log_probs.sum() / out.label_mask.sum()
    torch.testing.assert_close(trl_loss, out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trl_loss, m(**inputs).loss, rtol=1e-6, atol=1e-6)
    assert out.log_probs.shape == (2, 7) and out.is_top1.shape == (2, 7)
    m.zero_grad(set_to_none=True)
    trl_loss.backward()
    g_trl = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    # loss and gradients (through the per-token backward) against neg_p on the model's own logits
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=inputs["input_ids"]).logits
    lp = valid_logprobs64(logits, inputs["labels"])
    want = (-torch.expm1(lp)).mean()
    want.backward()
    g_want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(trl_loss.detach().double(), want.detach(), rtol=1e-5, atol=1e-7)
    assert_grads_close(g_want, g_trl, rtol=1e-4)


def test_decoder_run_outside_the_patched_forward_in_training_is_refused():
    m = tiny()
    ids = batch()["input_ids"]
    fo.patch_model(m, objective="neg_p")
    with pytest.raises(UnsupportedModelError, match="outside the patched forward"):
        m.model(input_ids=ids)  # e.g. a trainer computing its own loss from the hidden states
    with torch.no_grad():
        m.model(input_ids=ids)  # fine without grad (feature extraction, probes)
    fo.unpatch_model(m)
    m.model(input_ids=ids)


def test_deepcopy_of_a_patched_model_trains_and_unpatches_on_its_own():
    import copy

    m = tiny()
    inputs = batch()
    ref = m(**inputs).loss
    fo.patch_model(m, objective="nll")
    c = copy.deepcopy(m)
    out = c(**inputs)  # its decoder guard must not mistake the copy's forward for an outside caller
    out.loss.backward()
    assert out.logits is None and c.lm_head.weight.grad is not None and m.lm_head.weight.grad is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    fo.unpatch_model(c)
    assert "forward" not in c.__dict__ and c(**inputs).logits is not None
    c.model(input_ids=inputs["input_ids"])  # no hooks left on the copy
    assert m(**inputs).logits is None  # the original is still patched


def test_liger_needs_cuda_on_cpu():
    pytest.importorskip("liger_kernel")
    m = tiny()
    with pytest.raises(RuntimeError, match="liger=True needs the model on a CUDA device"):
        fo.patch_model(m, objective="nll", liger=True)
    assert "forward" not in m.__dict__


@pytest.mark.gpu
def test_liger_composition_on_gpu():
    pytest.importorskip("liger_kernel")
    m = tiny().cuda()
    inputs = {k: v.cuda() for k, v in batch().items()}
    ref = m(**inputs).loss
    fo.patch_model(m, objective="nll", liger=True)
    out = m(**inputs)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_patched_bf16_model_on_cuda_uses_the_fused_kernels():
    m = tiny(dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in batch().items()}
    out0, g0 = loss_and_grads(m, inputs)
    fo.patch_model(m, objective="nll")  # backend "auto": the Triton kernels on CUDA
    out1, g1 = loss_and_grads(m, inputs)
    assert out1.logits is None
    torch.testing.assert_close(out1.loss, out0.loss.float(), rtol=2e-2, atol=2e-2)
    for k in g0:
        assert torch.isfinite(g1[k]).all(), k
        rel = (g1[k].float() - g0[k].float()).norm() / g0[k].float().norm().clamp(min=1e-12)
        assert rel < 5e-2, (k, rel.item())


# ----------------------------------------------------------------------------- loss terms (issue 14)
def terms_truth64(logits, labels, per_token, z_loss=0.0, eps=0.0, cw=None, num_items=None):
    """float64 loss from the model's own logits, written from the definitions: per valid token
    (1 - eps) w[y] f(log p_y) - (eps / V) sum_j u_j log p_j + z_loss lse^2 (u = w, or ones); mean: the first
    part / sum of w[y], the z part / count (num_items_in_batch replaces both)."""
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    valid = target != -100
    z = logits.double()[valid]
    y = target[valid]
    logsm = torch.log_softmax(z, -1)
    lp = logsm.gather(-1, y[:, None])[:, 0]
    u = torch.ones(z.shape[-1], dtype=torch.float64) if cw is None else cw.double()
    w = u[y]
    obj = (1 - eps) * w * per_token(lp) - (eps / z.shape[-1]) * (logsm * u).sum(-1)
    zt = z_loss * torch.logsumexp(z, -1) ** 2
    if num_items is not None:
        return (obj.sum() + zt.sum()) / num_items
    return obj.sum() / w.sum() + zt.sum() / valid.sum()


@pytest.mark.parametrize("objective,terms,num_items", [
    ("nll", dict(z_loss=1e-2, label_smoothing=0.1, class_weight=True), None),
    ("nll", dict(label_smoothing=0.2, class_weight=True), 23),
    ("neg_p", dict(z_loss=1e-3, label_smoothing=0.1), None),
], ids=["nll-all-terms", "nll-smooth-weight-num-items", "neg_p-z-smooth"])
def test_loss_terms_match_float64_truth_from_the_unpatched_logits(objective, terms, num_items):
    m = tiny()
    inputs = batch(B=3, T=9)
    terms = dict(terms)
    if terms.get("class_weight"):
        terms["class_weight"] = 0.25 + 2 * torch.rand(V, generator=torch.Generator().manual_seed(7))
    f = {"nll": lambda lp: -lp, "neg_p": lambda lp: -torch.expm1(lp)}[objective]
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    # the truth: float64 from the unpatched model's logits, differentiated through the model
    logits = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    want = terms_truth64(logits, inputs["labels"], f, terms.get("z_loss", 0.0), terms.get("label_smoothing", 0.0),
                         terms.get("class_weight"), num_items)
    if objective == "nll":  # the truth is torch's own weighted, smoothed cross-entropy (plus the z-loss)
        target = torch.cat([inputs["labels"][:, 1:], torch.full_like(inputs["labels"][:, :1], -100)], 1)
        cw = terms.get("class_weight")
        ce = torch.nn.functional.cross_entropy(
            logits.double().flatten(0, 1), target.flatten(), weight=None if cw is None else cw.double(),
            label_smoothing=terms["label_smoothing"], reduction="sum" if num_items else "mean")
        zs = terms.get("z_loss", 0.0) * torch.logsumexp(logits.double(), -1)[target != -100].pow(2)
        ce = ce / num_items + zs.sum() / num_items if num_items else ce + zs.mean()
        torch.testing.assert_close(want, ce, rtol=1e-12, atol=1e-12)
    m.zero_grad(set_to_none=True)
    want.backward()
    g_want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    fo.patch_model(m, objective=objective, **terms)
    out, g_got = loss_and_grads(m, {**inputs, **extra})
    assert out.logits is None
    torch.testing.assert_close(out.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(g_want, g_got, rtol=1e-4)
    # without the terms the loss is another number (the terms are not dropped anywhere)
    fo.patch_model(m, objective=objective)
    assert abs(m(**inputs, **extra).loss.item() - out.loss.item()) > 1e-4
    # TRL's fused-head protocol reduces to the same loss (class weights: their weighted mean)
    fo.patch_model(m, objective=objective, **terms)
    trl = m(**inputs, **extra, fused_lm_head=True)
    denom = num_items if num_items is not None else trl.label_mask.sum()
    torch.testing.assert_close((-trl.log_probs.sum() / denom).double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trl.loss.double(), want.detach(), rtol=1e-5, atol=1e-6)


def test_loss_terms_kept_by_patched_set_objective_and_repatch():
    m = tiny()
    inputs = batch()
    cw = torch.linspace(0.5, 1.5, V)
    fo.patch_model(m, objective="nll", label_smoothing=0.1, class_weight=cw, z_loss=1e-3)
    with_terms = m(**inputs).loss
    fo.set_objective(m, "nll")  # changes the objective only
    torch.testing.assert_close(m(**inputs).loss, with_terms)
    with fo.patched(m, objective="nll"):
        plain = m(**inputs).loss
        assert abs(plain.item() - with_terms.item()) > 1e-4
    torch.testing.assert_close(m(**inputs).loss, with_terms)
    fo.unpatch_model(m)


def test_class_weight_must_fit_the_head_at_patch_time():
    m = tiny()
    with pytest.raises(ValueError, match=r"class_weight must have shape \[V\] = \(64,\)"):
        fo.patch_model(m, objective="nll", class_weight=torch.ones(V + 1))
    assert "_fused_objectives_patch" not in m.__dict__


def test_class_weight_is_checked_against_a_zero3_partitioned_head_by_its_ds_shape():
    """Under DeepSpeed ZeRO-3 the head's weight is an empty partition whose full shape is ds_shape: the check
    reads ds_shape (a right class_weight accepted, a wrong one refused; no deepspeed needed)."""
    m = tiny()
    part = torch.nn.Parameter(torch.empty(0))
    part.ds_shape = torch.Size([V, m.config.hidden_size])
    m.lm_head.weight = part
    for bad in (torch.ones(0), torch.ones(V + 1)):
        with pytest.raises(ValueError, match=r"class_weight must have shape \[V\] = \(64,\)"):
            fo.patch_model(m, objective="nll", class_weight=bad)
    fo.patch_model(m, objective="nll", class_weight=torch.ones(V))
    assert "_fused_objectives_patch" in m.__dict__
    fo.unpatch_model(m)


def test_eval_logits_with_grad_enabled_carry_no_graph():
    """An evaluation call with labels and gradients enabled returns the predictions' logits without a graph
    (no [N, V] autograd history); its loss still differentiates exactly as the unpatched model's does."""
    m = tiny().eval()
    inputs = batch(B=3, T=9)
    ref_out, ref_grads = loss_and_grads(m, inputs)
    with torch.no_grad():
        ref_logits = m(**inputs).logits
    fo.patch_model(m, objective="nll")
    out = m(**inputs)
    assert not out.logits.requires_grad and out.logits.grad_fn is None
    torch.testing.assert_close(out.logits, ref_logits)
    got_out, got = loss_and_grads(m, inputs)
    torch.testing.assert_close(got_out.loss, ref_out.loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(ref_grads, got, rtol=1e-4)
    fo.unpatch_model(m)


def test_eval_predictions_logits_ids_or_none():
    """In evaluation a call with labels returns the unpatched logits (default), the argmax ids of the
    valid positions ('ids': ignore_index elsewhere, no logits) or the loss only ('none'); training: none."""
    m = tiny().eval()
    inputs = batch(B=3, T=9)
    with torch.no_grad():
        ref = m(**inputs)
    target = torch.cat([inputs["labels"][:, 1:], torch.full_like(inputs["labels"][:, :1], -100)], 1)
    want_ids = torch.where(target != -100, ref.logits.double().argmax(-1), torch.full_like(target, -100))
    fo.patch_model(m, objective="nll")
    with torch.no_grad():
        out = m(**inputs)
        torch.testing.assert_close(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
        fo.patch_model(m, objective="nll", eval_predictions="ids")
        out = m(**inputs)
        assert out.logits is None and torch.equal(out.predicted, want_ids)
        assert torch.equal(m(**inputs, return_dict=False)[-1], want_ids)  # in the tuple too
        fo.patch_model(m, objective="nll", eval_predictions="none")
        out = m(**inputs)
        assert out.logits is None and "predicted" not in out
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    fo.patch_model(m, objective="nll", eval_predictions="ids")
    m.train()
    out = m(**inputs)
    assert out.logits is None and "predicted" not in out
