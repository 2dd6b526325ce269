"""The examples run end to end with tiny settings (CPU, nothing downloaded), so they cannot rot."""
import importlib.util
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    _load("quickstart").main(["--tokens", "64", "--hidden", "32", "--vocab", "100", "--steps", "10"])
    out = capsys.readouterr().out
    # the printed losses against a float64 cross-entropy of the same seeded draws (CPU: the example
    # draws on CUDA when there is one, a different stream)
    m = re.search(r"NLL unfused ([0-9.]+), fused ([0-9.]+)", out)
    assert m, out
    if not torch.cuda.is_available():
        torch.manual_seed(0)
        hidden = torch.randn(64, 32)
        W = torch.randn(100, 32) / 32**0.5
        y = torch.randint(0, 100, (64,))
        y[:16] = -100
        want = F.cross_entropy(hidden.double() @ W.double().T, y).item()
        assert float(m.group(1)) == pytest.approx(want, abs=2e-6)
        assert float(m.group(2)) == pytest.approx(want, abs=2e-6)
    # the toy training lowers the neg_p loss and raises the mean probability
    steps = [tuple(map(float, s)) for s in re.findall(r"loss ([0-9.]+)\s+mean p ([0-9.]+)", out)]
    assert len(steps) >= 2, out
    (l0, p0), (l1, p1) = steps[0], steps[-1]
    assert l1 < l0 - 0.05 and p1 > p0 + 0.05, steps
    assert l0 == pytest.approx(1 - p0, abs=2e-4)  # neg_p: loss = mean(1 - p) over valid tokens


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
    out = capsys.readouterr().out
    m = re.search(r"fused == full-logits PyTorch for focal:2 \(loss and gradients, max \|diff\| ([0-9.e+-]+)\)", out)
    assert m and float(m.group(1)) < 1e-5, out
    # the registered objective is the example's formula -(1 - p)^2 log p
    l = torch.tensor([math.log(0.3), math.log(0.9)])
    torch.testing.assert_close(fo.get_objective("focal:2")(l), -((1 - l.exp()) ** 2) * l)
    # both runs start from the same model and batch: at step 0 the focal loss is the NLL weighted
    # by (1 - p)^2 <= 1, with p ~ 0.03 here (a wrong objective or an unweighted one fails this)
    first = {o: (float(l), float(p)) for o, l, p in
             re.findall(r"\[ *(focal:2|nll)\] step +0 +loss ([0-9.]+) +mean p ([0-9.]+)", out)}
    (focal, p_f), (nll, p_n) = first["focal:2"], first["nll"]
    assert p_f == p_n and p_f < 0.1, first
    assert (1 - 3 * p_f) ** 2 * nll < focal < nll, first


def test_sft_with_probe_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")
    summary = _load("sft").main(["--tiny", "--probe", "--max-steps", "3", "--quiet", "--tiny-examples", "12",
                                 "--tiny-hidden", "32", "--logging-steps", "1", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "HEURISTIC" in out
    probe = summary["probe"]
    assert summary["chosen_by_probe"] and summary["objective"] == probe["recommendation"]["objective"]
    # the recommendation follows the stated cut-points (a random tiny model is model-weak: nll)
    cuts = probe["recommendation"]["cut_points"]
    assert probe["mean_p"] <= cuts["nll_at_or_below"] and summary["objective"] == "nll"
    # the patched Trainer's first NLL (before any update) is the base model's -log p on one batch of
    # the data the probe measured whole (mean log p over all 12 examples): the same quantity
    losses = summary["logged_losses"]
    assert summary["steps"] == 3 and len(losses) == 3
    assert abs(losses[0] + probe["mean_logp"]) < 0.25, (losses, probe["mean_logp"])
    assert summary["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-4)
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


def _distributed_truth(mod, args):
    """The example's run in float64 by the test's own truth: the unpatched model on the whole batch,
    the objective from its logits (tests/truth.py), plain SGD."""
    import truth

    model = mod.build_model(args).double()
    ids, mask, labels = mod.batch(args)
    target = truth.shifted(labels, -100)
    losses = []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        per, _ = truth.per_token(args.objective, lp.reshape(-1), (target != -100).reshape(-1))
        loss = per.sum() / int((target != -100).sum())
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= args.lr * p.grad
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero3", "tp"])
def test_distributed(engine):
    """examples/distributed.py on 2 gloo ranks (it re-runs itself under torchrun): exit status 0, and
    the losses it prints equal a float64 run of the unsharded, unpatched model.  The objective is not
    NLL, which an unpatched model computes from the labels by itself: these losses come only from the
    patched forward (and each rank of the example fails if its model returned logits)."""
    pytest.importorskip("transformers")
    import importlib.util
    import subprocess
    import sys

    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[dev]' installs it)")

    objective = "power:0.5"  # sqrt(p) times NLL's gradient: its losses move (-p's barely do on a random model)
    argv = ["--engine", engine, "--objective", objective, "--steps", "3", "--cpu"]
    # the ranks import this checkout's package, whatever else is installed
    root = os.path.dirname(os.path.abspath(EXAMPLES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "distributed.py"), "--nproc", "2", *argv],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"engine {engine}: 2 ranks (cpu), objective {objective}, 3 SGD steps" in proc.stdout, proc.stdout
    assert "OK: every step's loss equals the single-process run's" in proc.stdout, proc.stdout
    got = [float(x) for x in re.findall(r"^step +\d+ +loss ([0-9.]+)", proc.stdout, re.M)]
    mod = _load("distributed")
    want = _distributed_truth(mod, mod.parse_args(argv))
    assert len(got) == 3
    assert got == pytest.approx(want, rel=2e-6), (got, want)
    assert abs(want[-1] - want[0]) > 1e-3 * want[0], want  # the SGD steps move the loss: the gradients count


def test_distributed_report_flags_a_mismatch(capsys):
    """The example's check itself: a step off by more than --rtol is flagged (the exit status follows
    the count), equal losses are not."""
    pytest.importorskip("transformers")
    mod = _load("distributed")
    args = mod.parse_args(["--engine", "ddp", "--steps", "2", "--rtol", "1e-5"])
    want = mod.single_process_losses(args)
    assert mod.report(args, list(want), 2, torch.device("cpu")) == 0
    assert "OK: every step's loss equals" in capsys.readouterr().out
    off = [want[0], want[1] * (1 + 3e-5)]
    assert mod.report(args, off, 2, torch.device("cpu")) == 1
    out = capsys.readouterr().out
    assert re.search(r"step +1 .*MISMATCH", out) and "MISMATCH: 1 of 2 steps" in out, out
