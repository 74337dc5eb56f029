#!/usr/bin/env bash
# The GPU runs for the open issues (and the re-measurement of resolved ones), one argument per run, each bounded
# to fit one device call (10 min).
# Results go under $OUT (the device tool's output folder). Source setup_env.sh first, e.g. in one call:
#   source scripts/gpu/setup_env.sh && bash scripts/gpu/pending_runs.sh fp4
#   ep N      issue 8, on a machine of N = 2 or 4 GPUs: real-GPU parity and step times at expert = 1 .. N, every
#             dispatch mode (expert GEMMs on XLA: tokamax's per-shape compiles ate a whole call in session 3),
#             then the multi-process launcher (N processes, one GPU each).
#   fp4       issue 6 (session 8's first call): grouped decode with window tiles (no padded copy of x) beside the
#             session-7 packed tiles, dense and grouped decode with `overlap` (wgmmas in flight under the next step's
#             decode) beside the session-7 entries, then the public api on the issue's shapes with planar weights
#             (grouped prefill and decode vs tokamax with the VJP, dense decode vs XLA).
#   fp4s8     issue 6, session 8: window tiles' depth against CTAs per SM, the api at decode sizes on the stored
#             table, then fp4ncu.
#   fp4s8b    issue 6, session 8: the api at decode sizes on the stored table, then dense decode occupancy.
#   fp4mid    issue 6, session 8: the api's grouped decode at 32 and 16 tokens.
#   fp4fused  issue 6, session 8: the one-FMA decoder ("asm_fused") beside the stored entries' decoders.
#   fp4s9     issue 6, session 9: asm_fused timed, one XLA kernel's read rate at the dense decode's sizes, the api's
#             dense decode at M = 1, 8, 16.
#   fp4s9b    issue 6, session 9: PTX of the decode kernels (for SASS off the GPU), asm_fused's correctness.
#   fp4s9c    issue 6, session 9: the thread-order planar layout: correctness and time of every planar kernel.
#   fp4s9d    issue 6, session 9: the public api on the session-9 table, every size of the issue.
#   fp4s9e    issue 6, session 9: dense decode tiles on the thread-order layout; the api's dense decode, x unpadded.
#   fp4s9f    issue 6, session 9: dense decode with K split across a CTA's warpgroups (mosaic_gpu.dense_wgs).
#   fp4s10    issue 6, session 10: dense decode with the split-K sum in a cluster's shared memory.
#   fp4s10b   issue 6, session 10: the public api at every size of the issue with the session-10 table.
#   fp4s10c   issue 6, session 10: dense_wgs at M = 16 in CTAs of 8 rows.
#   ep11 N    issue 8, session 11 (nvidia-h200-x2: N=2): the tiny model's first GPU step by indexer backend
#             (scripts/gpu/model_step_diag.py), then `ep` with the indexer that got through.
#   fp4s11    issue 6, session 11: the stream-K dense decode (mosaic_gpu_streamk) beside dense_wgs, every decode size.
#   fp4s12    issue 6, session 12: what bounds the dense decode (fp4_decode_bounds: the pipeline with the copies
#             alone, without the decode, and whole), XLA's read rate and the api's dense decode in the same run.
#   fp4dump   issue 6: ptxas registers and spills and the PTX of the planar kernels (experiments/benchmarks/
#             fp4_sass_dump.py; its docstring says how to get SASS from the PTX off the GPU).
#   fp4ncu    issue 6: Nsight Compute on the dense and grouped decode kernels (the machine runs Firecracker, where
#             ncu reads the counters): stall reasons, issue slots, occupancy, DRAM throughput.
#   fp4diag   issue 6: the session-3 dense decode stage breakdown of the Triton kernel (load, decode, kernel, XLA).
#   indexer   issue 7 (resolved in session 4; re-measure after indexer changes): the score kernels' rate at 8K
#             (quantizers, chunks, tile sweep), then refined quantized selection at 32K / 128K, by stage.
#   mosaic    issue 7's Mosaic GPU score kernel (never run on a GPU): checked and timed against Triton at 8K / 32K.
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"

probe() {  # probe PARTS BUDGET_S TIMEOUT_S: experiments/benchmarks/fp4_mosaic_probe.py's parts, then its rows.
  # A watchdog ends it when no row came for STALL_S seconds (default 90: a hung kernel, session 9 lost 300 s)
  timeout "$3" python3 experiments/benchmarks/fp4_mosaic_probe.py --parts "$1" --budget-s "$2" --out "$OUT" \
    > "$OUT/probe.log" 2>&1 &
  local pid=$! rows=-1 idle=0 n
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5; n=$(cat "$OUT/fp4_mosaic_probe.jsonl" 2>/dev/null | wc -l)
    if [ "$n" != "$rows" ]; then rows=$n; idle=0; else idle=$((idle + 5)); fi
    if [ "$idle" -ge "${STALL_S:-90}" ]; then echo "watchdog: no row for ${idle} s after $rows rows"; kill -9 "$pid"; fi
  done
  wait "$pid"; echo "probe rc=$?"; grep -v '^{' "$OUT/probe.log" | grep -v Autotun | tail -5
  python3 -c "
import json
for l in open('$OUT/fp4_mosaic_probe.jsonl'):
  r = json.loads(l); r.pop('rest', None)
  print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})"
}
case "${1:-}" in
  ep)
    n=${2:?ep needs the GPU count}
    timeout 330 python3 -m v4jax.parallel.bench --parity --scaling --devices "$n" --grouped-impl xla \
      --dispatch all_gather,all_to_all,ragged_all_to_all --out "$OUT/ep.md" > "$OUT/ep.log" 2>&1
    echo "bench rc=$?"; cat "$OUT/ep.md"
    OUT="$OUT/multihost" timeout 230 bash experiments/multihost/two_process_gpu.sh "$n" 40 > "$OUT/mp.log" 2>&1
    echo "launcher rc=$?"; tail -n 30 "$OUT/mp.log" ;;
  ep11)
    # session 11 (kind nvidia-h200-x2 or -x4): where the tiny model's first step goes on one GPU with the default
    # indexer (Triton) and with XLA's (session 11's ep run stalled silently there), then the ep run with the
    # indexer that got through, the multi-process ragged_all_to_all allowed its NCCL fallback
    n=${2:?ep11 needs the GPU count}; end=$((SECONDS + ${EP_BUDGET_S:-570}))
    for impl in auto xla; do
      timeout 100 python3 scripts/gpu/model_step_diag.py "$impl" 30 > "$OUT/diag_$impl.log" 2>&1
      echo "diag $impl rc=$?"; grep '^\[' "$OUT/diag_$impl.log" || tail -n 25 "$OUT/diag_$impl.log"
      if grep -q '^\[.*\] first run' "$OUT/diag_$impl.log"; then break; fi
    done
    impl=auto; grep -q '^\[.*\] first run' "$OUT/diag_auto.log" || impl=xla
    echo "indexer for the ep run: $impl"
    left() { local s=$(( ($1) )); echo $(( s > 1 ? s : 1 )); }  # seconds for the next stage, at least 1
    timeout "$(left "(end - SECONDS) * 3 / 5")" python3 -m v4jax.parallel.bench --parity --scaling --steps 5 --devices "$n" \
      --grouped-impl xla --indexer-impl "$impl" --dispatch all_gather,all_to_all,ragged_all_to_all --out "$OUT/ep.md" \
      > "$OUT/ep.log" 2>&1
    echo "bench rc=$?"; cat "$OUT/ep.md"; grep -v '^|' "$OUT/ep.log" | tail -n 5
    INDEXER=$impl OUT="$OUT/multihost" timeout "$(left "end - SECONDS")" bash experiments/multihost/two_process_gpu.sh "$n" 20 \
      > "$OUT/mp.log" 2>&1
    echo "launcher rc=$?"; tail -n 30 "$OUT/mp.log" ;;
  fp4)
    probe grouped_decode_window,decode_overlap,api_planar 450 540 ;;
  fp4dump)
    export PATH="$PATH:/usr/local/cuda/bin"
    timeout "${DUMP_TIMEOUT:-200}" python3 experiments/benchmarks/fp4_sass_dump.py --decode "${DUMP_DECODE:-asm,asm_lean}" \
      --kernels "${DUMP_KERNELS:-dense,grouped_decode,grouped_prefill}" --out "$OUT/dump" \
      > "$OUT/dump.log" 2>&1; echo "dump rc=$?"; grep ptxas "$OUT/dump.log"; cat "$OUT/dump/sass_summary.txt" ;;
  fp4ncu)
    export PATH="$PATH:/usr/local/cuda/bin"
    timeout "${NCU_TIMEOUT:-400}" ncu --clock-control none --kernel-name regex:fp4_ --launch-skip 3 --launch-count 3 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis python3 experiments/benchmarks/fp4_ncu_decode.py \
      > "$OUT/ncu.txt" 2>&1
    echo "ncu rc=$?"; grep -E "^  [a-z_]+_mosaic_gpu|Duration|Throughput|Stall|Issued|Occupancy|Eligible|Registers|Block Limit|Shared Memory Config|Waves" \
      "$OUT/ncu.txt" | head -120 ;;
  fp4s8b)
    # session 8, second call: the public api at decode sizes on the stored table (grouped decode on window tiles,
    # 2 stages), then dense decode occupancy (pipeline depth, A in shared memory)
    probe api_planar_decode,dense_occupancy 390 450 ;;
  fp4fused)
    # session 8, not yet timed: the one-FMA decoder ("asm_fused") beside the stored entries' decoders
    probe fused 480 540 ;;
  fp4s9)
    # session 9, first call: the one-FMA decoder, one XLA kernel's read rate at the dense decode's sizes, and the
    # api's dense decode at M = 1, 8, 16 (its SASS dump found no CUDA root: fp4s9b puts nvdisasm where Mosaic looks)
    probe floor,fused,api_dense 320 370 ;;
  fp4s9b)
    # session 9: PTX and ptxas report of the dense and grouped decode kernels, then asm_fused on weights it is exact
    # for (correctness on the GPU). Mosaic's own SASS dump still failed to spawn nvdisasm (installed below from the
    # nvidia-cuda-nvdisasm wheel in .whl); the SASS in RESULTS.md session 9 was made off the GPU from the returned
    # PTX with the nvidia-cuda-nvcc (ptxas) and nvidia-cuda-nvdisasm wheels
    mkdir -p /usr/local/cuda/bin && install -m 755 /tmp/site/nvidia/cu13/bin/nvdisasm /usr/local/cuda/bin/nvdisasm \
      && echo "nvdisasm -> /usr/local/cuda/bin"
    DUMP_TIMEOUT=150 DUMP_DECODE=asm_fused DUMP_KERNELS=dense,grouped_decode bash "$0" fp4dump | tail -8
    probe fused_check 100 140 ;;
  fp4s9c)
    # session 9: the thread-order planar layout (16-byte shared-memory loads): correctness on weights within the
    # one-FMA bound, then both decoders on every planar kernel, then the api's dense decode at M = 1, 8, 16
    probe fused_check,fused,api_dense 420 470 ;;
  fp4s9d)
    # session 9: the public api with the session-9 table (thread-order layout, asm_fused entries) on weights within
    # the one-FMA bound: grouped prefill and decode at 64 / 32 / 16 / 8 tokens, dense decode at M = 1, 8, 16
    probe api_fused 440 500 ;;
  fp4s9e)
    # session 9: dense decode tiles on the thread-order layout, then the api's dense decode without the pad of x
    probe dense_sweep9,api_dense_fused 300 350 ;;
  fp4s9f)
    # the dense decode kernel with K split across a CTA's warpgroups (mosaic_gpu.dense_wgs: one kernel per call,
    # no split-K sum), checked and timed against XLA. Session 9's warp-specialized version hung on the H200 twice
    # (eba8829, a2d45b2: setmaxnreg asked 4 compute warpgroups for more registers than 640 threads hold); session
    # 10's has one pipeline per warpgroup and no setmaxnreg
    probe dense_wgs 240 300 ;;
  fp4s10)
    # session 10: the dense decode's split-K partials summed in a cluster's shared memory (BlockConfig.cluster):
    # one kernel per call, checked and timed beside the stored entry and XLA at the six dense decode sizes
    probe dense_cluster 240 300 ;;
  fp4s10b)
    # session 10: the public api with the session-10 table (dense decode on wide N through mosaic_gpu.dense_wgs):
    # dense decode at M = 1, 8, 16 on weights within the one-FMA bound and on full-range ones (asm_lean), then
    # grouped prefill and decode (the kernel's epilogue was rewritten for clusters: checked again)
    probe api_dense_fused,api_dense 150 180
    probe api_grouped_fused 330 370 ;;
  fp4s10c)
    # session 10: dense_wgs at M = 16 with 8 rows of x per CTA (twice the CTAs: 224 at N = 7168, 128 at 4096)
    probe dense_wgs_bm8 100 130 ;;
  fp4s12)
    # session 12: the dense decode's pipeline with its work taken away piece by piece, at M = 8, K = N = 4096 / 7168
    probe bounds,floor,api_dense_fused 400 450 ;;
  fp4s11)
    # session 11: stream-K dense decode (all SMs, partials summed in the kernel through semaphores) by (warpgroups,
    # stages, CTAs) beside dense_wgs, at M = 1 / 8 / 16 and K = N = 7168 / 4096
    probe dense_streamk,api_dense_fused 300 340 ;;
  fp4mid)
    # session 8: the public api's grouped decode at 32 and 16 tokens x top-6 (between the issue's 8 and 64)
    probe api_planar_decode_mid 170 200 ;;
  fp4s8)
    # session 8: window tiles' pipeline depth against CTAs per SM, then the public api at decode sizes with the
    # stored table (grouped decode on window tiles), then Nsight Compute on the decode kernels (fp4ncu)
    probe grouped_decode_window2,api_planar_decode 240 290
    NCU_TIMEOUT=230 bash "$0" fp4ncu ;;
  fp4diag)
    timeout 540 python3 experiments/benchmarks/fp4_decode_diagnose.py --budget-s 420 --out "$OUT" > "$OUT/diag.log" 2>&1
    echo "rc=$?"; grep -v '^{' "$OUT/diag.log" | tail -5
    python3 -c "
import json
for l in open('$OUT/diag.log'):
    if l.startswith('{'):
        r = json.loads(l); c = r.get('config') or {}
        print(r['stage'], r.get('shape'), {k: c[k] for k in ('block_n', 'block_k', 'split_k', 'fuse_x') if k in c},
              'device us', r.get('device_us') and round(r['device_us'], 1), r.get('error', '')[:100])" ;;
  indexer)
    timeout 200 python3 experiments/benchmarks/indexer.py --sizes 8192 --set scores --sweep --reps 5 \
      --out "$OUT/s8k" > "$OUT/indexer_8k.log" 2>&1; echo "8K rc=$?"
    timeout 340 python3 experiments/benchmarks/indexer.py --sizes 32768,131072 --set refine --reps 5 \
      --out "$OUT/refine" > "$OUT/indexer_refine.log" 2>&1; echo "refine rc=$?"
    python3 experiments/benchmarks/indexer_summary.py "$OUT"/s8k/indexer.json "$OUT"/refine/indexer.json ;;
  mosaic)
    timeout 400 python3 experiments/benchmarks/indexer.py --sizes 8192,32768 --set mosaic --quants none,fp8 \
      --reps 5 --out "$OUT/mosaic" > "$OUT/mosaic.log" 2>&1; echo "rc=$?"
    python3 experiments/benchmarks/indexer_summary.py "$OUT"/mosaic/indexer.json ;;
  *) echo "usage: pending_runs.sh ep N | fp4 | fp4s8 | fp4s8b | fp4mid | fp4fused | fp4s9 | fp4s9b | fp4s9c | fp4s9d | fp4s9e | fp4s9f | fp4s10 | fp4s10b | fp4s10c | ep11 N | fp4s11 | fp4s12 | fp4dump | fp4ncu | fp4diag | indexer | mosaic" >&2; exit 2 ;;
esac
