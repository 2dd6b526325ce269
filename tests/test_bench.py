"""`fused-objectives bench` on tiny CPU shapes: every provider that runs here, the output files, the
correctness gate (a wrong provider gets no speed-up), argument errors and the subcommand wiring."""
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_objectives as fo
from fused_objectives import cli
from fused_objectives.bench import inputs as binputs
from fused_objectives.bench import report, runner
from fused_objectives.bench.providers import all_providers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--vocab", "130", "--repeats", "2", "--warmup", "0"]
REQUIRED = ["provider", "objective", "preset", "tokens", "hidden", "vocab", "dtype", "device", "pass", "time_ms",
            "peak_mem_mb", "tflops", "matmul_ratio", "correct", "max_rel_error"]
MACHINE = ["gpu", "torch", "triton", "transformers", "liger_kernel", "git_commit", "cpu", "date_utc"]
# providers that cannot run on CPU here, and why
CANNOT_RUN_HERE = {"liger": "CUDA", "cce": "cut-cross-entropy"}


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def every_provider(tmp_path_factory):
    """One in-process sweep over every provider (fused-triton runs under Triton's interpreter here)."""
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"r.{k}") for k in ("json", "csv", "png")}
    rc, stdout, stderr = _main(["bench", *TINY, "--tokens", "24", "48", "--objective", "neg_p",
                                "--ignored-fraction", "0", "0.5", "--in-process",
                                "--provider", *all_providers(), "--json", paths["json"], "--csv", paths["csv"],
                                "--plot", paths["png"]])
    assert rc == 0, stderr
    with open(paths["json"]) as f:
        data = json.load(f)
    return data, paths, stdout, stderr


def test_every_provider_measured_or_skipped_with_reason(every_provider):
    data, _, stdout, stderr = every_provider
    by = {}
    for r in data["records"]:
        by.setdefault(r["provider"], []).append(r)
    assert set(by) == set(all_providers()) | {"bare_gemm"}
    for name, recs in by.items():
        for r in recs:
            if name in CANNOT_RUN_HERE:
                assert r["status"] == "skipped" and CANNOT_RUN_HERE[name] in r["reason"], r
                assert r["time_ms"] is None and r["speedup_vs_reference"] is None
            elif name == "broken":
                assert r["status"] == "wrong" and r["correct"] is False, r
            elif name == "bare_gemm":
                assert r["status"] == "baseline" and r["time_ms"] > 0
            else:
                assert r["status"] == "ok" and r["correct"] is True, r
                assert r["time_ms"] > 0 and r["peak_mem_mb"] is not None and r["matmul_ratio"] > 0
                assert r["max_rel_error"] <= r["tolerance"]
    for name in CANNOT_RUN_HERE:
        assert f"{name}: skipped (" in stderr  # the progress display says why
    assert "skipped:" in stdout


def test_wrong_provider_gets_no_speedup(every_provider):
    data, _, stdout, _ = every_provider
    broken = [r for r in data["records"] if r["provider"] == "broken"]
    assert broken and all(r["speedup_vs_reference"] is None for r in broken)
    assert all(r["max_rel_error"] > r["tolerance"] for r in broken)
    ref = [r for r in data["records"] if r["provider"] == "reference"]
    assert all(r["speedup_vs_reference"] == pytest.approx(1.0) for r in ref)
    rows = [line for line in stdout.splitlines() if line.strip().startswith("broken")]
    assert rows and all("WRONG" in line and " n/a " in line for line in rows)
    assert "not correct or failed: broken" in stdout


def test_json_csv_schema_and_plot(every_provider):
    data, paths, _, _ = every_provider
    assert set(data) == {"machine", "records"}
    assert all(k in data["machine"] for k in MACHINE)
    assert {r["pass"] for r in data["records"]} == {"fwd", "bwd", "fwd_bwd"}
    assert {r["ignored_fraction"] for r in data["records"]} == {0.0, 0.5}
    for r in data["records"]:
        assert all(k in r for k in REQUIRED), r
    half = [r for r in data["records"] if r["ignored_fraction"] == 0.5 and r["provider"] == "reference"]
    assert all(r["valid_tokens"] == r["tokens"] // 2 for r in half)
    with open(paths["csv"]) as f:
        lines = f.read().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert any(line.startswith("# git_commit:") for line in header)
    rows = list(csv.DictReader([line for line in lines if not line.startswith("#")]))
    assert len(rows) == len(data["records"]) and all(k in rows[0] for k in REQUIRED)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fresh_process_per_provider(tmp_path):
    """The default CPU mode: each provider in its own process (peak RSS measured there)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "fused_objectives", "bench", *TINY, "--tokens", "64",
                           "--objective", "nll", "--provider", "reference", "broken", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(out.read_text())["records"]
    ref = [r for r in recs if r["provider"] == "reference"]
    assert all(r["correct"] and r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0 for r in ref)
    assert all(not r["correct"] and r["speedup_vs_reference"] is None for r in recs if r["provider"] == "broken")
    assert "WRONG" in proc.stdout


@pytest.mark.parametrize("args, flag", [
    (["--ignored-fraction", "1.5"], "--ignored-fraction"),
    (["--provider", "nope"], "--provider"),
    (["--objective", "power:-1"], "--objective"),
    (["--tokens", "0"], "--tokens"),
    (["--dtype", "fp8"], "--dtype"),
    (["--preset", "gpt-9"], "--preset"),
    (["--hidden", "64"], "--vocab"),
    (["--preset", "llama3-8b", "--hidden", "8", "--vocab", "9"], "--preset"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--z-loss", "-1e-4"], "--z-loss"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
], ids=["fraction", "provider", "objective", "tokens", "dtype", "preset", "hidden-alone", "preset-and-shape",
        "device", "z-loss", "label-smoothing"])
def test_bad_arguments_name_the_flag(args, flag):
    with pytest.raises(SystemExit) as e:
        _main(["bench", *args])
    assert e.value.code == 2
    # argparse printed to the real stderr (captured by redirect): re-run to read the message
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        cli.main(["bench", *args])
    assert flag in err.getvalue(), err.getvalue()


def test_subcommands_are_lazy_and_a_missing_one_is_explained(monkeypatch):
    rc, out, _ = _main([])
    assert rc == 2 and "bench" in out and "probe" in out
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("fused_objectives.no_such_module", "not here"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli.main(["ghost"])
    assert e.value.code == 2 and "fused_objectives.no_such_module is missing" in err.getvalue()
    # `bench` must not import transformers
    code = ("import sys; from fused_objectives import cli; from fused_objectives.bench import command; "
            "import argparse; command.add_arguments(argparse.ArgumentParser()); "
            "assert 'transformers' not in sys.modules and 'liger_kernel' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _rec(provider, t, correct=True, pass_="fwd_bwd"):
    return {"provider": provider, "preset": "p", "tokens": 8, "hidden": 4, "vocab": 16, "dtype": "fp32",
            "device": "cpu", "objective": "nll", "ignored_fraction": 0.0, "pass": pass_, "time_ms": t,
            "correct": correct, "matmul_ratio": None, "speedup_vs_reference": None}


def test_ratios_only_for_correct_results():
    recs = [_rec("reference", 100.0), _rec("fast", 50.0), _rec("fast_but_wrong", 10.0, correct=False),
            _rec("bare_gemm", 25.0, correct=None)]
    runner.add_ratios(recs)
    by = {r["provider"]: r for r in recs}
    assert by["fast"]["speedup_vs_reference"] == pytest.approx(2.0)
    assert by["fast"]["matmul_ratio"] == pytest.approx(2.0)
    assert by["fast_but_wrong"]["speedup_vs_reference"] is None
    # and no speed-up at all when the reference itself failed its check
    recs = [_rec("reference", 100.0, correct=False), _rec("fast", 50.0)]
    runner.add_ratios(recs)
    assert recs[1]["speedup_vs_reference"] is None


def test_gate_catches_a_small_planted_error():
    inp = binputs.make_inputs(64, 16, 100, torch.float32, "cpu", 0.25)
    gt = binputs.ground_truth(inp, "neg_p", None)
    tol = binputs.tolerance(torch.float32, 0.0)  # the old call (no device) still works: CUDA floor
    ok, err, _ = binputs.check(binputs.Result(gt.loss.float(), gt.dx.float(), gt.dw.float()), gt, tol)
    assert ok and err < 1e-6
    bad_dw = gt.dw.clone()
    bad_dw[3] += 0.02 * gt.dw.norm()
    assert not binputs.check(binputs.Result(gt.loss, gt.dx, bad_dw), gt, tol)[0]
    assert not binputs.check(binputs.Result(gt.loss * float("nan"), gt.dx, gt.dw), gt, tol)[0]
    assert not binputs.check(binputs.Result(gt.loss, None, gt.dw), gt, tol)[0]


def test_reference_error_weighs_row_errors_as_the_gate_does():
    """The tolerance scales the reference's error as check() weighs it: a worst row counts
    ROW_FACTOR times less than a normwise error (else the normwise bound loosens by that factor)."""
    inp = binputs.make_inputs(64, 16, 100, torch.float32, "cpu", 0.25)
    gt = binputs.ground_truth(inp, "neg_p", None)
    dx = gt.dx.clone()
    norms = dx.norm(dim=1)
    row = int(torch.where(norms > 0, norms, float("inf")).argmin())
    dx[row] *= 1.01  # the smallest valid row 1% off: its row error dominates the normwise one
    res = binputs.Result(gt.loss, dx, gt.dw)
    errs = binputs.errors(res, gt)
    assert errs["dx_rows"] > binputs.ROW_FACTOR * errs["dx"]
    assert binputs.worst_error(res, gt) == pytest.approx(errs["dx_rows"] / binputs.ROW_FACTOR)


GATE_CASES = {"plain": dict(), "bias": dict(bias=True), "scale+softcap": dict(logit_scale=0.7, softcap=6.0)}


def _gate_inputs(case):
    inp = binputs.make_inputs(600, 16, 100, torch.float32, "cpu", 0.25)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(100, generator=g) * 0.5 if GATE_CASES[case].get("bias") else None
    return inp, bias, GATE_CASES[case].get("logit_scale"), GATE_CASES[case].get("softcap")


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_gate_truth_covers_every_token_and_matches_the_test_truth(case):
    """The gate's chunked float64 truth (many chunks here) equals the tests' independent truth."""
    from truth import truth

    inp, bias, scale, cap = _gate_inputs(case)
    gt = binputs.ground_truth(inp, "neg_p", cap, bias=bias, logit_scale=scale, chunk_bytes=8 * 100 * 6 * 37)
    want = truth(inp.hidden, inp.weight, inp.target, bias, objective="neg_p", softcap=cap, logit_scale=scale)
    for got, ref in ((gt.loss, want["loss"]), (gt.dx, want["dh"]), (gt.dw, want["dw"]), (gt.db, want["db"])):
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def _fused(inp, bias, scale, cap, target=None, denom=None):
    """The fused CPU backend's loss and gradients on every token of ``inp`` (many chunks: a tiny
    budget), optionally with another target (dropped tokens) and the sum divided by ``denom``."""
    h = inp.hidden.detach().clone().requires_grad_()
    w = inp.weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    t = inp.target if target is None else target
    kw = dict(objective="neg_p", softcap=cap, logit_scale=scale, backend="cpu")
    if denom is None:
        loss = fo.linear_objective_loss(h, w, t, b, **kw)
    else:
        loss = fo.linear_objective_loss(h, w, t, b, reduction="sum", **kw) / denom
    loss.backward()
    return binputs.Result(loss.detach(), h.grad, w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_gate_rejects_planted_bugs(case, monkeypatch):
    """A correct fused run passes the CPU fp32 gate; each planted kind of bug is rejected, also at
    the looser CUDA (TF32) tolerance where the bug is small enough to hide in a normwise error."""
    from fused_objectives.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend.BACKEND, "budget_bytes", 64 * 100 * 4)  # 64-token chunks
    inp, bias, scale, cap = _gate_inputs(case)
    gt = binputs.ground_truth(inp, "neg_p", cap, bias=bias, logit_scale=scale)
    tol_cpu = binputs.tolerance(torch.float32, 0.0, "cpu")
    tol_gpu = binputs.tolerance(torch.float32, 0.0, "cuda")
    assert tol_cpu <= 2e-5 < tol_gpu
    good = _fused(inp, bias, scale, cap)
    ok, worst, errs = binputs.check(good, gt, tol_cpu)
    assert ok, errs
    assert worst < 2e-6, errs  # fp32 on CPU: observed ~1e-7..1e-6
    if bias is not None:
        assert "db" in errs

    valid = (inp.target != binputs.IGNORE_INDEX).nonzero().squeeze(1)
    n_valid = valid.numel()
    last = valid[-40:]  # the last chunk's tokens
    bugs = {}
    bugs["scaled loss"] = (binputs.Result(good.loss * (1 + 1e-4), good.dx, good.dw, good.db), tol_cpu)
    # the loss of the last chunk only (`total = tot`), gradients right
    t_last = torch.full_like(inp.target, binputs.IGNORE_INDEX)
    t_last[last] = inp.target[last]
    only_last = _fused(inp, bias, scale, cap, target=t_last, denom=n_valid)
    bugs["loss of the last chunk only"] = (binputs.Result(only_last.loss, good.dx, good.dw, good.db), tol_gpu)
    # the last chunk's tokens dropped altogether (loss, dX rows, dW contributions)
    t_drop = inp.target.clone()
    t_drop[last] = binputs.IGNORE_INDEX
    bugs["last chunk dropped"] = (_fused(inp, bias, scale, cap, target=t_drop, denom=n_valid), tol_gpu)
    # one token dropped
    t_one = inp.target.clone()
    t_one[valid[-1]] = binputs.IGNORE_INDEX
    bugs["last token dropped"] = (_fused(inp, bias, scale, cap, target=t_one, denom=n_valid), tol_gpu)
    # one token's dX 2% off, one vocabulary row's dW 1.5% off (rows of typical size): normwise errors
    # below the CUDA tolerance, so only the row check sees them
    def typical_row(g):
        norms = g.norm(dim=1)
        typical = g.norm() / norms.numel() ** 0.5
        return int(torch.where(norms >= typical, norms, torch.full_like(norms, math.inf)).argmin())

    dx = good.dx.clone()
    dx[typical_row(gt.dx)] *= 1.02
    assert float((dx.double() - gt.dx).norm() / gt.dx.norm()) < tol_gpu  # a normwise-only gate would pass it
    bugs["dX of one token 2% off"] = (binputs.Result(good.loss, dx, good.dw, good.db), tol_gpu)
    dw = good.dw.clone()
    dw[typical_row(gt.dw)] *= 1.015
    assert float((dw.double() - gt.dw).norm() / gt.dw.norm()) < tol_gpu
    bugs["one dW row 1.5% off"] = (binputs.Result(good.loss, good.dx, dw, good.db), tol_gpu)
    if bias is not None:
        bugs["db missing"] = (binputs.Result(good.loss, good.dx, good.dw, None), tol_gpu)
    for name, (res, tol) in bugs.items():
        ok, worst, errs = binputs.check(res, gt, tol)
        assert not ok, f"the gate accepted a planted bug ({name}): {errs}"


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    return summarize


def _goal_rec(provider, t, status="ok", ignored=0.0, extra=None):
    return {"provider": provider, "preset": "p", "tokens": 8192, "objective": "neg_p", "ignored_fraction": ignored,
            "pass": "fwd_bwd", "status": status, "time_ms": t, "extra_mem_mb": extra}


def test_summary_goals_verdicts():
    """Each goal's value and verdict from records with known times and memory."""
    summarize = _summarize()

    def verdicts(recs):
        return {name.split(": ", 1)[1]: (value, v) for name, value, v in summarize.goals({"records": recs})}

    base = [_goal_rec("bare_gemm", 100.0), _goal_rec("reference", 300.0, extra=1000.0)]
    good = verdicts(base + [_goal_rec("fused", 110.0, extra=10.0), _goal_rec("liger", 400.0),
                            _goal_rec("fused", 60.0, ignored=0.5)])
    assert good == {"fused / bare GEMMs <= 1.15": ("1.1", "PASS"), "liger / fused >= 3": ("3.64", "PASS"),
                    "fused extra memory / reference's <= 0.02": ("0.01", "PASS"),
                    "fused 50% ignored / all valid <= 0.6": ("0.545", "PASS")}
    bad = verdicts(base + [_goal_rec("fused", 120.0, extra=30.0), _goal_rec("liger", 300.0),
                           _goal_rec("fused", 90.0, ignored=0.5)])
    assert {k: v for k, (_, v) in bad.items()} == dict.fromkeys(good, "FAIL")
    assert bad["fused / bare GEMMs <= 1.15"][0] == "1.2"
    # liger skipped: its goal is not judged; a wrong fused result fails every goal
    skipped = verdicts(base + [_goal_rec("fused", 110.0, extra=10.0), _goal_rec("liger", None, status="skipped")])
    assert skipped["liger / fused >= 3"] == ("missing", "n/a")
    assert skipped["fused 50% ignored / all valid <= 0.6"] == ("missing", "n/a")
    wrong = verdicts(base + [_goal_rec("fused", 50.0, status="wrong", extra=1.0), _goal_rec("liger", 400.0)])
    assert all(v == ("fused is wrong", "FAIL") for v in wrong.values())


def test_summary_goals(every_provider):
    """On the CPU sweep: the goal values are the records' own ratios."""
    summarize = _summarize()
    data = every_provider[0]
    rows = summarize.goals(data)
    recs = {(r["provider"], r["tokens"], r["ignored_fraction"]): r for r in data["records"]
            if r["pass"] == "fwd_bwd" and r["objective"] == "neg_p"}
    n = max(t for _, t, _ in recs)
    fused, gemm = recs[("fused", n, 0.0)], recs[("bare_gemm", n, 0.0)]
    by = {name.split(": ", 1)[1]: (value, v) for name, value, v in rows}
    value, verdict = by["fused / bare GEMMs <= 1.15"]
    assert float(value) == pytest.approx(fused["time_ms"] / gemm["time_ms"], rel=6e-3)
    assert verdict == ("PASS" if float(value) <= 1.15 else "FAIL")
    assert by["liger / fused >= 3"] == ("missing", "n/a")  # liger cannot run here
    half = recs[("fused", n, 0.5)]
    assert float(by["fused 50% ignored / all valid <= 0.6"][0]) == pytest.approx(
        half["time_ms"] / fused["time_ms"], rel=6e-3)
    assert "fused ms" in summarize.table(data) and "| preset |" in summarize.table(data, markdown=True)


def test_bench_rejects_a_provider_wrong_on_its_last_chunk(monkeypatch):
    """End to end: the fused CPU provider with `total = tot` planted (the loss of its last token chunk
    only; gradients right) is checked on every token, found wrong, and gets no speed-up."""
    from fused_objectives.backends import cpu as cpu_backend

    monkeypatch.setattr(cpu_backend.BACKEND, "budget_bytes", 64 * 130 * 4)  # 64-token chunks at V = 130
    real = cpu_backend.BACKEND.forward_with_grad

    def last_chunk_loss(hidden, weight, bias, target, valid, opts, coef_fn, needs, **kw):  # kw: row_stats, dot
        out = list(real(hidden, weight, bias, target, valid, opts, coef_fn, needs, **kw))
        idx = valid.nonzero().squeeze(1)
        last = torch.zeros_like(valid)
        last[idx[(idx.numel() - 1) // 64 * 64:]] = True
        out[0] = real(hidden, weight, bias, target, last, opts, coef_fn, (False, False, False), **kw)[0]
        return tuple(out)

    monkeypatch.setattr(cpu_backend.BACKEND, "forward_with_grad", last_chunk_loss)
    plan = runner.Plan(shapes=[runner.Shape("custom", 600, 16, 130)], objectives=["neg_p"],
                       providers=["reference", "fused-cpu"], dtype="fp32", device="cpu", warmup=0, repeats=1,
                       isolate=False)
    recs = [r for r in runner.run(plan) if r["provider"] == "fused-cpu"]
    assert recs and all(r["check_tokens"] == 600 for r in recs)  # every token checked
    assert all(r["status"] == "wrong" and r["speedup_vs_reference"] is None for r in recs), recs[0]
    assert recs[0]["err_loss"] > 0.1 and recs[0]["err_dx"] < 1e-5


# ----------------------------------------------------------------------------- loss terms (issue 14)
TERMS = dict(z_loss=2e-3, label_smoothing=0.1)


@pytest.mark.parametrize("objective,weighted", [("nll", True), ("nll_top:0.2", True), ("neg_p", False)])
def test_gate_truth_with_loss_terms_matches_the_test_truth(objective, weighted):
    """The gate's float64 truth with z-loss, label smoothing (and class weights) equals the tests' truth
    (tests/truth.py, written from the definitions independently), loss and gradients, over many chunks."""
    from truth import truth

    inp = binputs.make_inputs(300, 16, 100, torch.float32, "cpu", 0.25)
    cw = binputs.make_class_weight(100, "cpu") if weighted else None
    gt = binputs.ground_truth(inp, objective, None, chunk_bytes=8 * 100 * 6 * 37, class_weight=cw, **TERMS)
    want = truth(inp.hidden, inp.weight, inp.target, objective=objective, class_weight=cw, **TERMS)
    for got, ref in ((gt.loss, want["loss"]), (gt.dx, want["dh"]), (gt.dw, want["dw"])):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    plain = binputs.ground_truth(inp, objective, None)
    assert abs(float(plain.loss - gt.loss)) > 1e-3  # the terms are in it


def _terms_plan(providers, objective="nll", **terms):
    return runner.Plan(shapes=[runner.Shape("custom", 96, 16, 130)], objectives=[objective], providers=providers,
                       dtype="fp32", device="cpu", warmup=0, repeats=1, isolate=False, **terms)


def test_bench_loss_terms_every_provider_correct_or_skipped_with_reason():
    """--z-loss / --label-smoothing / --class-weight: this engine and the reference compute them and pass the
    float64 gate that includes them; torch_native's chunked path has class weights for nll but no z-loss and
    no label smoothing (skipped, saying so); the gate's self-test provider stays wrong."""
    recs = runner.run(_terms_plan(["fused", "reference", "torch_native", "liger", "broken"], z_loss=2e-3,
                                  label_smoothing=0.1, class_weight=True))
    by = {r["provider"]: r for r in recs if r["pass"] == "fwd_bwd"}
    assert by["fused"]["status"] == "ok" and by["reference"]["status"] == "ok", by["fused"]["reason"]
    assert by["fused"]["z_loss"] == 2e-3 and by["fused"]["label_smoothing"] == 0.1 and by["fused"]["class_weight"]
    assert by["torch_native"]["status"] == "skipped" and "z_loss" in by["torch_native"]["reason"]
    assert by["liger"]["status"] == "skipped" and by["broken"]["status"] == "wrong"
    assert "loss terms: z_loss=0.002, label_smoothing=0.1, class_weight" in report.table(recs, {})
    # class weights alone: PyTorch's chunked F.linear_cross_entropy runs with weight=
    recs = runner.run(_terms_plan(["torch_native"], class_weight=True))
    native = [r for r in recs if r["provider"] == "torch_native"]
    assert native and all(r["status"] == "ok" for r in native), native[0]["reason"]
    # non-NLL objectives: a per-token cross-entropy with the terms is no longer -log p: skipped, saying why
    recs = runner.run(_terms_plan(["fused", "torch_native"], objective="neg_p", label_smoothing=0.1))
    by = {r["provider"]: r for r in recs if r["pass"] == "fwd_bwd"}
    assert by["fused"]["status"] == "ok" and by["torch_native"]["status"] == "skipped"
    assert "label_smoothing" in by["torch_native"]["reason"]
    reason = all_providers()["torch_native"].unavailable_reason(torch.device("cpu"), torch.float32,
                                                                _terms_plan([], class_weight=True).problem(
                                                                    "neg_p", None, 130, "cpu"))
    assert "not -log p" in reason


@pytest.mark.parametrize("term", ["z_loss", "label_smoothing", "class_weight"])
def test_gate_rejects_a_provider_that_drops_a_term(term):
    inp = binputs.make_inputs(96, 16, 130, torch.float32, "cpu", 0.25)
    plan = _terms_plan([], **{term: True if term == "class_weight" else TERMS[term]})
    problem = plan.problem("nll", None, 130, "cpu")
    gt = binputs.ground_truth(inp, "nll", None, **problem.term_kwargs())
    tol = binputs.tolerance(torch.float32, 0.0, "cpu")
    fused = all_providers()["fused"]
    assert binputs.check(binputs.run_once(fused.build(torch.device("cpu"), torch.float32, problem), inp), gt, tol)[0]
    dropped = runner.Problem("nll", None)
    assert not binputs.check(binputs.run_once(fused.build(torch.device("cpu"), torch.float32, dropped), inp), gt,
                             tol)[0]


def test_liger_gets_the_terms_under_its_own_names(monkeypatch):
    """Liger cannot run here (CUDA): a stand-in for its autograd function records what the provider passes
    (ce_weight, lse_square_scale, label_smoothing, the mean reduction) and computes the reference's loss."""
    import sys
    import types

    seen = {}

    class FakeLigerFn:
        @staticmethod
        def apply(h, w, y, bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap):
            seen.update(ce_weight=ce_weight, ignore_index=ignore_index, lse_square_scale=lse_square_scale,
                        label_smoothing=label_smoothing, reduction=reduction, softcap=softcap)
            return fo.linear_objective_loss(h, w, y, backend="reference", z_loss=lse_square_scale,
                                            label_smoothing=label_smoothing, class_weight=ce_weight), None

    module = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    module.LigerFusedLinearCrossEntropyFunction = FakeLigerFn
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", module)
    plan = _terms_plan([], z_loss=2e-3, label_smoothing=0.1, class_weight=True)
    problem = plan.problem("nll", None, 130, "cpu")
    inp = binputs.make_inputs(96, 16, 130, torch.float32, "cpu", 0.25)
    res = binputs.run_once(all_providers()["liger"].build(torch.device("cpu"), torch.float32, problem), inp)
    assert seen["lse_square_scale"] == 2e-3 and seen["label_smoothing"] == 0.1 and seen["reduction"] == "mean"
    assert seen["ce_weight"] is problem.class_weight and seen["ignore_index"] == binputs.IGNORE_INDEX
    gt = binputs.ground_truth(inp, "nll", None, **problem.term_kwargs())
    assert binputs.check(res, gt, binputs.tolerance(torch.float32, 0.0, "cpu"))[0]
    # an objective other than nll with a term: Liger is skipped, saying why (on CUDA; here CUDA is the reason)
    reason = all_providers()["liger"].unavailable_reason(torch.device("cuda"), torch.float32,
                                                         plan.problem("neg_p", None, 130, "cpu"))
    assert reason is not None
