#!/usr/bin/env bash
# The GPU check of issue #5, in one command from the repository root:
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (H100/H200): about 5-7 minutes
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same steps on tiny CPU shapes (tests the script)
# Steps: (1) install wheels carried in .whl/ (liger-kernel; the GPU machine has no network),
# (2) put this checkout on PYTHONPATH (no install), (3) the GPU tests (pytest -m gpu, time-limited),
# (4) the benchmark: llama3-8b, N = 4096 8192 16384, bf16, nll and neg_p, providers fused reference
# torch_compile liger, 0% and 50% ignored tokens, (5) a short table and the issue's goals last.
# Results go to $OUT when set (the device tool's folder), else to benchmarks/results/.
# Environment: PYTHON (default python3, or .venv/bin/python when present and no GPU), GPU_TEST_TIMEOUT
# (s, default 150), BENCH_TIMEOUT (s, default 300), GPU_CHECK_NAME (file stem, default gpu-<gpu>-<date>).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${GPU_CHECK_DRY_RUN:-0}" = "1" ] && DRY=1
t0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - t0 ))s] $*"; }

PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONUNBUFFERED=1

# (1) wheels carried in .whl/ (only what is missing there: liger-kernel)
if compgen -G ".whl/*.whl" >/dev/null; then
  if [ "$DRY" = 1 ]; then
    say "dry run: would install $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    say "installing .whl/ failed: providers needing those wheels will be skipped"
  fi
else
  say "no .whl/ folder: liger is skipped unless already installed"
fi
# (2) this checkout, no install needed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUTDIR="${OUT:-benchmarks/results}"
# a dry run is no performance record: keep it out of benchmarks/results/
[ "$DRY" = 1 ] && [ -z "${OUT:-}" ] && OUTDIR="${TMPDIR:-/tmp}/gpu_check_dry_run"
mkdir -p "$OUTDIR"
"$PY" - <<'PY' || { say "python/torch not usable with $PY"; exit 1; }
import torch, fused_objectives
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
PY
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA GPU visible: run with --dry-run to test this script on CPU"; exit 1
fi
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu-dryrun')" 2>/dev/null || echo unknown)
NAME="${GPU_CHECK_NAME:-gpu-${GPU}-$(date -u +%Y%m%d)}"

# (3) GPU tests (on CPU they are skipped: the dry run only checks that they are collected)
say "pytest -m gpu (limit ${GPU_TEST_TIMEOUT:-150}s)"
timeout -k 10 "${GPU_TEST_TIMEOUT:-150}" "$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider tests/ >"$OUTDIR/$NAME-tests.log" 2>&1
TESTS_RC=$?
tail -n 15 "$OUTDIR/$NAME-tests.log"
case $TESTS_RC in
  0) TESTS="passed" ;; 5) TESTS="none collected" ;; 124|137) TESTS="TIMED OUT after ${GPU_TEST_TIMEOUT:-150}s" ;; *) TESTS="FAILED (rc $TESTS_RC)" ;;
esac
say "GPU tests: $TESTS"

# (4) the benchmark sweep
if [ "$DRY" = 1 ]; then
  SHAPE=(--hidden 64 --vocab 1000 --tokens 256 512 --device cpu --in-process --repeats 2 --warmup 1)
  NOTE="dry run of benchmarks/gpu_check.sh on CPU (tiny shapes): not a performance record"
else
  # N=8192 first: the goals' token count is measured first should the time limit cut the sweep
  SHAPE=(--preset llama3-8b --tokens 8192 4096 16384 --repeats 6 --warmup 2 --max-seconds 3)
  NOTE="benchmarks/gpu_check.sh; tests: $TESTS"
fi
say "bench (limit ${BENCH_TIMEOUT:-300}s)"
timeout -k 10 "${BENCH_TIMEOUT:-300}" "$PY" -m fused_objectives bench "${SHAPE[@]}" --dtype bf16 \
  --objective nll neg_p --provider fused reference torch_compile liger --ignored-fraction 0 0.5 \
  --json "$OUTDIR/$NAME.json" --csv "$OUTDIR/$NAME.csv" --plot "$OUTDIR/$NAME.png" --note "$NOTE" \
  >"$OUTDIR/$NAME-bench.log" 2>&1
BENCH_RC=$?
[ $BENCH_RC = 0 ] || { say "bench exited with $BENCH_RC (124: time limit; the JSON holds the configurations done)"; tail -n 20 "$OUTDIR/$NAME-bench.log"; }

# (5) the short table last
say "done; files in $OUTDIR: $(cd "$OUTDIR" && ls "$NAME"* | tr '\n' ' ')"
echo "GPU tests: $TESTS"
if [ -f "$OUTDIR/$NAME.json" ]; then
  "$PY" benchmarks/summarize.py "$OUTDIR/$NAME.json"
else
  echo "no benchmark results written"
fi
[ $BENCH_RC = 0 ] && [ $TESTS_RC = 0 -o $TESTS_RC = 5 ]
