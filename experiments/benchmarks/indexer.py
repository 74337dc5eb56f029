"""Lightning-indexer benchmark on one GPU: Pallas-Triton kernel vs the XLA bf16 reference, same run.

For S in {8K, 32K, 128K} (N = S/4, H = 64, D = 128, topk = 512, ratio = 4, B = 1) it reports:
  * time of the XLA reference (bf16 QK, fp32 accumulation, chunked over 2048 queries, lax.top_k on
    bf16 scores) and of the Triton pipeline for quant None / fp8 / mxfp4, end to end (quantisation of
    q and k included): wall ms (median after warm-up: what a user waits for) and device ms (summed GPU
    kernel time from a profiler trace, `device_timing`), split by stage: the score kernels, the
    select kernels, the refine kernel and the rest (quantisation, XLA glue);
  * the score kernels' rate: TFLOP/s over the causal half (2 * S * N / 2 * H * D) from their device
    time inside the real pipeline, and % of the dense matmul rate measured in the same run (device
    time of 8192^3 dots: bf16 for quant None, FP8 for the quantized modes, whatever operand format
    the kernel uses);
  * compiled temp memory (XLA memory analysis) of each pipeline;
  * recall of the selected sets vs the fp32 exact selection on sampled query rows;
  * refined quantized modes (`candidates=`: quantized scores pick c * topk candidates, rescored exactly,
    see `v4jax.kernels.indexer.refine`), through the public api (Triton refine), with the refine stage
    also timed alone, Triton (`refine_ms`) and XLA (`refine_xla_ms`), on the same candidates;
  * two input families (`--inputs`): "random" (iid Gaussian, as before) and "structured" (a few keys per
    query stand out), generated as `indexer_inputs.make_inputs` documents;
  * correctness guards: every output slot written (-1 count equals topk minus visible count), idx in
    range, no NaN, scores equal to the fp32 recomputation of their idx within the dtype's band.
Usage: python experiments/benchmarks/indexer.py [--sizes 8192,32768,131072] [--inputs random,structured]
       [--set full|refine|scores|fp8mma|mosaic] [--no-scores] [--sweep] [--out DIR]
(`--set refine`: bf16, fp8, mxfp4 and their refined variants only; `--set scores`: chunks, quantizers and
the bf16 dot, no refine; `--set fp8mma`: the FP8 dot against the bf16 dot on the same E4M3 values, and
tiles; `--set mosaic`: the Mosaic GPU score kernel against the Triton one; `--sweep`: also other score-kernel tiles at the default chunk; `--no-scores`: skip the device-time
trace; structured inputs skip the XLA timing and reuse the random run's XLA time of the same S.)
Rows are saved as they come.
Writes a markdown table to stdout and DIR/indexer_table.md, and JSON rows to DIR/indexer.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.kernels import indexer as indexer_api
from v4jax.kernels.indexer import (
  mosaic_gpu,
  quantize,
  reference,
  refine,
  refine_triton,
  triton,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_timing import device_events, matching
from indexer_inputs import make_inputs

H, D, TOPK, RATIO = 64, 128, 512, 4
INTERPRET = bool(os.environ.get("INDEXER_BENCH_INTERPRET"))  # CPU smoke test of this script only


def timed(fn, *args, reps: int = 10, warmup: int = 2) -> float:
  """Median wall time in ms of fn(*args), synchronised, after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)


def temp_mb(fn, *args) -> float:
  """Compiled temporary memory of fn in MiB (XLA memory analysis; excludes arguments/outputs)."""
  try:
    ma = fn.lower(*args).compile().memory_analysis()
    return (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20
  except Exception:  # noqa: BLE001 - memory analysis is best effort
    return float("nan")


def matmul_rates() -> dict:
  """Dense 8192^3 bf16 and fp8 matmul TFLOP/s on this device (the roofline of the score kernel)."""
  n = 256 if INTERPRET else 8192
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  bmat = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
  f_bf16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  a8, b8 = a.astype(jnp.float8_e4m3fn), bmat.astype(jnp.float8_e4m3fn)
  f_fp8 = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.bfloat16))
  out = {}
  for name, f, x, y in (("bf16", f_bf16, a, bmat), ("fp8", f_fp8, a8, b8)):
    ms = device_ms(f, x, y, reps=10) or timed(f, x, y, reps=20)
    out[name] = 2 * n**3 / ms / 1e9
  return out


def device_ms(fn, *args, reps: int = 5):
  """GPU time in ms per call of fn(*args) (all kernels; None off GPU), see `device_timing`."""
  ev = device_events(fn, [args], reps)
  return None if ev is None else 1e3 * sum(ev.values())


def stage_ms(fn, *args, reps: int = 5) -> dict:
  """Device ms per call by pipeline stage: the score kernels, the select kernels, the refine kernel,
  and the rest (quantisation, copies, XLA glue), plus the total; the largest events by name too."""
  ev = device_events(fn, [args], reps)
  if ev is None:
    return {}
  scores = matching(ev, "indexer_scores")
  select = matching(ev, "indexer_select")
  quant = matching(ev, "indexer_quantize")
  refine_k = matching(ev, "refine")
  total = sum(ev.values())
  top = sorted(ev.items(), key=lambda kv: -kv[1])[:6]
  return {"device_ms": 1e3 * total, "scores_ms": 1e3 * scores, "select_ms": 1e3 * select,
          "quantize_ms": 1e3 * quant, "refine_kernel_ms": 1e3 * refine_k,
          "other_ms": 1e3 * (total - scores - select - quant - refine_k),
          "top_events": {name[:60]: round(1e3 * t, 4) for name, t in top}}


def quantizer_check(s, q, k, quant) -> dict:
  """The fused Triton quantizer on this device against the XLA quantizer run on the CPU (where no
  excess-precision rewrite can touch it), on the first 2048 queries and all keys: the fraction of
  operand values and row scales that differ (the kernel aims at 0), and both quantizers' device ms
  on the whole q."""
  from v4jax.kernels.indexer import quantize_triton
  row = {"S": s, "N": k.shape[1], "inputs": "-", "impl": "quantizer check", "quant": quant}
  try:
    cpu = jax.devices("cpu")[0]
    mism = scale_mism = total = 0
    for x in (q[:, :2048], k):
      v, sc = quantize_triton.quantize_rows(x, quant, jnp.bfloat16, interpret=INTERPRET)
      with jax.default_device(cpu):
        rv, rs = quantize.quantize_rows(jnp.asarray(np.asarray(x)), quant)
        rv = np.asarray(quantize.e4m3_as_bf16(rv), np.float32)
      mism += int(np.sum(np.asarray(v, np.float32) != rv))
      scale_mism += int(np.sum(np.asarray(sc) != np.asarray(rs)))
      total += rv.size
    row["value_mismatch"] = mism / total
    row["scale_mismatches"] = scale_mism
    fused = jax.jit(lambda x: quantize_triton.quantize_rows(x, quant, jnp.bfloat16, interpret=INTERPRET))
    xla_q = jax.jit(lambda x: quantize.quantize_rows(x, quant))
    row["fused_quantize_ms"] = device_ms(fused, q, reps=3)
    row["xla_quantize_ms"] = device_ms(xla_q, q, reps=3)
  except Exception as e:  # noqa: BLE001
    row["error"] = repr(e)[:600]
    traceback.print_exc()
  return row


def exact_rows(q, w, k, rows, topk, ratio, quant=None):
  """fp32 exact top-k sets (and full score rows) for a subset of query rows (of fake-quant q, k)."""
  # Fake-quantise on the CPU: XLA:GPU's default xla_allow_excess_precision may drop an
  # f32 -> e4m3 -> f32 round trip, which would make the "quantized" reference unquantized.
  with jax.default_device(jax.devices("cpu")[0]):
    qr, kr = quantize.fake_quant_qk(jnp.asarray(np.asarray(q[0, rows], np.float32)),
                                    jnp.asarray(np.asarray(k[0], np.float32)), quant)
  qr, kr = jax.device_put(qr, jax.devices()[0]), jax.device_put(kr, jax.devices()[0])
  logits = jnp.einsum("rhd,nd->rhn", qr, kr,  # [R, H, N]
                      precision=jax.lax.Precision.HIGHEST)
  sc = jnp.einsum("rhn,rh->rn", jax.nn.relu(logits), w[0, rows].astype(jnp.float32),  # [R, N]
                  precision=jax.lax.Precision.HIGHEST)
  n = k.shape[1]
  vis = jnp.arange(n)[None, :] < ((rows + 1) // ratio)[:, None]
  sc = jnp.where(vis, sc, -jnp.inf)
  vals, idx = jax.lax.top_k(sc, min(topk, n))
  return np.asarray(jnp.where(vals == -jnp.inf, -1, idx)), np.asarray(sc)


def check_and_recall(idx, vals, q, w, k, topk, ratio, rows, quant=None) -> dict:
  """Guards (all slots written, ranges, no NaN, scores match idx) and recall vs fp32 exact."""
  idx, vals = np.asarray(idx), np.asarray(vals)
  n = k.shape[1]
  s = idx.shape[1]
  counts = np.minimum((np.arange(s) + 1) // ratio, n)
  n_invalid = (idx[0] == -1).sum(-1)
  ok_written = bool(np.all(n_invalid == np.maximum(0, topk - counts)))
  ok_range = bool(np.all((idx >= -1) & (idx < n)))
  ok_nan = not bool(np.isnan(vals).any())
  ex_idx, ex_sc = exact_rows(q, w, k, jnp.asarray(rows), topk, ratio)
  hits = total = 0
  num = den = 0.0
  for r_i, r in enumerate(rows):
    got = idx[0, r]
    got_valid = got[got >= 0]
    ex = ex_idx[r_i][ex_idx[r_i] >= 0]
    hits += len(np.intersect1d(got_valid, ex))
    total += len(ex)
    v = vals[0, r][got >= 0]
    ref_v = ex_sc[r_i][got_valid]
    num += float(np.sum((v - ref_v) ** 2))
    den += float(np.sum(ref_v**2))
  out = {"written": ok_written, "in_range": ok_range, "no_nan": ok_nan,
             "recall": hits / max(total, 1), "score_rel_err": (num / max(den, 1e-30)) ** 0.5}
  if quant is not None:  # fidelity of the kernel to its own quantized semantics
    qx_idx, _ = exact_rows(q, w, k, jnp.asarray(rows), topk, ratio, quant)
    hits = total = 0
    for r_i, r in enumerate(rows):
      ex = qx_idx[r_i][qx_idx[r_i] >= 0]
      hits += len(np.intersect1d(idx[0, r][idx[0, r] >= 0], ex))
      total += len(ex)
    out["recall_vs_quant_ref"] = hits / max(total, 1)
  return out


def run_size(s, rates, results, variants, reps, quants, kind="random", xla_times=None,
             scores=True, on_row=lambda: None):
  """Rows for one S and input family: the XLA reference (unless timed already), then each variant;
  on_row() runs after each row (the caller saves the table as it grows)."""
  n = s // RATIO
  q, w, k = make_inputs(kind, s, jax.random.PRNGKey(s))
  xla_times = {} if xla_times is None else xla_times
  flops = 2.0 * s * n / 2 * H * D
  rows = np.unique(np.concatenate([np.linspace(RATIO * 8, s - 1, 384).astype(int), np.arange(s - 64, s)]))
  ref_reps = max(2, min(reps, int(20 * 8192 / s)))

  xla = jax.jit(lambda q_, w_, k_: reference.indexer_topk(q_, w_, k_, TOPK, RATIO, chunk=2048,
                                                           score_dtype=jnp.bfloat16))
  if s not in xla_times:
    row = {"S": s, "N": n, "inputs": kind, "impl": "xla bf16 ref", "quant": "-"}
    try:
      row["ms"] = timed(xla, q, w, k, reps=ref_reps, warmup=1)
      row["device_ms"] = device_ms(xla, q, w, k, reps=min(ref_reps, 3))
      row["temp_MiB"] = temp_mb(xla, q, w, k)
      row.update(check_and_recall(*xla(q, w, k), q, w, k, TOPK, RATIO, rows))
    except Exception as e:  # noqa: BLE001
      row["error"] = repr(e)[:300]
      traceback.print_exc()
    xla_times[s] = row.get("ms")
    xla_times[("device", s)] = row.get("device_ms")
    row["TFLOP/s"] = flops / row["ms"] / 1e9 if "ms" in row else None
    results.append(row)
    print(json.dumps(row), flush=True)
    on_row()
  xla_ms = xla_times[s]
  for quant in ("fp8", "mxfp4"):
    if kind == "random" and quant in quants and any(v[0] == quant for v in variants):
      results.append(quantizer_check(s, q, k, quant))
      print(json.dumps(results[-1]), flush=True)
      on_row()

  for quant, var in variants:
    if quant not in quants or (kind != "random" and quant is None):  # bf16 recall is 100% anyway
      continue
    row = {"S": s, "N": n, "inputs": kind, "impl": "triton", "quant": str(quant), "cfg": str(var)}
    var = dict(var)
    if "candidates" in var:
      results.append(run_refined(row, q, w, k, quant, var["candidates"], reps, xla_ms, flops, rows))
      print(json.dumps(results[-1]), flush=True)
      on_row()
      continue
    row["impl"] = var.pop("backend", "triton")
    backend = mosaic_gpu.indexer_topk if row["impl"] == "mosaic_gpu" else triton.indexer_topk
    try:
      e2e = jax.jit(functools.partial(backend, topk=TOPK, ratio=RATIO, quant=quant,
                                      interpret=INTERPRET, **var)).lower(q, w, k).compile()
      ma = e2e.memory_analysis()  # one compile serves the timing and the memory figure
      row["temp_MiB"] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20 if ma else None
      out = e2e(q, w, k)
      row.update(check_and_recall(*out, q, w, k, TOPK, RATIO, rows, quant))
      row["ms"] = timed(e2e, q, w, k, reps=reps)
      row["TFLOP/s"] = flops / row["ms"] / 1e9
      row["speedup_vs_xla"] = xla_ms / row["ms"] if xla_ms else None
      if scores:  # device time by stage; the score kernels' rate against the tensor-core rate
        row.update(stage_ms(e2e, q, w, k, reps=min(reps, 5)))
        if row.get("scores_ms"):
          row["scores_TFLOP/s"] = flops / row["scores_ms"] / 1e9
          row["scores_%peak"] = 100 * row["scores_TFLOP/s"] / rates["bf16" if quant is None else "fp8"]
        if row.get("device_ms") and xla_times.get(("device", s)):
          row["device_speedup_vs_xla"] = xla_times[("device", s)] / row["device_ms"]
    except Exception as e:  # noqa: BLE001
      row["error"] = repr(e)[:600]
      traceback.print_exc()
    results.append(row)
    print(json.dumps(row), flush=True)
    on_row()


def run_refined(row, q, w, k, quant, candidates, reps, xla_ms, flops, rows) -> dict:
  """Refined quantized selection through the public api (Triton stage 1 + exact rescoring); the
  refine stage is also timed alone on the stage-1 candidates."""
  try:
    e2e = jax.jit(functools.partial(indexer_api.indexer_topk, topk=TOPK, ratio=RATIO, quant=quant,
                                    implementation="triton", interpret=INTERPRET,
                                    candidates=candidates)).lower(q, w, k).compile()
    ma = e2e.memory_analysis()  # one compile serves the timing and the memory figure
    row["temp_MiB"] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20 if ma else None
    out = e2e(q, w, k)
    row.update(check_and_recall(*out, q, w, k, TOPK, RATIO, rows))
    row["ms"] = timed(e2e, q, w, k, reps=reps)
    row["TFLOP/s"] = flops / row["ms"] / 1e9
    row["speedup_vs_xla"] = xla_ms / row["ms"] if xla_ms else None
    row.update(stage_ms(e2e, q, w, k, reps=min(reps, 5)))
    stage1 = jax.jit(functools.partial(indexer_api.indexer_topk, topk=candidates, ratio=RATIO,
                                       quant=quant, implementation="triton", interpret=INTERPRET))
    cand = stage1(q, w, k)[0]
    ref = jax.jit(functools.partial(refine_triton.refine_topk, topk=TOPK, interpret=INTERPRET))
    row["refine_ms"] = timed(ref, q, w, k, cand, reps=reps)
    ref_xla = jax.jit(functools.partial(refine.refine_topk, topk=TOPK, cand_sorted=True))
    row["refine_xla_ms"] = timed(ref_xla, q, w, k, cand, reps=reps)
  except Exception as e:  # noqa: BLE001
    row["error"] = repr(e)[:600]
    traceback.print_exc()
  return row


def table(results, rates) -> str:
  cols = ["S", "inputs", "impl", "quant", "cfg", "ms", "speedup_vs_xla", "device_ms", "device_speedup_vs_xla",
          "scores_ms", "select_ms", "quantize_ms", "refine_kernel_ms", "other_ms", "refine_ms", "refine_xla_ms",
          "scores_TFLOP/s", "scores_%peak", "recall", "recall_vs_quant_ref", "score_rel_err", "temp_MiB",
          "written", "value_mismatch", "scale_mismatches", "fused_quantize_ms", "xla_quantize_ms", "error"]
  lines = [(f"matmul ceilings measured in this run: bf16 {rates['bf16']:.0f} TFLOP/s, "
           f"fp8 {rates['fp8']:.0f} TFLOP/s"), "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in results:
    cells = []
    for c in cols:
      v = r.get(c, "")
      cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="8192,32768,131072")
  ap.add_argument("--sweep", action="store_true", help="also time other score-kernel block configs")
  ap.add_argument("--quants", default="none,fp8,mxfp4")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--inputs", default="random")
  ap.add_argument("--set", default="full", choices=("full", "refine", "scores", "fp8mma", "mosaic"))
  ap.add_argument("--no-scores", action="store_true")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  # Variants of the end-to-end pipeline: (quant, triton.indexer_topk keyword arguments); {} = defaults.
  refined = [("fp8", {"candidates": 2 * TOPK}), ("mxfp4", {"candidates": 2 * TOPK}),
             ("mxfp4", {"candidates": 3 * TOPK})]
  variants = [(None, {}), (None, {"chunk": 2048}), ("fp8", {}), ("fp8", {"chunk": 2048}),
              ("fp8", {"quantizer": "xla"}), ("fp8", {"operands": "e4m3_widen"}), ("fp8", {"operands": "bf16"}),
              ("mxfp4", {}), ("mxfp4", {"quantizer": "xla"})] + refined
  if args.set == "refine":
    variants = [(None, {}), ("fp8", {}), ("mxfp4", {})] + refined
  if args.set == "scores":  # the score kernel's rate: chunks, quantizers (no refine)
    variants = [(None, {}), (None, {"chunk": 2048}), ("fp8", {}), ("fp8", {"chunk": 2048}),
                ("fp8", {"quantizer": "xla"}), ("fp8", {"operands": "bf16"}), ("mxfp4", {})]
  if args.set == "fp8mma":  # the FP8 dot (native accumulation over each head's D) vs the bf16 dot, tiles
    # (session 4 ran this set before FP8 became the default, then spelled operands="e4m3" explicitly)
    variants = [(None, {}), ("fp8", {"operands": "bf16"}), ("fp8", {"heads_per_step": 1}), ("mxfp4", {}),
                ("fp8", {"num_stages": 4}), ("fp8", {"block_k": 256, "num_warps": 8}),
                ("fp8", {"block_q": 128, "num_warps": 8}), ("fp8", {})]
  if args.set == "mosaic":  # the Mosaic GPU score kernel against the Triton one, same pipeline
    variants = [(None, {}), (None, {"backend": "mosaic_gpu"}), ("fp8", {"operands": "bf16"}),
                ("fp8", {"backend": "mosaic_gpu"})]
  if args.sweep:  # score-kernel tiles at the default chunk (session 4's first sweep, bf16 dots at 8K:
    # heads_per_step 2 / 4, 8 warps, 128 x 64 tiles were slower than 64 x 128, 4 warps; 4 stages tied)
    variants += [(q_, cfg) for q_ in (None, "fp8")
                 for cfg in ({"block_k": 256, "num_warps": 8}, {"block_k": 256, "num_warps": 4},
                             {"block_q": 128, "block_k": 256, "num_warps": 8},
                             {"block_k": 256, "num_warps": 8, "num_stages": 2},
                             {"block_q": 128, "num_warps": 8, "num_stages": 4})]
  quants = [None if x == "none" else x for x in args.quants.split(",")]
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  rates = matmul_rates()
  print("rates", rates, flush=True)
  results, xla_times = [], {}
  header = (f"\n## Lightning indexer ({datetime.date.today()}, {jax.devices()[0].device_kind}, "
            f"jax {jax.__version__})\n\nCommand: `python {' '.join(sys.argv)}`\n\n")

  def save():
    with open(os.path.join(args.out, "indexer.json"), "w") as f:
      json.dump({"rates": rates, "rows": results}, f, indent=1)
    with open(os.path.join(args.out, "indexer_table.md"), "w") as f:
      f.write(header + table(results, rates) + "\n")

  for s in [int(x) for x in args.sizes.split(",")]:
    for kind in args.inputs.split(","):
      run_size(s, rates, results, variants, args.reps, quants, kind, xla_times, not args.no_scores,
               on_row=save)
  print(header + table(results, rates))


if __name__ == "__main__":
  main()
