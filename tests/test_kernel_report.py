"""Every shipped Triton kernel compiles for A100 (sm_80) and H100/H200 (sm_90a) within shared memory,
without spills and without ordered (acq_rel) atomics: ``benchmarks/kernel_report.py`` on a subset
(each kernel's default features plus its entropy / dot / lse-coefficient variants; bf16 and fp32 with
TF32, the dtype with the largest tiles in shared memory), in a subprocess because this suite runs
Triton's interpreter, which cannot compile.

Known failures are listed in ``KNOWN_FAILING`` with the issue that fixes them; they are strict xfails,
so a fix makes the test fail until its entry is removed."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_report.py"
DTYPES = ("bf16", "fp32-tf32")

_spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
kr = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("kernel_report", kr)  # its dataclasses look their module up
_spec.loader.exec_module(kr)

# (kernel, arch, dtype[, features]) -> why it fails today and what fixes it (strict xfails: a fix turns them red
# until the entry goes).  Empty since a0114f6 (per-arch configs); before it, the sm_80 backward spilled
# (bf16 720 B, fp32-tf32 368 B with Triton 3.9) and needed 180,224 B of shared memory for TF32 with 3.6.
# The entropy forward's spills with the 128-row tiles (712 B on sm_80, 24 B on sm_90a bf16) went with its own
# 64-row configs (configs.ENTROPY_FORWARD_CONFIGS).
KNOWN_FAILING = {}

triton_cuda = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


def _smoke_ids():
    ids = []
    for entry in kr.KERNELS:
        # no config in the key: this process interprets, so the selectors return the interpreter's
        for arch, case in kr.cases(entry, DTYPES, "smoke", list(kr.ARCHS)):
            ids.append((entry.name, arch, case.dtype.name, kr._feat_str(case.features)))
    return ids


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report") / "r.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--subset", "smoke", "--dtype", *DTYPES,
                           "--json", str(out), "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert out.exists(), f"kernel_report.py wrote nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    recs = json.loads(out.read_text())["records"]
    return {(r["kernel"], r["arch"], r["dtype"], kr._feat_str(r["features"])): r for r in recs}


def _param(key):
    marks = []
    why = KNOWN_FAILING.get(key) or KNOWN_FAILING.get(key[:3])
    if why:
        marks.append(pytest.mark.xfail(reason=why, strict=True))
    return pytest.param(key, id="-".join(key), marks=marks)


@triton_cuda
@pytest.mark.parametrize("key", [_param(k) for k in _smoke_ids()])
def test_kernel_compiles_within_limits(report, key):
    rec = report.get(key)
    assert rec is not None, f"no record for {key}: the report skipped a shipped kernel"
    assert rec["compiled"], f"{key}: compile error: {rec['error']}"
    assert rec["shared_bytes"] <= rec["shared_limit"], f"{key}: shared {rec['shared_bytes']} B > {rec['shared_limit']} B"
    assert rec["spill_bytes"] == 0, f"{key}: ptxas spills {rec['spill_bytes']} B"
    ordered = [a for a in rec["atomics"] if a["sem"] in kr.ORDERED_SEMS]
    assert not ordered, f"{key}: ordered atomics (fences around each): {ordered}"
    assert rec["verdict"] == "ok", f"{key}: {rec['verdict']}"


def test_parsers_read_semantics_and_flag_problems():
    ptx = """
    @%p1 atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;
    red.global.gpu.relaxed.add.f32 [%rd2], %f3;
    red.global.add.f32 [%rd3], %f4;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd4, %rd5, 1, 1, 1, 0, 0;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    """
    atoms = {(a["instr"], a["sem"], a["sem_default"]): a["count"] for a in kr.ptx_atomics(ptx)}
    assert atoms == {("atom", "acq_rel", False): 1, ("red", "relaxed", False): 1, ("red", "relaxed", True): 1}
    counts = kr.ptx_counts(ptx)
    assert (counts["wgmma"], counts["mma_sync"]) == (1, 1)
    good = dict(compiled=True, shared_bytes=1000, shared_limit=2000, spill_bytes=0,
                atomics=[a for a in kr.ptx_atomics(ptx) if a["sem"] == "relaxed"], sass={"LDL": 0, "STL": 0})
    assert kr.verdict(good) == "ok"
    assert "shared" in kr.verdict({**good, "shared_bytes": 2001})
    assert "spills" in kr.verdict({**good, "spill_bytes": 4})
    assert "acq_rel" in kr.verdict({**good, "atomics": kr.ptx_atomics(ptx)})
    assert kr.verdict({**good, "compiled": False}) == "COMPILE ERROR"
