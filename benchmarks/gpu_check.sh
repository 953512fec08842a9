#!/usr/bin/env bash
# The GPU harness: build, check and time fptt_fast in one device call.
#
#   bash benchmarks/gpu_check.sh           on a GPU machine (no network needed), in about
#                                          4 minutes: builds the extension with CUDA, then
#                                          stages by priority under one deadline
#                                          (GPU_CHECK_DEADLINE seconds, default 230):
#                                            1. benchmarks/persistent_check.py: the LSTM
#                                               kernels against the reference (correctness,
#                                               determinism) and the headline timings
#                                               (Add omega=1 and 100, T=1000 K=10/1000) beside
#                                               the reference in one CUDA graph and cuDNN;
#                                               wall, kernel (profiler) and graph replay
#                                            2. (--ncu) Nsight Compute on the persistent kernel
#                                            3. the test suite, pytest-xdist -n 6, per-test
#                                               timeouts (a crash or hang is reported, the
#                                               rest still runs)
#                                            4. (--paper) the paper's Add task
#                                            5. compute-sanitizer memcheck, racecheck and
#                                               synccheck on small runs of every CUDA kernel
#                                            6. the update benchmarks (67 K and 50 M params)
#   bash benchmarks/gpu_check.sh --paper   also `fptt-fast compare add --paper` (decoupled FPTT
#                                          vs BPTT at T=1000, 3 seeds, 10000 batches: ~6 min
#                                          estimated from the H200's 13 ms per FPTT batch)
#   bash benchmarks/gpu_check.sh --ncu     also Nsight Compute (--clock-control none; the sections
#                                          one by one: --set full needs PC sampling, absent there) on
#                                          one omega=100 segment of the persistent kernel
#                                          (benchmarks/ncu_run.py); report in logs/ncu.log
#   GPU_CHECK_STAGES="tests ncu" bash benchmarks/gpu_check.sh   the build and those stages only
#   (names: persistent tests tests-host paper ncu sanitizer-memcheck sanitizer-racecheck
#   sanitizer-synccheck bench-update); GPU_CHECK_WORKERS: pytest-xdist workers (default 6)
#   bash benchmarks/gpu_check.sh --quick   on any machine (CI runs this): no rebuild, no
#                                          tests, tiny benchmarks; proves the harness works.
# A stage that no longer fits the deadline is skipped and reported as skipped. Everything
# goes to $OUT (the device tool brings it back: at most 8 files, so the stage logs end up
# in one logs.tgz) and, on a GPU, the summary and JSON to benchmarks/results/<card>-<date>-*.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0; PAPER=0; NCU=0
for a in "$@"; do case "$a" in --quick) QUICK=1;; --paper) PAPER=1;; --ncu) NCU=1;; esac; done
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUTDIR/logs"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-230}
status=0
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
STAGES=" ${GPU_CHECK_STAGES:-all} "  # e.g. GPU_CHECK_STAGES="tests ncu": only those (and the build)
stage() {  # stage <name> <limit s> <command...>: runs if selected and it fits, output to <name>.log
  local name=$1 limit=$2; shift 2
  if [ "$STAGES" != " all " ] && [ "$name" != build ] && [[ "$STAGES" != *" $name "* ]]; then
    note "SKIPPED $name (not in GPU_CHECK_STAGES)"; return
  fi
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then note "SKIPPED $name (deadline: ${rest} s left)"; return; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  echo; echo "=== $name (limit ${limit} s, $(date -u +%H:%M:%S))"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" >"$OUTDIR/logs/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUTDIR/logs/$name.log"
  if [ $rc = 0 ]; then note "ok      $name ($(( $(date +%s) - t0 )) s)"
  else note "FAILED  $name (exit $rc after $(( $(date +%s) - t0 )) s; logs/$name.log)"; status=1; fi
}

card=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
day=$(date -u +%Y-%m-%d)
note "card: $card  date: $day  quick: $QUICK  out: $OUTDIR"
if [ "$QUICK" = 1 ]; then
  DEADLINE=${GPU_CHECK_DEADLINE:-900}  # CI machines are slow and shared
  export FPTT_BENCH_QUICK=1
  stage bench 300 $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUTDIR/bench.json" \
    --benchmark-columns=median,rounds
  [ -f "$OUTDIR/bench.json" ] && stage report 30 $PY benchmarks/report.py "$OUTDIR/bench.json" \
    --out "$OUTDIR/quick-$card-$day.json" --md "$OUTDIR/quick-$card-$day.md"
  tar czf "$OUTDIR/logs.tgz" -C "$OUTDIR" logs && rm -r "$OUTDIR/logs"
  echo; cat "$SUMMARY"; echo "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED)"
  exit $status
fi
if [ "$card" = cpu ]; then echo "no GPU here: use --quick (or run on a GPU machine)"; exit 2; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee -a "$SUMMARY"

DEADLINE=10000 stage build 150 env FPTT_FAST_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
START=$(date +%s)  # the deadline counts from the end of the build
[ "$PAPER" = 1 ] && DEADLINE=$(( DEADLINE + 150 ))
[ "$NCU" = 1 ] && DEADLINE=$(( DEADLINE + 60 ))
stage persistent 100 $PY benchmarks/persistent_check.py --out "$OUTDIR"
res="benchmarks/results/$card-$day"
[ -f "$OUTDIR/persistent.json" ] && cp "$OUTDIR/persistent.json" "$res-persistent.json"
if [ "$NCU" = 1 ]; then
  # application replay: kernel replay could not relaunch the cooperative cluster launch
  # (LaunchFailed, grid 0x0x0, 2026-11-27); not yet tried
  stage ncu 60 ncu --clock-control none --replay-mode application -k regex:lstm_persistent --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis $PY benchmarks/ncu_run.py
fi
# The suite in two stages, so that the part a GPU changes finishes (and prints its failure
# summary) first: the kernels, bindings, graphs and distributed tests; then the command
# line, training loop and reference tests, which CI runs on the CPU anyway.
# -v: each result is logged as it completes, so a stage cut by its limit still names them
GPU_TESTS="tests/test_bindings.py tests/test_update.py tests/test_regularizer.py tests/test_lstm_layouts.py tests/test_update_cuda.py tests/test_update_triton.py
  tests/test_lstm.py tests/test_lstm_cuda.py tests/test_lstm_persistent.py tests/test_lstm_triton.py
  tests/test_lstm_stacked.py tests/test_gru.py
  tests/test_lstm_triton_persistent.py tests/test_graphs.py tests/test_distributed.py
  tests/test_host_path.py tests/test_layout.py tests/test_foundation.py"
HOST_TESTS="tests/test_dtypes.py tests/test_cli.py tests/test_cli_faults.py tests/test_mnist.py tests/test_train.py
  tests/test_reference.py tests/test_cuda_sources.py tests/test_cpu_vectorised.py tests/test_examples.py"
PYTEST_XDIST=(-v -p no:cacheprovider -n "${GPU_CHECK_WORKERS:-6}" --timeout 60 -rfE --durations=15)
stage tests 150 $PY -m pytest $GPU_TESTS "${PYTEST_XDIST[@]}"
stage tests-host 90 $PY -m pytest $HOST_TESTS "${PYTEST_XDIST[@]}"
if [ "$PAPER" = 1 ]; then
  # the run folders (checkpoints, logs) go into logs.tgz; the CSV and figure beside it
  # the chosen variant (the CLI default: decoupled) and BPTT, 3 seeds, 10000 batches each,
  # three runs at a time sharing the GPU (one at a time: ~12 min, beyond one device call)
  stage paper 540 fptt-fast compare add --paper --seeds 0 1 2 --variant decoupled \
    --variant bptt:algo=bptt --jobs 3 --threads 2 --no-progress --out "$OUTDIR/logs/paper"
  for f in compare.csv compare.png summary.csv; do
    [ -f "$OUTDIR/logs/paper/$f" ] && cp "$OUTDIR/logs/paper/$f" "$res-paper-add-T1000-$f" && cp "$OUTDIR/logs/paper/$f" "$OUTDIR/paper-$f"
  done
fi
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    stage "sanitizer-$tool" 60 compute-sanitizer --tool "$tool" --error-exitcode 1 $PY benchmarks/sanitize_run.py --cuda-only
  done
else
  note "FAILED  compute-sanitizer not found"; status=1
fi
stage bench-update 60 env FPTT_BENCH_QUICK=0 $PY -m pytest benchmarks/bench_update.py -q -p no:cacheprovider \
  --benchmark-json="$OUTDIR/bench-update.json" --benchmark-columns=median,rounds
[ -f "$OUTDIR/bench-update.json" ] && cp "$OUTDIR/bench-update.json" "$res-update.json"
cp "$SUMMARY" "$res-summary.txt"
tar czf "$OUTDIR/logs.tgz" -C "$OUTDIR" logs && rm -r "$OUTDIR/logs"
echo; cat "$SUMMARY"
echo "gpu_check: $([ $status = 0 ] && echo OK || echo FAILED) after $(( $(date +%s) - START )) s"
exit $status
