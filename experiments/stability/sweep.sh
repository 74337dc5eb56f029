#!/usr/bin/env bash
# Runs the stability arms in parallel (one process each) and tars their metrics for analyze.py.
#
#   experiments/stability/sweep.sh OUTDIR STEPS "LRS" "SEEDS" "ARMS" [JOBS]
#   e.g. experiments/stability/sweep.sh experiments/stability/runs 400 "1e-2" "0 1" "baseline clamp" 4
#
# Run directories are OUTDIR/lr<LR>/<arm>-s<seed>; a failing arm leaves its log in <arm>-s<seed>.log.
# PY (default .venv/bin/python, else python3) is the interpreter.
set -euo pipefail
out=$1; steps=$2; lrs=$3; seeds=$4; arms=$5; jobs=${6:-4}
here=$(cd "$(dirname "$0")" && pwd)
py=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$out"
for lr in $lrs; do for arm in $arms; do for seed in $seeds; do
  echo "$lr $arm $seed"
done; done; done | xargs -P "$jobs" -L 1 bash -c '
  lr=$0; arm=$1; seed=$2; d='"$out"'/lr$lr/$arm-s$seed; mkdir -p '"$out"'/lr$lr
  '"$py"' '"$here"'/run_arm.py --arm=$arm --seed=$seed --steps='"$steps"' --lr=$lr --workdir=$d \
    > $d.log 2>&1 && echo "ok   $d" || echo "FAIL $d (see $d.log)"'
