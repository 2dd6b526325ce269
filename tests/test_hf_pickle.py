"""A patched Hugging Face model survives pickle / torch.save like it survives copy.deepcopy (issue 12 item 7):
the reloaded model trains and evaluates with the patch's objective, unpatches on its own, and leaves the
original untouched.  Truth: the objective computed in float64 from the unpatched model's logits."""
import copy
import io
import pickle

import pytest
import torch

import fused_objectives as fo

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

V = 64


def tiny():
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=V,
                               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def truth(model, inputs, per_token):
    """Float64 objective from the unpatched forward's logits (HF shift, -100 ignored)."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["labels"]
    target = labels[:, 1:]
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    valid = target != -100
    logp = lp.gather(-1, target.clamp(min=0)[..., None])[..., 0][valid]
    return per_token(logp).mean().item()


def neg_p(logp):
    return 1 - logp.exp()


def nll(logp):
    return -logp


def round_trips():
    def by_pickle(m):
        return pickle.loads(pickle.dumps(m))

    def by_torch_save(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return [by_pickle, by_torch_save]


@pytest.mark.parametrize("reload", round_trips(), ids=["pickle", "torch.save"])
def test_reloaded_patched_model_trains_and_evaluates_with_the_objective(reload):
    inputs = batch()
    model = tiny()
    expected_train, expected_eval = truth(model, inputs, neg_p), truth(model, inputs, nll)
    fo.patch_model(model, objective="neg_p", eval_objective="nll")
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loaded = reload(model)
    out2 = loaded(**inputs)
    assert out2.logits is None
    assert out2.loss.item() == pytest.approx(expected_train, rel=1e-5)
    out2.loss.backward()
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)
    loaded.eval()
    with torch.no_grad():
        assert loaded(**inputs).loss.item() == pytest.approx(expected_eval, rel=1e-5)


@pytest.mark.parametrize("reload", round_trips(), ids=["pickle", "torch.save"])
def test_reloaded_copy_is_independent_and_unpatches_on_its_own(reload):
    inputs = batch()
    model = tiny()
    plain_nll = truth(model, inputs, nll)
    fo.patch_model(model, objective="neg_p")
    loaded = reload(model)
    fo.set_objective(loaded, "nll")
    with torch.no_grad():
        assert model(**inputs).loss.item() == pytest.approx(truth(model, inputs, neg_p), rel=1e-5)
    fo.unpatch_model(loaded)
    assert "forward" not in loaded.__dict__
    out = loaded(**inputs)  # training mode: the unpatched forward with its own cross-entropy and logits
    assert out.logits is not None and out.loss.item() == pytest.approx(plain_nll, rel=1e-5)
    with torch.no_grad():  # the original is still patched
        assert model(**inputs).logits is None


def test_deepcopy_and_pickle_agree():
    inputs = batch()
    model = fo.patch_model(tiny(), objective="nll_top:0.2")
    with torch.no_grad():
        a = copy.deepcopy(model)(**inputs).loss.item()
        b = pickle.loads(pickle.dumps(model))(**inputs).loss.item()
        c = model(**inputs).loss.item()
    assert a == b == c


@pytest.mark.parametrize("reload", round_trips(), ids=["pickle", "torch.save"])
def test_loss_terms_survive_a_round_trip(reload):
    """z_loss / label_smoothing / class_weight are patch options like the others: a reloaded or copied model
    computes the same loss, and the reloaded copy's options carry the weights."""
    inputs = batch()
    cw = torch.linspace(0.5, 2.0, V)
    model = fo.patch_model(tiny(), objective="nll", z_loss=1e-2, label_smoothing=0.1, class_weight=cw)
    with torch.no_grad():
        want = model(**inputs).loss.item()
        plain = fo.patch_model(copy.deepcopy(model), objective="nll")(**inputs).loss.item()
    assert abs(want - plain) > 1e-4
    for other in (reload(model), copy.deepcopy(model)):
        with torch.no_grad():
            assert other(**inputs).loss.item() == pytest.approx(want, rel=1e-6)
        opts = other._fused_objectives_patch.options
        assert (opts.z_loss, opts.label_smoothing) == (1e-2, 0.1) and torch.equal(opts.class_weight, cw)
