#!/usr/bin/env bash
# One GPU window, one command: the priority list of issue #32 in order, each step packed as it ends
# (docs: results/README.md "The next GPU window").
#
#   bash scripts/gpu_calibration.sh             # on the GPU machine, from the checkout; OUT set by the device tool
#   MODE=trace SHARD=1/130 BUDGET_S=300 OUT=/tmp/rehearsal bash scripts/gpu_calibration.sh   # the same path on a CPU
#
# Which list runs depends on the GPU (the folder `vramlab run` names after it, e.g. nvidia-h200-580.159.04):
#   an environment with a complete smoke sweep (the H200)   a new one (the H100)
#     1. reference, resumed: what no environment has          1. smoke (stop if any fails)
#        measured first, training before inference           2. reference, the same order (as much as fits)
#     2. rtx4090 capped to 24 GB, the boundary searches       3. rtx4090 with the boundary searches
#        first                                               4. the expandable_segments twins
#     3. the expandable_segments twins of both sweeps
# then on either: vramlab fit (a table per environment found), vramlab report (with the category and boundary
# tables), vramlab check of this environment against every other one measured (smoke, reference, rtx4090).
# DOCTOR=1 runs vramlab doctor first (2-4 minutes on a GPU; the smoke sweep checks the harness anyway).
#
# Every step is time-boxed so the call ends inside BUDGET_S (default 540 s, under the device's 10-minute limit
# per command); a sweep stopped by its time box keeps every record written and the next call resumes it, if the
# records of this one are in the checkout it runs from (unpack records.tar.gz into the checkout first). After
# each step the records of this environment and the logs are packed into $OUT/records.tar.gz (written beside and
# moved in whole, so a call killed mid-way still brings back the last complete archive); the tables, the report
# and the checks go into $OUT/analysis.tar.gz, and $OUT/summary.txt says what ran, for how long, and what the
# records' own timings were. Nothing else is left under $OUT (the device tool brings back at most 8 files,
# 16 MiB each).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
MODE=${MODE:-measure}
BUDGET_S=${BUDGET_S:-540}
SHARD=${SHARD:-}               # e.g. 1/130: a slice of the reference and rtx4090 sweeps (for a rehearsal)
RESERVE_S=${RESERVE_S:-45}     # kept for fit, report, check and packing
RUNS=${RUNS:-results/runs}
DOCTOR=${DOCTOR:-0}
T0=$(date +%s)
VRAMLAB=(python3 -m harness)
WORK=$(mktemp -d)              # logs, doctor's records, the tables, the report, the checks
SUMMARY=$OUT/summary.txt
mkdir -p "$OUT" "$RUNS"
: > "$SUMMARY"

# what the machine lacks (find_spec: importing bitsandbytes would import torch, seconds of the window)
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('bitsandbytes') is None)" 2>/dev/null \
   && ls .whl/*.whl >/dev/null 2>&1; then
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
  if [ "$t" -lt 20 ]; then say "$name: skipped, no time left"; return 124; fi
  say "$name: start (≤ ${t}s)"
  local t1; t1=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$t" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $(( $(date +%s) - t1 ))s ($(grep -v '^  search' "$WORK/$name.log" | tail -n 1))"
  grep '^  search' "$WORK/$name.log" >> "$SUMMARY"
  return $rc
}
# The folder `vramlab run` names after this GPU and driver (traced-cpu when tracing).
ENV_DIR=$(python3 -c "import os; from harness.sweep.launcher import default_out_dir; print(os.path.basename(default_out_dir('smoke', '$MODE')))")
runs_of() { echo "$RUNS/$1/$ENV_DIR"; }
pack() {  # pack NAME DIR...: one archive, made in $WORK and moved into $OUT whole; without the logs above 16 MiB
  local name=$1; shift
  tar -czf "$WORK/.$name" --exclude='.lock' "$@" 2>> "$WORK/pack.log"
  if [ "$(stat -c %s "$WORK/.$name")" -gt $((16 * 1024 * 1024)) ]; then
    tar -czf "$WORK/.$name" --exclude='.lock' --exclude='.logs' "$@" 2>> "$WORK/pack.log"
  fi
  mv -f "$WORK/.$name" "$OUT/$name"
}
pack_records() {  # this environment's record folders and the step logs, after every step
  local dirs; dirs=$(cd "$(dirname "$RUNS")" && ls -d "$(basename "$RUNS")"/*/"$ENV_DIR" 2>/dev/null)
  pack records.tar.gz -C "$(dirname "$RUNS")" $dirs -C "$WORK" $(cd "$WORK" && ls -d *.log doctor 2>/dev/null)
  say "packed $(du -h "$OUT/records.tar.gz" | cut -f1) into records.tar.gz ($(echo $dirs | wc -w) record folders)"
}
sweep() {  # sweep STEP MAX_S FILE [run flags…]: `vramlab run` of this mode into this environment's folder
  local name=$1 max=$2 file=$3; shift 3
  local sweep_name; sweep_name=$(basename "$file" .yaml)
  step "$name" "$max" "${VRAMLAB[@]}" run "$file" --mode "$MODE" --no-progress --out "$(runs_of "$sweep_name")" "$@"
  local rc=$?
  pack_records
  return $rc
}
smoke_complete() {  # every smoke experiment has an ok record here (traced: unsupported counts, bitsandbytes cannot trace)
  python3 - "$(runs_of smoke)" "$MODE" <<'EOF'
import sys
from harness.records import iter_records
from harness.sweep.schema import load_sweep
fine = ("ok", "unsupported") if sys.argv[2] == "trace" else ("ok",)
recs = {r["spec_hash"]: r["outcome"] for r in iter_records(sys.argv[1])}
bad = [f"{h} {recs.get(h, 'no record')}" for h in (e.spec_hash for e in load_sweep("experiments/smoke.yaml")[1])
       if recs.get(h) not in fine]
print("smoke failures:", ", ".join(bad) or "none")
sys.exit(1 if bad else 0)
EOF
}

say "environment: $ENV_DIR (mode $MODE, budget ${BUDGET_S}s)"
if [ "$DOCTOR" = 1 ]; then
  step doctor 240 "${VRAMLAB[@]}" doctor --out "$WORK/doctor"
fi
GO=1
if smoke_complete > /dev/null 2>&1; then
  say "smoke already complete here: a measured environment, resuming"
else
  say "no complete smoke sweep here: a new environment"
  sweep smoke 150 experiments/smoke.yaml
  smoke_complete >> "$SUMMARY" 2>&1 || { say "smoke failed: stopping before the sweeps"; GO=; }
fi
if [ -n "$GO" ]; then
  SHARDING=(${SHARD:+--shard "$SHARD"})
  sweep reference 300 experiments/reference.yaml --order unmeasured --only alloc_conf= "${SHARDING[@]}"
  sweep rtx4090 240 experiments/rtx4090.yaml --order unmeasured --only alloc_conf= "${SHARDING[@]}"
  sweep reference-expandable 150 experiments/reference.yaml --order unmeasured \
    --only alloc_conf=expandable_segments:True "${SHARDING[@]}"
  sweep rtx4090-expandable 90 experiments/rtx4090.yaml --order unmeasured \
    --only alloc_conf=expandable_segments:True "${SHARDING[@]}"
fi

# What the records say (the reserve is for these; each is time-boxed too).
python3 scripts/window_summary.py "$RUNS" "$ENV_DIR" "$T0" >> "$SUMMARY" 2>&1
A=25
timeout $A "${VRAMLAB[@]}" fit "$RUNS" --out "$WORK/calibration" > "$WORK/fit.log" 2>&1
say "fit: exit $? ($(grep -c '→' "$WORK/fit.log") table(s); $(tail -n 1 "$WORK/fit.log"))"
timeout $A "${VRAMLAB[@]}" report "$RUNS" --out "$WORK/report" > "$WORK/report.log" 2>&1
say "report: exit $? ($(tail -n 1 "$WORK/report.log"))"
timeout $A "${VRAMLAB[@]}" report "$RUNS" --table categories > "$WORK/categories.md" 2>> "$WORK/report.log"
timeout $A "${VRAMLAB[@]}" report "$RUNS" --table boundary > "$WORK/boundary.md" 2>> "$WORK/report.log"
timeout $A "${VRAMLAB[@]}" results "$RUNS" --csv "$WORK/results.csv" > /dev/null 2>> "$WORK/report.log"
: > "$WORK/check.log"
for this in "$RUNS"/*/"$ENV_DIR"; do  # this environment against every other measured one, sweep by sweep
  [ -d "$this" ] || continue
  for other in "$(dirname "$this")"/*/; do
    other=${other%/}
    case $(basename "$other") in "$ENV_DIR"|traced-*|rehearsed-*) continue ;; esac
    timeout $A "${VRAMLAB[@]}" check "$other" "$this" > "$WORK/check.one" 2>&1
    rc=$?
    { echo "== vramlab check $other $this: exit $rc"; cat "$WORK/check.one"; } >> "$WORK/check.log"
    counts=$(grep -E '^[a-z ]+ [0-9]+(, [a-z ]+ [0-9]+)*$' "$WORK/check.one" | tail -n 1)
    say "check $(basename "$(dirname "$this")"): $(basename "$other") → $ENV_DIR: exit $rc (${counts:-$(tail -n 1 "$WORK/check.one")})"
    grep '^environment effect' "$WORK/check.one" >> "$SUMMARY"
  done
done
rm -f "$WORK/check.one"
cp "$SUMMARY" "$WORK/summary.txt"
pack analysis.tar.gz -C "$WORK" $(cd "$WORK" && ls -d calibration report categories.md boundary.md results.csv fit.log \
  report.log check.log summary.txt 2>/dev/null)
say "packed $(du -h "$OUT/analysis.tar.gz" | cut -f1) into analysis.tar.gz; done in $(( $(date +%s) - T0 ))s"
