"""Capability probe: its mean p equals the one from the unpatched model's full logits on the same
tokens (for every logit transform the probe reads from the config), the chat-template path scores
only assistant tokens, and bad data fails with a message naming the line or field.

Tiny random models and a character-level tokenizer are built locally (examples/make_tiny.py).
"""
import json
import os
import subprocess
import sys
from types import MethodType

import pytest
import torch

import fused_objectives as fo

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import make_tiny  # noqa: E402

P = sys.modules["fused_objectives.probe"]  # the module (fo.probe is the function)


@pytest.fixture(scope="module")
def tok():
    return make_tiny.make_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("tiny")
    model_dir, data = make_tiny.make_all(str(out), n=12)
    return model_dir, data


def _records(n=7, seed=0):
    recs = make_tiny.make_records(n, seed)
    # uneven lengths so batches are padded
    for i, r in enumerate(recs):
        r["response"] = r["response"] + " ok" * i
    return [(f"rec {i}", r) for i, r in enumerate(recs)]


def _full_logits_probs(model, batches):
    """Ground truth: p of every scored token from the model's own full logits, in float64."""
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            target = b["labels"][:, 1:]
            keep = target != -100
            lp = logits[:, :-1].log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
            out.append(lp[keep].exp())
    return torch.cat(out)


FAMILIES = [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma2-softcap", {"family": "gemma2", "final_logit_softcapping": 0.3}),
    ("cohere-logit_scale", {"family": "cohere", "logit_scale": 4.0}),
    ("granite-logits_scaling", {"family": "granite", "logits_scaling": 0.2}),
]


@pytest.mark.parametrize("kw", [k for _, k in FAMILIES], ids=[i for i, _ in FAMILIES])
def test_mean_p_equals_full_logits(tok, kw):
    model = make_tiny.make_model(tok, **dict({"family": "llama"}, **kw))
    enc = P.encode_records(tok, _records())
    batches = P.make_batches(enc, 3, tok.pad_token_id)
    res = fo.probe(model, batches)
    gt = _full_logits_probs(model, batches)
    assert res.tokens == gt.numel() == sum(sum(l != -100 for l in e.labels[1:]) for e in enc)
    assert res.mean_p == pytest.approx(float(gt.mean()), rel=1e-5, abs=1e-7)
    assert res.mean_logp == pytest.approx(float(gt.log().mean()), rel=1e-5)
    assert res.frac_below_0_2 == pytest.approx(float((gt < 0.2).double().mean()))
    ref_pct = torch.quantile(gt, torch.tensor([5, 10, 25, 50, 75, 90], dtype=torch.float64) / 100)
    assert list(res.percentiles) == ["5", "10", "25", "50", "75", "90"]
    for got, want in zip(res.percentiles.values(), ref_pct.tolist()):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert sum(res.histogram["counts"]) == res.tokens


def test_transforms_read_from_config(tok):
    for kw, softcap, scale in [({"family": "gemma2", "final_logit_softcapping": 0.3}, 0.3, None),
                               ({"family": "cohere", "logit_scale": 4.0}, None, 4.0),
                               ({"family": "granite", "logits_scaling": 0.2}, None, 5.0)]:
        route = P._route(make_tiny.make_model(tok, **kw))
        assert route.softcap == softcap
        assert route.logit_scale == pytest.approx(scale) if scale else route.logit_scale is None


def test_transforms_read_like_the_training_patch(tok):
    """The probe reads the config's logit transforms with the training patch's own reader: Falcon-H1's
    lm_head_multiplier and RecurrentGemma's logits_soft_cap too (the probe's old copy ignored them)."""
    model = make_tiny.make_model(tok)
    model.config.lm_head_multiplier = 0.5
    model.config.logits_soft_cap = 7.0
    route = P._route(model)
    assert route.logit_scale == pytest.approx(0.5) and route.softcap == pytest.approx(7.0)


def test_peaked_model_and_cpu_chunks(tok):
    """A model that is confident (large logits): mean p far from uniform, split into small chunks."""
    model = make_tiny.make_model(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    batches = P.make_batches(P.encode_records(tok, _records()), 4, tok.pad_token_id)
    res = fo.probe(model, batches, chunk_tokens=5)
    gt = _full_logits_probs(model, batches)
    assert res.mean_p == pytest.approx(float(gt.mean()), rel=1e-4, abs=1e-6)


def test_batches_without_labels_score_all_attended_tokens(tok):
    model = make_tiny.make_model(tok)
    ids = torch.tensor([[1, 10, 11, 12, 3], [1, 13, 14, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    res = fo.probe(model, [{"input_ids": ids, "attention_mask": mask}])
    assert res.tokens == 4 + 2
    labels = ids.masked_fill(mask == 0, -100)
    gt = _full_logits_probs(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    assert res.mean_p == pytest.approx(float(gt.mean()), rel=1e-5)


def test_probe_restores_training_mode_and_needs_no_grad(tok):
    model = make_tiny.make_model(tok).train()
    batches = P.make_batches(P.encode_records(tok, _records(2)), 2, tok.pad_token_id)
    fo.probe(model, batches)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_token_layout_prompt_response(tok):
    rec = {"prompt": "what is 1+2?", "response": "1+2=3"}
    (enc,) = P.encode_records(tok, [("x", rec)])
    prompt_ids = tok(rec["prompt"]).input_ids
    response_ids = tok(rec["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert prompt_ids[0] == tok.bos_token_id
    assert enc.input_ids == prompt_ids + response_ids
    assert enc.labels == [-100] * len(prompt_ids) + response_ids


def test_chat_template_scores_only_assistant_tokens(tok):
    messages = [{"role": "system", "content": "answer briefly."},
                {"role": "user", "content": "what is 1+2?"},
                {"role": "assistant", "content": "3"},
                {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "four, i think"},
                {"role": "user", "content": "thanks"}]
    (enc,) = P.encode_records(tok, [("x", {"messages": messages})], messages_field="messages")
    # the ids are the rendered conversation (up to the last assistant turn)
    full = tok.apply_chat_template(messages[:5], tokenize=False)
    assert tok.decode(enc.input_ids) == full
    # the scored tokens are exactly each assistant turn's content and its end-of-turn marker
    spans, cur = [], []
    for i, l in zip(enc.input_ids, enc.labels):
        if l != -100:
            assert l == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    assert spans == ["3<|im_end|>\n", "four, i think<|im_end|>\n"]
    # and the probe's mean p is over exactly these tokens
    model = make_tiny.make_model(tok)
    batches = P.make_batches([enc], 1, tok.pad_token_id)
    res = fo.probe(model, batches)
    assert res.tokens == sum(len(tok(s, add_special_tokens=False).input_ids) for s in spans)
    assert res.mean_p == pytest.approx(float(_full_logits_probs(model, batches).mean()), rel=1e-5)


def test_truncation_at_max_length(tok):
    enc = P.encode_records(tok, _records(3), max_length=16)
    assert all(len(e.input_ids) <= 16 for e in enc)
    assert any(e.truncated for e in enc)


@pytest.mark.parametrize("mean_p, zone, objective", [
    (0.81, "model-strong", "neg_p"), (0.6, "model-strong", "neg_p"), (0.5, "no clear winner", "nll"),
    (0.2, "model-weak", "nll"), (0.01, "model-weak", "nll")])
def test_recommendation_zones(mean_p, zone, objective):
    rec = P.recommend(mean_p, 0.1)
    assert (rec["zone"], rec["objective"], rec["heuristic"]) == (zone, objective, True)
    assert rec["cut_points"] == {"nll_at_or_below": 0.2, "neg_p_at_or_above": 0.6}
    if zone == "model-strong":
        assert rec["alternatives"] == ["nll_top:0.2"]
    fo.get_objective(rec["objective"])
    for alt in rec["alternatives"]:
        fo.get_objective(alt)


def test_recommendation_custom_cut_points_and_errors():
    assert P.recommend(0.5, 0.1, (0.1, 0.4))["objective"] == "neg_p"
    with pytest.raises(ValueError, match="cut_points"):
        P.recommend(0.5, 0.1, (0.6, 0.2))
    with pytest.raises(ValueError, match="cut_points"):
        P.recommend(0.5, 0.1, (0.2,))


def test_report_labels_heuristic_and_shows_statistics(tok):
    model = make_tiny.make_model(tok)
    res = fo.probe(model, P.make_batches(P.encode_records(tok, _records(3)), 2, tok.pad_token_id))
    text = res.report()
    for needle in ("HEURISTIC", "cut-points used", "mean p", "percentiles", "p < 0.2", "figfont", "medical",
                   "math", res.recommendation["objective"]):
        assert needle in text
    d = res.to_dict()
    json.dumps(d)
    for key in ("mean_p", "mean_logp", "percentiles", "frac_below_0_2", "tokens", "recommendation", "histogram",
                "continuum"):
        assert key in d


def test_refuses_model_whose_forward_transforms_logits(tok):
    model = make_tiny.make_model(tok)
    forward = model.forward

    def scaled(self, *args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0 + 1.0
        return out

    model.forward = MethodType(scaled, model)
    batches = P.make_batches(P.encode_records(tok, _records(2)), 2, tok.pad_token_id)
    with pytest.raises(ValueError, match="do not reproduce the model's own logits"):
        fo.probe(model, batches)
    fo.probe(model, batches, verify=False)  # the user's explicit choice


def test_refuses_models_without_lm_head_or_decoder(tok):
    with pytest.raises(ValueError, match="no LM head"):
        fo.probe(torch.nn.Linear(4, 4), [])
    model = make_tiny.make_model(tok)
    backbone = model.model
    with pytest.raises(ValueError, match="no LM head"):
        fo.probe(backbone, [])


def test_bad_batches(tok):
    model = make_tiny.make_model(tok)
    with pytest.raises(ValueError, match="no batches"):
        fo.probe(model, [])
    with pytest.raises(ValueError, match="batch 0: expected a mapping with 'input_ids'"):
        fo.probe(model, [torch.ones(2, 3)])
    labels_all_ignored = {"input_ids": torch.tensor([[1, 10, 11]]), "labels": torch.full((1, 3), -100)}
    with pytest.raises(ValueError, match="no tokens were scored"):
        fo.probe(model, [labels_all_ignored])
    with pytest.raises(ValueError, match="labels shape"):
        fo.probe(model, [{"input_ids": torch.tensor([[1, 10, 11]]), "labels": torch.tensor([[1, 10]])}])


def test_import_is_light_and_probe_is_the_function():
    code = ("import sys, fused_objectives as fo, fused_objectives.probe; m = sys.modules['fused_objectives.probe']; "
            "from fused_objectives.probe import add_arguments, run; "
            "assert callable(fo.probe) and fo.probe is m.probe, fo.probe; "
            "bad = [n for n in ('transformers', 'datasets', 'matplotlib') if n in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_refuses_to_report_a_wrong_backend(tok, monkeypatch):
    model = make_tiny.make_model(tok)
    batches = P.make_batches(P.encode_records(tok, _records(2)), 2, tok.pad_token_id)
    # the measurement's own reference (fused_objectives.probe.model), not the package-level re-export
    real = P.model.target_logprob
    monkeypatch.setattr(P.model, "target_logprob", lambda *a, **k: real(*a, **k) + 0.5)
    with pytest.raises(RuntimeError, match="disagrees with the log-softmax"):
        fo.probe(model, batches)


def test_plot_writes_png(tok, tmp_path):
    pytest.importorskip("matplotlib")
    model = make_tiny.make_model(tok)
    res = fo.probe(model, P.make_batches(P.encode_records(tok, _records(3)), 3, tok.pad_token_id))
    path = res.plot(str(tmp_path / "p.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_probe_with_fused_triton_kernels(tok):
    """The probe's numbers through the Triton kernels (the interpreter on CPU) equal the full logits."""
    pytest.importorskip("triton")
    model = make_tiny.make_model(tok, hidden=32)
    batches = P.make_batches(P.encode_records(tok, _records(3)), 3, tok.pad_token_id)
    res = fo.probe(model, batches, backend="triton")
    assert res.mean_p == pytest.approx(float(_full_logits_probs(model, batches).mean()), rel=1e-4)


def test_chat_template_errors_name_the_record(tok):
    strict = make_tiny.make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    rec = {"messages": make_tiny.make_records(1)[0]["messages"]}
    with pytest.raises(ValueError, match="rec 4: the chat template cannot render .*no system role"):
        P.encode_records(strict, [("rec 4", rec)], messages_field="messages")
    # a template that rewrites earlier turns cannot be scored by prefix
    shifty = make_tiny.make_tokenizer()
    shifty.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                            "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ValueError, match="rec 5: the tokenizer's chat template does not render this conversation"):
        P.encode_records(shifty, [("rec 5", rec)], messages_field="messages")


def test_refuses_encoder_decoder(tok):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="encoder-decoder"):
        fo.probe(transformers.T5ForConditionalGeneration(cfg), [])


def test_probe_of_a_patched_model_is_unchanged(tok):
    """fo.patch_model changes only training forwards (with labels); the probe reads the same numbers."""
    model = make_tiny.make_model(tok)
    batches = P.make_batches(P.encode_records(tok, _records(3)), 3, tok.pad_token_id)
    before = fo.probe(model, batches).mean_p
    with fo.patched(model, objective="neg_p"):
        assert fo.probe(model, batches).mean_p == pytest.approx(before, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_probe_on_cuda_fused(tok, dtype):
    """On a GPU the probe runs the compiled Triton kernels; mean p equals the model's own logits'."""
    model = make_tiny.make_model(tok, vocab_size=1000).to("cuda", dtype)
    batches = P.make_batches(P.encode_records(tok, _records()), 3, tok.pad_token_id)
    res = fo.probe(model, batches)
    gt = _full_logits_probs(model, [{k: v.cuda() for k, v in b.items()} for b in batches])
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    assert res.mean_p == pytest.approx(float(gt.mean()), rel=rel)
