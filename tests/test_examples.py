"""The examples run end to end with tiny settings (CPU, nothing downloaded), so they cannot rot."""
import importlib.util
import json
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    _load("quickstart").main(["--tokens", "64", "--hidden", "32", "--vocab", "100", "--steps", "2"])
    assert "fused" in capsys.readouterr().out


def test_custom_objective(capsys, monkeypatch):
    import fused_objectives as fo
    from fused_objectives import objectives

    # the example registers "focal" process-wide: keep it out of the other tests in this worker
    monkeypatch.setattr(objectives, "_USER", dict(objectives._USER))

    results = _load("custom_objective").main(["--steps", "3", "--vocab", "31", "--hidden", "16", "--batch", "4",
                                              "--seq", "12"])
    assert [r["objective"] for r in results] == ["focal:2", "nll"]
    assert all(0.0 <= r["eval_mean_p"] <= 1.0 for r in results)
    assert "focal" in " ".join(fo.list_objectives())
    assert "fused == full-logits PyTorch" in capsys.readouterr().out


def test_sft_with_probe_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")
    summary = _load("sft").main(["--tiny", "--probe", "--max-steps", "3", "--quiet", "--tiny-examples", "12",
                                 "--tiny-hidden", "32", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "HEURISTIC" in out
    assert summary["chosen_by_probe"] and summary["objective"] == summary["probe"]["recommendation"]["objective"]
    assert summary["steps"] == 3 and summary["train_loss"] == summary["train_loss"]  # finite, not NaN
    assert json.loads((tmp_path / "s.json").read_text())["objective"] == summary["objective"]


def test_sft_model_path_messages_and_save(tmp_path):
    pytest.importorskip("transformers")
    import sys
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, EXAMPLES)
    import make_tiny

    model_dir, data = make_tiny.make_all(str(tmp_path / "tiny"), n=8, hidden=32)
    out = tmp_path / "out"
    summary = _load("sft").main(["--model", model_dir, "--data", data, "--messages-field", "messages",
                                 "--objective", "neg_p", "--normalize", "kept", "--max-steps", "2",
                                 "--batch-size", "2", "--lr", "1e-3", "--quiet", "--output-dir", str(out)])
    assert summary["objective"] == "neg_p" and summary["steps"] == 2
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(str(out))
    # trained and saved: the weights moved, and the saved model is a plain (unpatched) model
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight) or \
        not torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    assert "_fused_objectives_patch" not in after.__dict__


def test_long_context_memory(tmp_path, capsys):
    pytest.importorskip("transformers")
    png, js = tmp_path / "mem.png", tmp_path / "mem.json"
    rows = _load("long_context_memory").main(["--lengths", "64", "128", "--vocab", "2000", "--hidden", "32",
                                              "--layers", "1", "--device", "cpu", "--plot", str(png),
                                              "--json", str(js)])
    assert sorted((r["variant"], r["length"]) for r in rows) == [("patched", 64), ("patched", 128),
                                                                  ("unpatched", 64), ("unpatched", 128)]
    assert all(r["peak_bytes"] >= 0 for r in rows)
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "match" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(js.read_text())["rows"]) == 4
