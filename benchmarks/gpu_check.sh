#!/usr/bin/env bash
# The GPU decision run (issue 10 item 3): at most 5 minutes on an H100/H200, from the repository root:
#   bash benchmarks/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same steps on tiny CPU shapes, < 1 minute
#
# Budget (each step runs under `timeout` with its limit; the limits add up to the worst case):
#   step                                                                  limit (s)
#   0 wheels from .whl/ (liger, cce: pip install --no-index)                LIMIT_WHEELS  = 10
#     device properties, clocks, versions                                   LIMIT_ENV     = 15
#   1 tests/test_gpu.py only (compiles the Triton kernels; cached after)    LIMIT_TESTS   = 70
#   2 benchmarks/gpu_micro.py: bare GEMMs, chunk GEMMs M=256/512/1024,      LIMIT_MICRO   = 35
#     epilogue bandwidth (feeds the roofline)
#   3 end to end, llama3-8b head N=8192 H=4096 V=128256 bf16, nll + neg_p,  LIMIT_E2E     = 95
#     0% + 50% ignored: triton, triton_chunked, triton_fused, liger, cce
#     = 4 configurations x <= 5 providers, 2 warm-up + <= 5 timed steps (<= 2 s each)
#   4 the reference once (nll, 0% ignored: memory and time of eager fp32)   LIMIT_REF     = 25
#   5 one torch.profiler kernel table (backend="triton", neg_p, fwd+bwd)     LIMIT_PROFILE = 20
#   6 summary: goals, roofline with measured rates beside the measurements  LIMIT_SUMMARY = 30
#     (three commands, a third of it each)
#   total worst case                                     10+15+70+35+95+25+20+30 = 300 s <= 300 s
# (each timed-out step gets 1 s more to exit: at most 308 s, under the device call's 330 s)
# A step that hits its limit is stopped and the next one runs; every step appends to its files as it
# goes (the bench rewrites its JSON after each configuration, the micro-benchmarks after each
# measurement), so a timeout still leaves data.
#
# Results: $OUT when set (the device tool's folder), else benchmarks/results/gpu-check-<gpu>-<date>/
# (dry run: ${TMPDIR:-/tmp}/gpu_check_dry_run unless OUT is set). Exactly 8 files, the most the device
# tool returns: run.log (everything, as it happens), device.json (GPU, clocks, versions, git commit),
# tests.log, micro.json, bench.json, reference.json, profile.txt, summary.txt.
# Environment: PYTHON (default python3; .venv/bin/python for a dry run when present),
# GPU_CHECK_COMMIT (the commit measured: the GPU copy of the tree has no .git), LIMIT_* above.
# Through the device tool: command `GPU_CHECK_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh`,
# carry [".whl"] (git-ignored: liger-kernel and cut-cross-entropy wheels, `pip download <name> --no-deps -d .whl/`),
# timeout_s 330; then commit $OUT's files under benchmarks/results/gpu-check-<gpu>-<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${GPU_CHECK_DRY_RUN:-0}" = "1" ] && DRY=1
LIMIT_WHEELS=${LIMIT_WHEELS:-10}; LIMIT_ENV=${LIMIT_ENV:-15}; LIMIT_TESTS=${LIMIT_TESTS:-70}
LIMIT_MICRO=${LIMIT_MICRO:-35}; LIMIT_E2E=${LIMIT_E2E:-95}; LIMIT_REF=${LIMIT_REF:-25}
LIMIT_PROFILE=${LIMIT_PROFILE:-20}; LIMIT_SUMMARY=${LIMIT_SUMMARY:-30}

PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
# the dry run runs the Triton backends under the interpreter on CPU tensors
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1
COMMIT="${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

if [ -n "${OUT:-}" ]; then OUTDIR="$OUT"
elif [ "$DRY" = 1 ]; then OUTDIR="${TMPDIR:-/tmp}/gpu_check_dry_run"
else OUTDIR="benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M)"; fi
mkdir -p "$OUTDIR"
LOG="$OUTDIR/run.log"
: >"$LOG"
t0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - t0 ))s] $*" | tee -a "$LOG"; }
# step NAME LIMIT CMD...: run under its time limit, output appended to run.log; records the outcome
declare -A RC
step() {
  local name=$1 limit=$2; shift 2
  say "step $name (limit ${limit}s): $*"
  timeout -k 1 "$limit" "$@" >>"$LOG" 2>&1
  RC[$name]=$?
  case ${RC[$name]} in
    0) say "step $name: ok" ;; 124|137) say "step $name: TIMED OUT after ${limit}s (partial results kept)" ;;
    *) say "step $name: exit ${RC[$name]}" ;;
  esac
}

# ---- 0: wheels, device, versions
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "$DRY" = 1 ]; then
    say "dry run: would install $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site"
  elif timeout -k 1 "$LIMIT_WHEELS" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    say "installing .whl/ failed: liger / cce will be skipped"
  fi
else
  say "no .whl/ folder: liger and cce are skipped unless installed"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
  say "no CUDA GPU visible (or torch missing for $PY): run with --dry-run to test this script on CPU"; exit 1
fi
step env "$LIMIT_ENV" "$PY" - "$OUTDIR/device.json" "$COMMIT" "$DRY" <<'PY'
import importlib.metadata as md, json, platform, subprocess, sys, torch
path, commit, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def version(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return None
info = {"git_commit": commit, "dry_run": dry, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": version("triton"), "transformers": version("transformers"),
        "liger_kernel": version("liger_kernel") or version("liger-kernel"),
        "cut_cross_entropy": version("cut-cross-entropy") or version("cut_cross_entropy")}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                memory_gb=round(p.total_memory / 2**30, 1), l2_bytes=getattr(p, "L2_cache_size", None))
    for q in ("CLOCK", "POWER", "PERFORMANCE"):
        try:
            out = subprocess.run(["nvidia-smi", "-q", "-d", q], capture_output=True, text=True, timeout=5)
            info[f"nvidia_smi_{q.lower()}"] = out.stdout.strip().splitlines()[8:]
        except (OSError, subprocess.SubprocessError) as exc:
            info[f"nvidia_smi_{q.lower()}"] = f"unavailable: {exc}"
else:
    info["gpu"] = None
open(path, "w").write(json.dumps(info, indent=1) + "\n")
print(json.dumps({k: v for k, v in info.items() if not k.startswith("nvidia_smi")}))
PY

# ---- 1: the GPU tests (on CPU they are skipped: the dry run checks that they are collected)
say "step tests (limit ${LIMIT_TESTS}s): pytest tests/test_gpu.py"
timeout -k 5 "$LIMIT_TESTS" "$PY" -m pytest tests/test_gpu.py -q -rfEs -p no:cacheprovider -p no:randomly \
  >"$OUTDIR/tests.log" 2>&1
RC[tests]=$?
tail -n 5 "$OUTDIR/tests.log" | tee -a "$LOG"
case ${RC[tests]} in
  0) TESTS=passed ;; 5) TESTS="none collected" ;; 124|137) TESTS="TIMED OUT after ${LIMIT_TESTS}s" ;;
  *) TESTS="FAILED (rc ${RC[tests]})" ;;
esac
say "step tests: $TESTS"

# ---- 2: micro-benchmarks for the roofline
MICRO=(--json "$OUTDIR/micro.json" --commit "$COMMIT")
[ "$DRY" = 1 ] && MICRO+=(--dry-run)
step micro "$LIMIT_MICRO" "$PY" benchmarks/gpu_micro.py "${MICRO[@]}"

# ---- 3: end to end, every CUDA backend and the peers carried in .whl/
# "fused" is backend="auto", i.e. triton (the chooser) on CUDA: the provider the goals are stated for;
# the dry run forces fused-triton (auto is the CPU backend there)
PROVIDERS=$("$PY" - "$DRY" 2>>"$LOG" <<'PY'
import sys
from fused_objectives.bench.providers import all_providers
first = "fused-triton" if sys.argv[1] == "1" else "fused"
want = [first, "fused-triton_chunked", "fused-triton_fused", "liger", "cce"]
print(" ".join(p for p in want if p in all_providers()))
PY
)
say "providers: ${PROVIDERS:-none}"
if [ "$DRY" = 1 ]; then
  SHAPE=(--hidden 32 --vocab 500 --tokens 64 --device cpu --in-process --repeats 1 --warmup 0 --objective neg_p
         --ignored-fraction 0.5)
else
  SHAPE=(--preset llama3-8b --tokens 8192 --repeats 5 --warmup 2 --max-seconds 2 --objective nll neg_p
         --ignored-fraction 0 0.5)
fi
NOTE="benchmarks/gpu_check.sh commit $COMMIT; GPU tests: $TESTS$([ "$DRY" = 1 ] && echo '; DRY RUN on CPU, not a record')"
# shellcheck disable=SC2086
step e2e "$LIMIT_E2E" "$PY" -m fused_objectives bench "${SHAPE[@]}" --dtype bf16 --provider $PROVIDERS \
  --json "$OUTDIR/bench.json" --note "$NOTE" --quiet

# ---- 4: the reference once (eager fp32 logits: memory and time)
if [ "$DRY" = 1 ]; then
  REF=(--hidden 32 --vocab 500 --tokens 64 --device cpu --in-process --repeats 1 --warmup 0)
else
  REF=(--preset llama3-8b --tokens 8192 --repeats 2 --warmup 1)
fi
step reference "$LIMIT_REF" "$PY" -m fused_objectives bench "${REF[@]}" --dtype bf16 --objective nll \
  --ignored-fraction 0 --provider reference --json "$OUTDIR/reference.json" --note "$NOTE" --quiet

# ---- 5: one profiler kernel table
step profile "$LIMIT_PROFILE" "$PY" - "$OUTDIR/profile.txt" "$DRY" <<'PY'
import sys, torch
import fused_objectives as fo
path, dry = sys.argv[1], sys.argv[2] == "1"
dev = "cpu" if dry else "cuda"
N, H, V = (64, 32, 500) if dry else (8192, 4096, 128256)
g = torch.Generator(device=dev).manual_seed(0)
h = (torch.randn(N, H, device=dev, generator=g) / 4).to(torch.bfloat16).requires_grad_()
w = (torch.randn(V, H, device=dev, generator=g) / H ** 0.5).to(torch.bfloat16).requires_grad_()
y = torch.randint(0, V, (N,), device=dev, generator=g)
step = lambda: fo.linear_objective_loss(h, w, y, objective="neg_p", backend="triton").backward()
step()  # compile and warm up outside the profile
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
with torch.profiler.profile(activities=acts) as prof:
    step()
    if dev == "cuda":
        torch.cuda.synchronize()
avg = prof.key_averages()
key = "self_cpu_time_total" if dev == "cpu" else "self_cuda_time_total"
try:
    table = avg.table(sort_by=key, row_limit=25)
except (KeyError, AttributeError, ValueError):
    table = avg.table(sort_by="self_device_time_total", row_limit=25)
head = f"backend='triton', objective='neg_p', N={N} H={H} V={V} bf16, one fwd+bwd step on {dev}\n"
open(path, "w").write(head + table + "\n")
print(head + table)
PY

# ---- 6: summary: the goals, and the roofline with measured rates beside the measurements
{
  echo "gpu_check summary: commit $COMMIT; GPU tests: $TESTS; steps: $(for k in env micro e2e reference profile; do printf '%s=%s ' "$k" "${RC[$k]:-not run}"; done)"
  [ "$DRY" = 1 ] && echo "DRY RUN on CPU (tiny shapes): tests the script, not a performance record"
  # one summary over both runs (the memory goal compares with the reference's peak)
  MERGED="${TMPDIR:-/tmp}/gpu_check_merged.json"
  rm -f "$MERGED"  # never summarise an earlier run's records
  SUM_EACH=$(( LIMIT_SUMMARY / 3 ))
  "$PY" - "$MERGED" "$OUTDIR/bench.json" "$OUTDIR/reference.json" <<'PY' 2>&1
import json, os, sys
data = None
for path in sys.argv[2:]:
    if os.path.exists(path):
        d = json.load(open(path))
        if data is None:
            data = d
        else:
            data["records"] += d["records"]
if data is not None:
    json.dump(data, open(sys.argv[1], "w"))
PY
  [ -f "$MERGED" ] && timeout -k 1 "$SUM_EACH" "$PY" benchmarks/summarize.py "$MERGED" 2>&1
  if [ -f "$OUTDIR/bench.json" ]; then
    echo; echo "measured vs roofline (spec sheet):"
    timeout -k 1 "$SUM_EACH" "$PY" benchmarks/roofline.py --bench "$OUTDIR/bench.json" 2>&1
  fi
  if [ "$DRY" = 0 ] && [ -f "$OUTDIR/micro.json" ]; then
    echo; echo "roofline with the measured rates of micro.json:"
    timeout -k 1 "$SUM_EACH" "$PY" benchmarks/roofline.py --gpu auto --measured "$OUTDIR/micro.json" 2>&1
  fi
} >"$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt" | tee -a "$LOG"
say "done in $(( $(date +%s) - t0 ))s; files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
[ "${RC[e2e]:-1}" = 0 ] && [ "${RC[tests]}" = 0 -o "${RC[tests]}" = 5 ]
