#!/usr/bin/env bash
# Several JAX processes on one GPU host, one GPU each, joined by jax.distributed (NCCL collectives): the
# multi-host code path (multi-controller JAX) on one machine. Two checks, results under OUT (default ./multihost_out):
#   1. tests/parallel/multiprocess_worker.py in gpu mode: per-process data blocks assemble the global batch, and
#      the expert-parallel MoE whose expert axis spans the processes equals one device (all_gather, all_to_all,
#      ragged_all_to_all), float32 at full precision: parity.json (one report per process).
#   2. the training CLI as N processes (--config.mesh.expert=N) against one process driving all N GPUs, same
#      config and seed: their metrics.jsonl losses should agree (train.log, metrics_*.jsonl).
# Usage: experiments/multihost/two_process_gpu.sh [N=2] [STEPS=40]   (on the GPU host; PYTHONPATH set up;
#        INDEXER=xla sets the training runs' config.model.indexer_impl)
# Checked on CPU (2 processes, 4 steps): parity 1.2e-7 to 1.8e-7, losses equal at every step.
# Without nvidia-smi (or with V4JAX_LAUNCH_CPU=1) it runs the same steps on CPU processes (the worker's CPU
# mode, 4 fake devices each; the CLI with one CPU device per process), which checks this script itself.
set -uo pipefail
N=${1:-2}; STEPS=${2:-40}; OUT=${OUT:-./multihost_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])'; }
if [ "${V4JAX_LAUNCH_CPU:-0}" = 1 ] || ! command -v nvidia-smi >/dev/null; then
  echo "no GPU: CPU processes"; CPU=1; export JAX_PLATFORMS=cpu; WORKER_MODE=""; unset XLA_FLAGS
else  # XLA refuses ragged_all_to_all across processes without its NCCL send/recv fallback (H200 x2, session 11)
  CPU=0; WORKER_MODE=gpu; export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"
fi
one_device() { if [ "$CPU" = 1 ]; then echo ""; else echo "$1"; fi; }  # CUDA_VISIBLE_DEVICES for process i

P=$(port); pids=()
for i in $(seq 0 $((N-1))); do
  CUDA_VISIBLE_DEVICES=$(one_device $i) $PY tests/parallel/multiprocess_worker.py "$i" "$N" "$P" "$OUT/parity_$i.json" $WORKER_MODE \
    > "$OUT/parity_$i.log" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "parity worker $p failed: see $OUT/parity_*.log"; done
$PY -c "import json,sys; print(json.dumps([json.load(open(f'$OUT/parity_{i}.json')) for i in range($N)], indent=1))" \
  > "$OUT/parity.json" 2>/dev/null && cat "$OUT/parity.json"

ARGS=(--config=configs/tiny.py --config.mesh.expert=$N --config.train.steps=$STEPS --config.train.eval_every=$STEPS
      --config.train.checkpoint_every=$STEPS --config.train.log_every=1 --config.train.progress=False --config.optim.warmup_steps=$((STEPS / 4))
      ${INDEXER:+--config.model.indexer_impl=$INDEXER})
P=$(port); pids=(); rm -rf /tmp/v4jax_mp /tmp/v4jax_sp
t0=$(date +%s)
for i in $(seq 0 $((N-1))); do
  CUDA_VISIBLE_DEVICES=$(one_device $i) JAX_COORDINATOR_ADDRESS=localhost:$P JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    $PY -m v4jax.train "${ARGS[@]}" --workdir=/tmp/v4jax_mp > "$OUT/train_process$i.log" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "train process $p failed: see $OUT/train_process*.log"; done
echo "multi-process ($N processes) train: $(( $(date +%s) - t0 )) s"; tail -n 2 "$OUT/train_process0.log"
t0=$(date +%s)
if [ "$CPU" = 1 ]; then export XLA_FLAGS=--xla_force_host_platform_device_count=$N; fi
$PY -m v4jax.train "${ARGS[@]}" --workdir=/tmp/v4jax_sp > "$OUT/train_single.log" 2>&1 || echo "single-process train failed"
echo "single process, $N devices, train: $(( $(date +%s) - t0 )) s"; tail -n 2 "$OUT/train_single.log"
cp /tmp/v4jax_mp/metrics.jsonl "$OUT/metrics_multi.jsonl"; cp /tmp/v4jax_sp/metrics.jsonl "$OUT/metrics_single.jsonl"
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda n: {r["step"]: r for r in map(json.loads, open(f"{out}/metrics_{n}.jsonl"))}
m, s = load("multi"), load("single")
worst = 0.0
for step in sorted(set(m) & set(s)):
    a, b = m[step]["loss"], s[step]["loss"]
    worst = max(worst, abs(a - b) / abs(b))
    print(f"step {step}: loss multi-process {a:.6f}, single process {b:.6f}")
print(f"worst relative loss difference: {worst:.2e}")
PY
