#!/usr/bin/env bash
# The GPU harness: build, test and benchmark fptt_fast in one call.
#
#   bash benchmarks/gpu_check.sh          on a GPU machine (no network needed): builds
#                                          the extension with CUDA, runs the whole test
#                                          suite, compute-sanitizer, the benchmarks, and
#                                          writes benchmarks/results/<card>-<date>.{json,md}
#   bash benchmarks/gpu_check.sh --quick  on any machine (CI runs this): no rebuild,
#                                          no tests, tiny benchmarks, results to $OUT or
#                                          a temp dir; proves the harness still works.
# Everything it writes also lands in $OUT when set (the device tool brings $OUT back).
# Budget on a GPU: about 8 minutes in all; each stage has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
status=0
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }
LOG="$OUTDIR/harness.log"
: >"$LOG"
run() {  # run <seconds> <command...>: output to the log, its tail to the screen; keep going
  local limit=$1; shift
  local start; start=$(wc -l <"$LOG")
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  tail -n +"$((start + 1))" "$LOG" | tail -n 25
  if [ $rc != 0 ]; then echo "!!! failed (exit $rc): $*"; status=1; fi
}

card=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
day=$(date -u +%Y-%m-%d)
echo "card: $card  date: $day  quick: $QUICK  out: $OUTDIR"
if [ "$QUICK" = 0 ] && [ "$card" = cpu ]; then
  echo "no GPU here: use --quick (or run on a GPU machine)"; exit 2
fi

if [ "$QUICK" = 0 ]; then
  stage "build (CUDA)"
  FPTT_FAST_CUDA=1 run 240 $PY -m pip install -q --no-build-isolation --no-deps -e .
  $PY -c "import fptt_fast, fptt_fast.backends as b; print(b.available('cuda'))" || status=1

  stage "tests on CUDA"
  run 200 $PY -m pytest tests -q -x -p no:cacheprovider

  stage "compute-sanitizer (memcheck, racecheck) on a small run"
  if command -v compute-sanitizer >/dev/null; then
    run 90 compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/sanitize_run.py
    run 90 compute-sanitizer --tool racecheck --error-exitcode 1 $PY benchmarks/sanitize_run.py --cuda-only
  else
    echo "compute-sanitizer not found"; status=1
  fi
fi

stage "benchmarks"
export FPTT_BENCH_QUICK=$QUICK
run 360 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUTDIR/bench.json" \
  --benchmark-columns=median,rounds

stage "report"
if [ -f "$OUTDIR/bench.json" ]; then
  if [ "$QUICK" = 0 ]; then
    dest="benchmarks/results/$card-$day"
  else
    dest="$OUTDIR/quick-$card-$day"
  fi
  run 30 $PY benchmarks/report.py "$OUTDIR/bench.json" --out "$dest.json" --md "$dest.md"
  [ "$QUICK" = 0 ] && cp "$dest.json" "$dest.md" "$OUTDIR/" 2>/dev/null
else
  echo "no benchmark JSON"; status=1
fi
echo; echo "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
