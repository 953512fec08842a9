#!/usr/bin/env bash
# One device call for the persistent CUDA LSTM kernel: build with CUDA, then
# benchmarks/persistent_check.py (correctness vs the reference, determinism, timings).
#   bash benchmarks/gpu_persistent.sh [--quick] [--tests]
# Writes $OUT/build.log, $OUT/check.log, $OUT/persistent.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
t=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
if ! FPTT_FAST_CUDA=1 timeout 300 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1; then
  tail -n 60 "$OUTDIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t )) s"
python3 -c "import fptt_fast.backends as b; print('cuda available:', b.available('cuda'))"
args=()
for a in "$@"; do case "$a" in --quick|--experiments) args+=("$a");; esac; done
timeout 420 python3 benchmarks/persistent_check.py --out "$OUTDIR" "${args[@]}" 2>&1 | tee "$OUTDIR/check.log"
rc=${PIPESTATUS[0]}
echo "persistent_check exit $rc after $(( $(date +%s) - t )) s"
exit $rc
