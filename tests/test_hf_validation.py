"""patch_model validates at patch time (issue 12 item 8, issue 15 item 4): bad options and families known to
be refused fail in patch_model() itself, in the user's terms, and leave the model unpatched."""
import pytest
import torch

import fused_objectives as fo

transformers = pytest.importorskip("transformers")

from fused_objectives.integrations import hf_verify  # noqa: E402
from fused_objectives.integrations.hf import UnsupportedModelError  # noqa: E402
from fused_objectives.integrations.hf.refusals import KNOWN_REFUSALS  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    model, inputs = hf_verify.build_tiny("llama")
    return model, inputs


@pytest.mark.parametrize("options,error,words", [
    (dict(backend="cpux"), ValueError, ["'cpux'"]),
    (dict(objective="powr:2"), ValueError, ["'powr:2'"]),
    (dict(eval_objective="neg_q"), ValueError, ["'neg_q'"]),
    (dict(ignore_index=2 ** 70), ValueError, ["ignore_index", "int64"]),
    (dict(normalize="tokens"), ValueError, ["normalize"]),
    (dict(z_loss=-1e-4), ValueError, ["z_loss", "-0.0001"]),
    (dict(label_smoothing=1.5), ValueError, ["label_smoothing", "1.5"]),
    (dict(class_weight=[1.0, 2.0]), TypeError, ["class_weight", "list"]),
    (dict(class_weight="ones"), TypeError, ["class_weight"]),
    (dict(eval_predictions="probs"), ValueError, ["eval_predictions", "'probs'"]),
], ids=["backend", "objective", "eval_objective", "ignore_index", "normalize", "z_loss", "label_smoothing",
        "class_weight-list", "class_weight-str", "eval_predictions"])
def test_bad_options_fail_at_patch_time(llama, options, error, words):
    model, _ = llama
    with pytest.raises(error) as e:
        fo.patch_model(model, **options)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "forward" not in model.__dict__ and "_fused_objectives_patch" not in model.__dict__


@pytest.mark.parametrize("model_type", ["bart", "xlnet", "prophetnet"])
def test_known_refused_family_is_refused_by_patch_model(model_type):
    model, _ = hf_verify.build_tiny(model_type)
    with pytest.raises(UnsupportedModelError) as e:
        fo.patch_model(model, objective="neg_p")
    msg = str(e.value)
    assert repr(model_type) in msg and KNOWN_REFUSALS[model_type][0] in msg and "nothing was patched" in msg
    assert "forward" not in model.__dict__
    with pytest.raises(UnsupportedModelError):  # the class and the model type string too
        fo.patch_model(model_type)
    with pytest.raises(UnsupportedModelError):
        fo.patch_model(type(model))


def test_run_time_refusal_speaks_of_the_model_not_of_the_stand_in():
    # without the patch-time list, the generic path refuses bart at its first training call: the message must
    # say what the family does, not quote the error its own loss raised on the stand-in logits
    model, inputs = hf_verify.build_tiny("bart")
    hf_verify._patch_without_known_refusals(model, "nll")
    with pytest.raises(UnsupportedModelError) as e:
        model(**inputs)
    msg = str(e.value)
    assert "computes its loss itself" in msg
    assert "Expected input batch_size" not in msg and "out of bounds" not in msg
    assert e.value.__context__ is not None  # the original error stays available to whoever debugs a family
    fo.unpatch_model(model)


def test_padded_vocabulary_is_refused_only_when_the_config_slices_it():
    model, inputs = hf_verify.build_tiny("inkling_text")
    truth = model(**inputs).loss.item()  # unpatched, every head row is in the loss
    with fo.patched(model, objective="nll"):
        assert model(**inputs).loss.item() == pytest.approx(truth, rel=1e-5)
    model.config.unpadded_vocab_size = model.lm_head.weight.shape[0] - 8
    with pytest.raises(UnsupportedModelError) as e:
        fo.patch_model(model)
    assert "unpadded_vocab_size" in str(e.value)
    # and at run time when the config changes after patching
    model.config.unpadded_vocab_size = None
    fo.patch_model(model, objective="nll")
    model.config.unpadded_vocab_size = model.lm_head.weight.shape[0] - 8
    with pytest.raises(UnsupportedModelError):
        model(**inputs)
    fo.unpatch_model(model)
