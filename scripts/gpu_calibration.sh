#!/usr/bin/env bash
# The first calibration on a GPU, in as few device calls as possible (docs: results/README.md).
#
#   bash scripts/gpu_calibration.sh             # on the GPU machine, from the checkout; OUT set by the device tool
#   MODE=trace SHARD=1/26 BUDGET_S=300 OUT=/tmp/rehearsal bash scripts/gpu_calibration.sh   # the same path on a CPU
#
# Steps, each time-boxed so the whole call ends inside BUDGET_S (default 540 s, under the device's
# 10-minute limit per command) with what it measured packed under $OUT:
#   1. vramlab doctor (stop if a check fails)       4. experiments/rtx4090.yaml, capped to a 24 GB card
#   2. experiments/smoke.yaml (stop if any fails)   5. smoke again, cold: `vramlab check` against step 2
#   3. experiments/reference.yaml, warm, resumable  6. vramlab fit, vramlab report
# Records go to $RUNS/<sweep>/<gpu-driver>/ (default results/runs, in this checkout: a second call
# resumes the reference sweep where the first stopped, if the first call's records are in the
# checkout it runs from) and are packed with the workers' logs into $OUT/records.tar.gz as soon as
# the sweeps end; the calibration table, the report and the check go into $OUT/analysis.tar.gz, and
# $OUT/summary.txt says what ran. Nothing else is left under $OUT (the device tool brings back at
# most 8 files, 16 MiB each).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
MODE=${MODE:-measure}
BUDGET_S=${BUDGET_S:-540}
SHARD=${SHARD:-}               # e.g. 1/26: a slice of the reference and rtx4090 sweeps (for a rehearsal)
RESERVE_S=${RESERVE_S:-60}     # kept for fit, report, check and packing
RUNS=${RUNS:-results/runs}
T0=$(date +%s)
VRAMLAB=(python3 -m harness)
WORK=$(mktemp -d)              # logs, doctor's records, the second smoke run, the table and the report
SUMMARY=$OUT/summary.txt
mkdir -p "$OUT" "$RUNS"
: > "$SUMMARY"

if ! python3 -c "import bitsandbytes" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # what the machine lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "cannot install .whl" | tee -a "$SUMMARY"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - RESERVE_S - ($(date +%s) - T0) )); }
step() {  # step NAME MAX_S CMD...: run with a timeout of min(MAX_S, time left); SIGTERM lets a sweep stop cleanly
  local name=$1 max=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt 15 ]; then say "$name: skipped, no time left"; return 124; fi
  say "$name: start (≤ ${t}s)"
  timeout --signal=TERM --kill-after=20 "$t" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc ($(tail -n 1 "$WORK/$name.log"))"
  return $rc
}
# $RUNS/<sweep>/<gpu-driver> (or traced-cpu), the folder `vramlab run` would choose under results/runs
runs_of() { echo "$RUNS/$1/$(python3 -c "import os; from harness.sweep.launcher import default_out_dir; print(os.path.basename(default_out_dir('$1', '$MODE')))")"; }

step doctor 240 "${VRAMLAB[@]}" doctor --out "$WORK/doctor"
case $? in  # 1: a check failed; a timeout (124, 143) only means doctor was slow, and the sweeps say more
  0|124|143) ;;
  *) say "doctor failed: stopping"; DOCTOR_FAILED=1 ;;
esac
if [ -z "${DOCTOR_FAILED:-}" ]; then
  SMOKE=$(runs_of smoke)
  step smoke 120 "${VRAMLAB[@]}" run experiments/smoke.yaml --mode "$MODE" --no-progress --out "$SMOKE"
  if python3 - "$SMOKE" "$MODE" "$SUMMARY" <<'EOF'
import sys
from harness.records import iter_records
from harness.sweep.schema import load_sweep
fine = ("ok", "unsupported") if sys.argv[2] == "trace" else ("ok",)  # traced, bitsandbytes is unsupported
recs = {r["spec_hash"]: r["outcome"] for r in iter_records(sys.argv[1])}
bad = [f"{h} {recs.get(h, 'no record')}" for h in (e.spec_hash for e in load_sweep("experiments/smoke.yaml")[1])
       if recs.get(h) not in fine]
print("smoke failures:", ", ".join(bad) or "none", file=open(sys.argv[3], "a"))
sys.exit(1 if bad else 0)
EOF
  then
    step reference 420 "${VRAMLAB[@]}" run experiments/reference.yaml --mode "$MODE" --no-progress \
      ${SHARD:+--shard "$SHARD"} --out "$(runs_of reference)"
    step rtx4090 180 "${VRAMLAB[@]}" run experiments/rtx4090.yaml --mode "$MODE" --no-progress \
      ${SHARD:+--shard "$SHARD"} --out "$(runs_of rtx4090)"
    step smoke-again 120 "${VRAMLAB[@]}" run experiments/smoke.yaml --mode "$MODE" --no-progress --process cold \
      --out "$WORK/smoke-again"
  else
    say "smoke failed: stopping before the sweeps"
  fi
fi

# The records first, with the workers' logs: whatever happens next, they come back.
pack() {  # pack NAME DIR...: one archive under $OUT, refused (and said) above the 16 MiB a returned file may have
  local name=$1; shift
  tar -czf "$OUT/$name" --exclude='.lock' "$@" 2>> "$SUMMARY"
  local size; size=$(stat -c %s "$OUT/$name")
  if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
    say "$name: $size bytes is over 16 MiB: packing without the workers' logs"
    tar -czf "$OUT/$name" --exclude='.lock' --exclude='.logs' "$@" 2>> "$SUMMARY"
  fi
  say "packed $(du -h "$OUT/$name" | cut -f1) into $name"
}
pack records.tar.gz -C "$(dirname "$RUNS")" "$(basename "$RUNS")" -C "$WORK" $(cd "$WORK" && ls -d *.log doctor smoke-again 2>/dev/null)
# What the records say (the reserve is for these; each is time-boxed too).
A=30
timeout $A "${VRAMLAB[@]}" fit "$RUNS" --out "$WORK/calibration" > "$WORK/fit.log" 2>&1; say "fit: exit $? ($(tail -n 1 "$WORK/fit.log"))"
timeout $A "${VRAMLAB[@]}" report "$RUNS" --out "$WORK/report" > "$WORK/report.log" 2>&1; say "report: exit $? ($(tail -n 1 "$WORK/report.log"))"
timeout $A "${VRAMLAB[@]}" results "$RUNS" --csv "$WORK/results.csv" > /dev/null 2>> "$WORK/report.log"
if [ -d "$WORK/smoke-again" ]; then
  timeout $A "${VRAMLAB[@]}" check "$(runs_of smoke)" "$WORK/smoke-again" --all > "$WORK/check.log" 2>&1
  say "check smoke vs smoke-again (cold): exit $? ($(tail -n 1 "$WORK/check.log"))"
fi
cp "$SUMMARY" "$WORK/summary.txt"
pack analysis.tar.gz -C "$WORK" $(cd "$WORK" && ls -d calibration report results.csv fit.log report.log check.log summary.txt 2>/dev/null)
