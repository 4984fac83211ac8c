#!/usr/bin/env bash
# Runs every benchmark on one device and writes the JSON reports, their tables and the profile to one folder.
#   benchmarks/run_all.sh cpu benchmarks/results            # full size; slow on a shared 2-core CPU
#   benchmarks/run_all.sh cuda benchmarks/results
#   QUICK=1 benchmarks/run_all.sh cpu /tmp/bench            # 2-layer smoke test
set -uo pipefail
PYTHON=${PYTHON:-python3}
status=0
DEVICE=${1:-cpu}
OUTDIR=${2:-benchmarks/results}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUTDIR"
if [[ "${QUICK:-0}" == 1 ]]; then
    EXTRA_FB=(--quick) EXTRA_OV=(--quick)
elif [[ "$DEVICE" == cuda* ]]; then
    # GPU steps are fast: more repetitions; 44 measured steps = 4 whole cycles of core_steps=10 (a cycle is
    # core_steps + 1 optimizer steps) = 22 whole cycles of core_steps=1
    EXTRA_FB=(--wide --warmup 3 --repeats 20) EXTRA_OV=(--warmup 4 --steps 44)
else
    EXTRA_FB=() EXTRA_OV=()
fi
# each benchmark runs even if an earlier one failed; the exit status says whether all succeeded
"$PYTHON" "$HERE/overhead.py" --device "$DEVICE" "${EXTRA_OV[@]}" --output "$OUTDIR/overhead_$DEVICE.json" || status=1
"$PYTHON" "$HERE/forward_backward.py" --device "$DEVICE" "${EXTRA_FB[@]}" \
    --output "$OUTDIR/forward_backward_$DEVICE.json" || status=1
"$PYTHON" "$HERE/overhead.py" --device "$DEVICE" --profile --profile-rows 25 "${EXTRA_OV[@]}" \
    > "$OUTDIR/profile_$DEVICE.txt" || status=1
exit $status
