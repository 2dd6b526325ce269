"""What a newcomer sees (issue 15): the bench's report fits 100 columns and ends with a verdict, skipped
providers get one line each in user terms, noise is flagged, progress lines say what runs and can be
silenced, --help answers at once, errors are one line that says what is wrong."""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_objectives import cli
from fused_objectives.bench import report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--vocab", "130", "--repeats", "3", "--warmup", "0", "--in-process"]
QUIET_VARS = ("FUSED_OBJECTIVES_QUIET", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS",
              "TQDM_DISABLE")


@pytest.fixture
def restore_env(monkeypatch):
    """--no-progress / --quiet set environment variables for the whole process: undo them after the test."""
    for k in QUIET_VARS:
        monkeypatch.setenv(k, "0")
    yield
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.enable_progress_bar()


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_bench_report_fits_100_columns_with_verdict_and_one_line_per_skip(tmp_path, restore_env):
    js = str(tmp_path / "r.json")
    rc, out, err = _main(["bench", *TINY, "--tokens", "24", "--objective", "neg_p",
                          "--provider", "fused", "reference", "broken", "liger", "--json", js])
    assert rc == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    assert any(line.startswith("verdict: fastest ") and "leanest " in line for line in lines), out
    assert any("fused" in line and "the reference's time" in line and "bare GEMMs" in line for line in lines), out
    assert [line for line in lines if line.startswith("skipped: ")] == ["skipped: liger: needs a CUDA GPU"]
    broken = [line for line in lines if line.strip().startswith("broken")]
    assert broken and all("WRONG" in line and "n/a" in line for line in broken)
    # progress: one line per provider run, with the time left once something was measured
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert sum("fwd+bwd" in line or "skipped" in line for line in progress) == 4
    assert any("s left]" in line for line in progress)
    # the recorded run re-renders to the same report, and --wide keeps one row per (case, provider)
    rc, again, _ = _main(["bench", "--render", js])
    assert rc == 0 and again == out.replace(f"wrote {js}\n", "")
    rc, wide, _ = _main(["bench", "--render", js, "--wide"])
    assert rc == 0 and any(line.startswith("custom") and " broken" in line for line in wide.splitlines())


def test_bench_quiet_prints_no_progress(restore_env):
    rc, out, err = _main(["bench", *TINY, "--tokens", "24", "--provider", "reference", "--quiet"])
    assert rc == 0 and err == "" and "verdict:" in out
    assert os.environ["FUSED_OBJECTIVES_QUIET"] == "1"  # read by worker processes and the C++ build notice


def _rec(provider, time_ms, times, extra, correct=True, status="ok", ratio=None):
    r = {k: None for k in report.FIELDS}
    r.update(provider=provider, objective="neg_p", preset="p", tokens=512, hidden=8, vocab=16, dtype="fp32",
             device="cpu", ignored_fraction=0.0, backend="", reason="", status=status, correct=correct,
             time_ms=time_ms, times_ms=times, extra_mem_mb=extra, max_rel_error=1e-7, tolerance=2e-5,
             repeats=len(times or []) or None, matmul_ratio=ratio)
    r["pass"] = "fwd_bwd"
    return r


@pytest.mark.parametrize("spread,warned", [((90, 110), True), ((99, 101), False)], ids=["noisy", "quiet"])
def test_verdict_warns_when_the_spread_exceeds_the_difference(spread, warned):
    records = [_rec("fused", 100.0, [spread[0], 100.0, spread[1]], 10.0),
               _rec("reference", 105.0, [104.0, 105.0, 106.0], 80.0),
               _rec("bare_gemm", 80.0, None, None, correct=None, status="baseline", ratio=1.0)]
    text = report.table(records, {"cpu": "x", "device": "cpu"})
    assert "fastest fused (100.0 ms)" in text and "leanest fused (10 MB extra)" in text
    assert "0.95x the reference's time, 0.12x its extra memory, 1.25x the bare GEMMs' time" in text
    assert ("within noise" in text) is warned
    fused_row = [line for line in text.splitlines() if line.strip().startswith("fused")][0]
    assert fused_row.split()[2] == ("20%" if warned else "2%")  # the spread column


def test_summarize_speaks_of_goals_not_issues(tmp_path):
    records = [_rec("fused", 100.0, [100.0], 10.0), _rec("reference", 150.0, [150.0], 80.0),
               _rec("bare_gemm", 80.0, None, None, correct=None, status="baseline")]
    for r in records:
        r["preset"], r["tokens"] = "cpu-small", 8192
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine": {"cpu": "x", "gpu": None}, "records": records}))
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert mod.main([str(path)]) == 0
    text = out.getvalue()
    assert "issue" not in text.lower() and "performance goals" in text
    assert "FAIL" not in text and "(GPU goal)" in text  # a CPU run is not judged against GPU goals


def test_bench_objective_error_keeps_its_quotes():
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        cli.main(["bench", "--objective", "power"])
    line = [x for x in err.getvalue().splitlines() if "error:" in x][0]
    assert e.value.code == 2 and "'power:" in line and line.count("'") % 2 == 0, line


def test_hf_verify_help_runs_nothing(monkeypatch):
    pytest.importorskip("transformers")
    from fused_objectives.integrations import hf_verify

    monkeypatch.setattr(hf_verify, "check_all", lambda *a, **k: pytest.fail("--help ran the check"))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()) as out:
        hf_verify.main(["--help"])
    assert e.value.code == 0 and "MODEL_TYPE" in out.getvalue()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        hf_verify.main(["no_such_family"])
    assert e.value.code == 2 and "no_such_family" in err.getvalue()


def test_hf_verify_reports_progress_and_no_progress_silences_it(restore_env, capsys):
    pytest.importorskip("transformers")
    from fused_objectives.integrations import hf_verify

    assert hf_verify.main(["llama"]) == 0
    cap = capsys.readouterr()
    assert "[1/1" in cap.err and "exact" in cap.err and "1 exact, 0 refused, 0 FAILED, 0 skipped" in cap.out
    assert hf_verify.main(["llama", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "1 exact" in cap.out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("tiny")
    with contextlib.redirect_stdout(io.StringIO()):
        mod.main([str(root)])
    return str(root / "model"), str(root / "data.jsonl")


def test_probe_says_a_missing_model_directory_does_not_exist(tiny_model, restore_env):
    _, data = tiny_model
    rc, _, err = _main(["probe", "--model", "/no/such/model_dir", "--data", data])
    assert rc == 2 and "'/no/such/model_dir': no such directory" in err and "tokenizer" not in err
    rc, _, err = _main(["probe", "--model", data, "--data", data])  # a file, not a directory
    assert rc == 2 and "is a file" in err


def test_probe_progress_lines_and_no_progress(tiny_model, restore_env):
    model, data = tiny_model
    rc, out, err = _main(["probe", "--model", model, "--data", data, "--limit", "4"])
    assert rc == 0 and "loading the model" in err and "scoring" in err and "recommendation" in out
    rc, out, err = _main(["probe", "--model", model, "--data", data, "--limit", "4", "--no-progress"])
    assert rc == 0 and err.strip() == "" and "recommendation" in out


@pytest.mark.parametrize("script,args,words", [
    ("sft.py", ["--tiny", "--objective", "powr:2"], ["argument --objective", "unknown objective 'powr:2'"]),
    ("sft.py", ["--tiny", "--batch-size", "0"], ["argument --batch-size", "positive integer"]),
    ("custom_objective.py", ["--objective", "no_such_objective", "--steps", "1"], ["unknown objective"]),
], ids=["sft-objective", "sft-batch-size", "custom-objective"])
def test_example_scripts_turn_bad_arguments_into_one_line(script, args, words):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), FUSED_OBJECTIVES_QUIET="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and all(w in last for w in words), proc.stderr
