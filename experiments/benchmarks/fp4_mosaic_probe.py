"""Mosaic GPU FP4 kernels on one GPU: device time per kernel (the Pallas kernel apart from the XLA ops around
it), by config and decoder, beside XLA's bf16 dot on the same shapes. A quick probe for tuning; the
issue's table comes from fp4_matmul.py.

Rows (JSON lines in OUT/fp4_mosaic_probe.jsonl, also printed):
  dense: M x K=N, config, decoder ("jnp" or "asm"), total device us per call, the kernel's own us, the
         rest (x planes, scale transpose, split-K sum) by event name, TB/s on the packed bytes, TFLOP/s,
         relative error vs a float32 HIGHEST reference;
  grouped: the same for `mosaic_gpu.grouped` (64 experts, top-6 routing of T tokens, K=4096, N=2048).
  api: the public api (implementation=None) on the issue's shapes, with tokamax / XLA in the same run;
       api_planar: the same with the weights in the load-time layout (`fp4_matmul.to_planar`);
       api_planar_decode: api_planar without the grouped prefill row;
  api_planar_decode_mid: the api's grouped decode at 32 and 16 tokens;
  api_dense: the api's dense decode at M = 1, 8 and 16 (planar weights);
  api_fused: the api on planar weights a quarter as large (scale bytes <= 128: the one-FMA decoder), grouped
       at 8192, 64, 32, 16, 8 tokens and dense at M = 1, 8, 16;
  grouped_decode_window: decode-sized grouped calls with window tiles (`mosaic_gpu.grouped(window=True)`: no
       padded copy of x) beside the session-7 entry's packed tiles;
  grouped_decode_window2: window tiles' pipeline depth against CTAs per SM (session 8);
  decode_overlap: dense and grouped decode with `BlockConfig.overlap` beside the session-7 entries;
  dense_occupancy: dense decode with 2 stages and with A in shared memory (session 8);
  fused: the "asm_fused" decoder beside the stored entries' (dense decode, grouped decode and prefill), on
       random_weight, whose largest scales (byte 129) are past the one-FMA bound: timing only (its rows read NaN);
  fused_check: the same decoders on weights a quarter as large (scale bytes <= 128): correctness on the GPU;
  dense_sweep9: dense decode tiles on the thread-order layout: M = 16 and 8 at K = N = 7168, M = 16 at 4096;
  api_dense_fused: api_dense on weights within the one-FMA bound (what api_fused's dense rows measure);
  api_grouped_fused: api_fused's grouped rows alone;
  dense_wgs_bm8: dense_wgs at M = 16 in CTAs of 8 rows of x (two per weight tile), K = N = 7168 and 4096;
  dense_cluster: the dense decode's split-K partials summed in a cluster's shared memory (BlockConfig.cluster)
       beside the stored entry, at M = 1 / 8 / 16, K = N = 7168 and 4096;
  dense_wgs: `mosaic_gpu.dense_wgs` (K split across a CTA's warpgroups, no split-K sum) at M = 1 / 8 / 16, K = N =
       7168 and 4096;
  bounds: `fp4_decode_bounds.bounds_kernel` at M = 8, K = N = 4096 / 7168: the dense decode's pipeline with the
       copies alone, without the decode, and whole, by (split, wgs, stages);
  dense_streamk: `mosaic_gpu_streamk.dense_streamk` (stream-K: every SM's warpgroups take an equal share of all
       tile x K steps, partials summed in the kernel) by (warpgroups, stages, CTAs), beside dense_wgs, same sizes;
  floor_rows: one-pass XLA reads of the same bytes (a max over each row, by row count);
  floor: what one XLA kernel reads at the dense decode's sizes (the packed bytes of K=N=4096 / 7168, 12 copies:
       past the L2): a max-reduction (read only) and an elementwise copy (read + write), in TB/s of bytes read;
  dense_planar, grouped_planar, grouped_decode_planar: the kernel sweeps on planar weights.
Usage: python experiments/benchmarks/fp4_mosaic_probe.py [--out DIR] [--parts api,api_planar,api_planar_decode,api_prefill,
       api_planar_decode_mid,grouped_decode_window,grouped_decode_window2,decode_overlap,dense_occupancy,fused,fused_check,floor,api_dense,api_fused,api_grouped_fused,api_dense_fused,dense_sweep9,dense_wgs,bounds,floor_rows,dense_wgs_bm8,dense_cluster,dense_streamk,
       dense,dense_planar,prefill,grouped,grouped_planar,grouped_decode,grouped_decode_planar] [--budget-s S]
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_timing import device_events
from fp4_matmul import dense_ref, random_weight, rel_err

from v4jax import quant
from v4jax.kernels.fp4_matmul import mosaic_gpu, mosaic_gpu_streamk, reference
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig as B

KERNEL_NAMES = ("fp4_matmul_mosaic_gpu", "fp4_grouped_mosaic_gpu")


def timed(fn, arg_sets, reps=10):
    """(total device us per call, kernel us, {other event: us}) of jax.jit(fn) over arg_sets."""
    ev = device_events(jax.jit(fn), arg_sets, reps=reps) or {}
    kern = sum(v for k, v in ev.items() if any(n in k for n in KERNEL_NAMES))
    rest = {k[:60]: round(v * 1e6, 2) for k, v in ev.items() if not any(n in k for n in KERNEL_NAMES)}
    return sum(ev.values()) * 1e6, kern * 1e6, rest


def emit(out, row):
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "fp4_mosaic_probe.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _planar(w):
    """w in the Hopper kernel's load-time layout (`fp4_matmul.to_planar`), converted before any timing."""
    from v4jax.kernels import fp4_matmul

    return jax.block_until_ready(fp4_matmul.to_planar(w))


def dense_part(out, m, kn, cfgs, copies, deadline, planar=False, gain=1.0):
    key = jax.random.key(kn + m)
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (m, kn), jnp.bfloat16)
    ws = [quant.quantize(gain * random_weight(jax.random.fold_in(kw, i), (kn, kn)), "mxfp4") for i in range(copies)]
    ref = dense_ref(x, ws[0])
    wd = [quant.dequantize(w).astype(jnp.bfloat16) for w in ws]
    xla_total, _, _ = timed(lambda a, w: jnp.dot(a, w.T), [(x, w) for w in wd])
    packed = ws[0].values.size + ws[0].scales.size
    emit(out, {"part": "dense", "m": m, "kn": kn, "impl": "xla_bf16", "total_us": xla_total})
    wk = [_planar(w) for w in ws] if planar else ws
    for cfg, regs in cfgs:
        if time.time() > deadline:
            print("budget reached", flush=True)
            return
        row = {"part": "dense", "layout": "planar" if planar else "qarray", "m": m, "kn": kn,
               "cfg": [cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages], "decode": cfg.decode,
               "overlap": cfg.overlap, "cluster": cfg.cluster, "a_regs": regs}
        try:
            f = lambda a, w, cfg=cfg, regs=regs: mosaic_gpu.dense(a, w.values, w.scales, cfg=cfg,
                                                                 a_in_registers=regs, planar=planar)
            y = jax.block_until_ready(f(x, wk[0]))
            row["rel_err"] = rel_err(y, ref)
            total, kern, rest = timed(f, [(x, w) for w in wk])
            row.update(total_us=total, kernel_us=kern, rest=rest, xla_bf16_us=xla_total,
                       x_vs_xla=xla_total / total, kernel_tbps=packed / kern / 1e6 if kern else None,
                       kernel_tflops=2 * m * kn * kn / kern / 1e6 if kern else None)
        except Exception as e:  # noqa: BLE001  a config that does not compile is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        emit(out, row)


def _planar_decode_inputs(m, kn, copies, gain):
    """A dense decode's inputs: bf16 x [m, kn], `copies` planar K = N = kn weights (past the L2), the float64
    reference on the first, the packed bytes per weight and XLA's bf16 dot timed on the same shapes (us)."""
    kx, kw = jax.random.split(jax.random.key(kn + m))
    x = jax.random.normal(kx, (m, kn), jnp.bfloat16)
    ws = [quant.quantize(gain * random_weight(jax.random.fold_in(kw, i), (kn, kn)), "mxfp4") for i in range(copies)]
    xla_total, _, _ = timed(lambda a, w: jnp.dot(a, w.T), [(x, quant.dequantize(w).astype(jnp.bfloat16)) for w in ws])
    return x, [_planar(w) for w in ws], dense_ref(x, ws[0]), ws[0].values.size + ws[0].scales.size, xla_total


def dense_wgs_part(out, m, kn, variants, deadline, copies=12, gain=0.25, bm=None, streamk=False):
    """`mosaic_gpu.dense_wgs` (K split across a CTA's warpgroups, one kernel per call) for each (wgs, stages),
    beside XLA's bf16 dot, on planar weights within the one-FMA bound; `bm`: rows of x per CTA (default M
    rounded up to 8, at most 16; a smaller bm reads each weight tile once per bm rows, from the L2 after the first).
    `streamk`: `mosaic_gpu_streamk.dense_streamk` instead, for each (wgs, stages, ctas)."""
    x, wk, ref, packed, xla_total = _planar_decode_inputs(m, kn, copies, gain)
    bm = bm or min(16, -(-m // 8) * 8)
    for wgs, stages, *ctas in variants:
        if time.time() > deadline:
            print("budget reached", flush=True)
            return
        row = {"part": "dense_streamk" if streamk else "dense_wgs", "m": m, "kn": kn, "wgs": wgs, "stages": stages,
               "bm": bm, "xla_bf16_us": xla_total}
        try:
            if streamk:
                row["ctas"] = ctas[0]
                f = lambda a, w, wgs=wgs, stages=stages, c=ctas[0]: mosaic_gpu_streamk.dense_streamk(
                    a, w.values, w.scales, ctas=c, wgs=wgs, stages=stages)
            else:
                f = lambda a, w, wgs=wgs, stages=stages: mosaic_gpu.dense_wgs(a, w.values, w.scales, wgs=wgs, bm=bm,
                                                                             stages=stages)
            y = jax.block_until_ready(f(x, wk[0]))
            row["rel_err"] = rel_err(y, ref)
            total, kern, rest = timed(f, [(x, w) for w in wk])
            row.update(total_us=total, kernel_us=kern, rest=rest, x_vs_xla=xla_total / total,
                       tbps=packed / total / 1e6, pct_copy=packed / total / 1e6 / 3.37 * 100)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        emit(out, row)


BOUNDS = {  # (split, wgs, stages) per K = N: dense_wgs's shape first, the stored split-K entry's shape last
    4096: ((1, 4, 2), (2, 4, 2), (2, 2, 4), (2, 1, 8), (4, 2, 2), (4, 1, 4), (16, 1, 1), (8, 1, 2)),
    7168: ((1, 4, 2), (1, 4, 3), (1, 2, 4), (1, 2, 7), (1, 7, 2), (2, 2, 2), (4, 1, 4), (7, 1, 4)),
}


def bounds_part(out, kn, deadline, m=8, copies=12, gain=0.25):
    """`fp4_decode_bounds.bounds_kernel` at M = 8: per (split, wgs, stages), the copies alone ("stream"), the loads
    and wgmmas without the decode ("nodecode") and dense_wgs's whole step ("full"), kernel us and % of copy
    bandwidth on the packed bytes, beside XLA's bf16 dot on the same shape."""
    import fp4_decode_bounds

    x, wk, ref, packed, xla_total = _planar_decode_inputs(m, kn, copies, gain)
    emit(out, {"part": "bounds", "m": m, "kn": kn, "impl": "xla_bf16", "total_us": xla_total})
    for split, wgs, stages in BOUNDS[kn]:
        for mode in fp4_decode_bounds.MODES:
            if time.time() > deadline:
                print("budget reached", flush=True)
                return
            row = {"part": "bounds", "m": m, "kn": kn, "mode": mode, "split": split, "wgs": wgs, "stages": stages,
                   "ctas": kn // 64 * split, "xla_bf16_us": xla_total}
            try:
                f = lambda a, w, mode=mode, s=split, g=wgs, st=stages: fp4_decode_bounds.bounds_kernel(
                    a, w.values, w.scales, mode=mode, split=s, wgs=g, stages=st)
                y = jax.block_until_ready(f(x, wk[0]))
                if mode == "full":
                    row["rel_err"] = rel_err(y.astype(jnp.float32).sum(0), ref)
                _, kern, _ = timed(f, [(x, w) for w in wk])
                row.update(kernel_us=kern, pct_copy=packed / kern / 1e6 / 3.37 * 100 if kern else None,
                           x_vs_xla=xla_total / kern if kern else None)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            emit(out, row)


def floor_part(out, kn, copies=12):
    """The bandwidth one XLA kernel gets on the dense decode's packed bytes (values + scales of a K = N = kn
    weight): a read-only reduction and an elementwise copy, over `copies` buffers (past the 60 MB L2)."""
    nbytes = kn * kn // 2 + kn * kn // 32
    bufs = [jax.random.bits(jax.random.key(i), (nbytes // 4,), jnp.uint32) for i in range(copies)]
    for name, fn in (("read_max", lambda b: jnp.max(b)), ("copy_xor", lambda b: b ^ jnp.uint32(1))):
        total, _, rest = timed(fn, [(b,) for b in bufs])
        emit(out, {"part": "floor", "kn": kn, "op": name, "bytes_read": nbytes, "total_us": total,
                   "tbps_read": nbytes / total / 1e6, "events": rest})


def floor_rows_part(out, kn, copies=12, rows=(256, 1024, 4096, 8192)):
    """The fastest one-pass read XLA makes of the same bytes: a max over each row of the buffer seen as
    [r, nbytes / 4r] uint32, for each row count r (one kernel each, no second pass as in `floor_part`'s full
    reduction), over `copies` buffers (past the L2)."""
    nbytes = kn * kn // 2 + kn * kn // 32
    bufs = [jax.random.bits(jax.random.key(i), (nbytes // 4,), jnp.uint32) for i in range(copies)]
    for r in rows:
        total, _, rest = timed(lambda b, r=r: jnp.max(b.reshape(r, -1), axis=1), [(b,) for b in bufs])
        emit(out, {"part": "floor_rows", "kn": kn, "rows": r, "bytes_read": nbytes, "total_us": total,
                   "tbps_read": nbytes / total / 1e6, "pct_copy": nbytes / total / 1e6 / 3.37 * 100, "events": rest})


def grouped_part(out, tokens, cfgs, deadline, g=64, k=4096, n=2048, topk=6, planar=False, gain=1.0):
    """`cfgs`: BlockConfigs, or (BlockConfig, window) pairs (`mosaic_gpu.grouped(window=...)`)."""
    key = jax.random.key(tokens)
    kx, kw, kr = jax.random.split(key, 3)
    w = quant.quantize(gain * random_weight(kw, (g, n, k)), "mxfp4")
    choice = jax.vmap(lambda kk: jax.random.choice(kk, g, (topk,), replace=False))(jax.random.split(kr, tokens))
    group_sizes = jnp.bincount(choice.reshape(-1), length=g).astype(jnp.int32)
    m = tokens * topk
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    ref = reference.fp4_grouped_matmul_reference(x.astype(jnp.float32), w, group_sizes)
    touched = int(jnp.sum(group_sizes > 0))
    packed = (w.values.size + w.scales.size) * touched // g
    flops = 2 * m * n * k
    row0 = {"part": "grouped", "tokens": tokens, "m": m, "experts_touched": touched}
    try:
        from v4jax.kernels.grouped_matmul.api import grouped_matmul

        wd = jnp.swapaxes(quant.dequantize(w).astype(jnp.bfloat16), 1, 2)  # [G, K, N]: the "x @ w" layout
        tk_total, _, _ = timed(lambda a, ww: grouped_matmul(a, ww, group_sizes), [(x, wd)])
        emit(out, {**row0, "impl": "tokamax_bf16", "total_us": tk_total,
                   "tflops": flops / tk_total / 1e6})
    except Exception as e:  # noqa: BLE001
        tk_total = None
        emit(out, {**row0, "impl": "tokamax_bf16", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    wk = _planar(w) if planar else w
    for item in cfgs:
        cfg, window = item if isinstance(item, tuple) else (item, False)
        if time.time() > deadline:
            print("budget reached", flush=True)
            return
        row = {**row0, "layout": "planar" if planar else "qarray", "window": window, "overlap": cfg.overlap,
               "cfg": [cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages], "decode": cfg.decode}
        try:
            f = lambda a, gs, cfg=cfg, window=window: mosaic_gpu.grouped(a, wk.values, wk.scales, gs, cfg=cfg,
                                                                         planar=planar, window=window)
            y = jax.block_until_ready(f(x, group_sizes))
            row["rel_err"] = rel_err(y, ref)
            total, kern, rest = timed(f, [(x, group_sizes)])
            row.update(total_us=total, kernel_us=kern, rest=rest, tflops=flops / total / 1e6,
                       tbps_touched=packed / total / 1e6,
                       x_vs_tokamax=tk_total / total if tk_total else None)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        emit(out, row)


def api_part(out, deadline, reps=10, token_counts=(8192, 64, 8), dense=True, planar=False, dense_ms=(16,),
             gain=1.0):
    """The public api with implementation=None (what the model calls): grouped at 8192, 64 and 8 tokens x
    top-6 against tokamax's bf16 ragged_dot, dense M=16 against XLA's bf16 dot, and the grouped VJP (dx)
    against the reference on the GPU. `planar`: the weights in the load-time layout (`fp4_matmul.to_planar`,
    converted before timing). `gain` scales the random weights (1/4: every scale byte <= 128, so planar weights
    take the one-FMA decoder where the table says asm_fused; random_weight's largest scales are byte 129)."""
    from v4jax.kernels import fp4_matmul
    from v4jax.kernels.grouped_matmul.api import grouped_matmul

    layout = _planar if planar else (lambda ww: ww)
    g, k, n, topk = 64, 4096, 2048, 6
    w = quant.quantize(gain * random_weight(jax.random.key(7), (g, n, k)), "mxfp4")
    w_api = layout(w)
    wd = jnp.swapaxes(quant.dequantize(w).astype(jnp.bfloat16), 1, 2)  # [G, K, N] for tokamax
    for tokens in token_counts:
        if time.time() > deadline:
            return
        kx, kr = jax.random.split(jax.random.key(tokens))
        choice = jax.vmap(lambda kk: jax.random.choice(kk, g, (topk,), replace=False))(jax.random.split(kr, tokens))
        sizes = jnp.bincount(choice.reshape(-1), length=g).astype(jnp.int32)
        m = tokens * topk
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        ref = reference.fp4_grouped_matmul_reference(x.astype(jnp.float32), w, sizes)
        f = lambda a, gs: fp4_matmul.fp4_grouped_matmul(a, w_api, gs)
        y = jax.block_until_ready(jax.jit(f)(x, sizes))
        total, kern, rest = timed(f, [(x, sizes)], reps)
        tk, _, _ = timed(lambda a, ww, gs: grouped_matmul(a, ww, gs), [(x, wd, sizes)], reps)
        touched = int(jnp.sum(sizes > 0))
        packed = (w.values.size + w.scales.size) * touched // g
        row = {"part": "api_grouped", "layout": "planar" if planar else "qarray", "gain": gain,
               "max_scale": getattr(w_api, "max_scale", None), "tokens": tokens, "m": m, "experts_touched": touched,
               "rel_err": rel_err(y, ref), "nan": bool(jnp.any(jnp.isnan(y))), "total_us": total,
               "kernel_us": kern, "glue_us": total - kern, "tokamax_us": tk, "x_vs_tokamax": tk / total,
               "tflops": 2 * m * n * k / total / 1e6, "tbps_touched": packed / total / 1e6}
        if tokens == 64:  # dL/dx of the api's custom VJP against autodiff of the reference, on the GPU
            dy = jax.random.normal(jax.random.key(3), (m, n), jnp.float32)
            gx = jax.grad(lambda a: jnp.sum(fp4_matmul.fp4_grouped_matmul(a, w_api, sizes).astype(jnp.float32) * dy))
            gr = jax.grad(lambda a: jnp.sum(reference.fp4_grouped_matmul_reference(a, w, sizes) * dy))
            row["vjp_rel_err"] = rel_err(jax.jit(gx)(x), gr(x.astype(jnp.float32)))
        emit(out, row)
    for kn in (4096, 7168) if dense else ():
        if time.time() > deadline:
            return
        ws = [quant.quantize(gain * random_weight(jax.random.key(kn + i), (kn, kn)), "mxfp4") for i in range(12)]
        wds = [quant.dequantize(ww).astype(jnp.bfloat16) for ww in ws]
        f = lambda a, ww: fp4_matmul.fp4_matmul(a, ww)
        ws_api = [layout(ww) for ww in ws]
        packed = ws[0].values.size + ws[0].scales.size
        for m in dense_ms:
            if time.time() > deadline:
                return
            x = jax.random.normal(jax.random.key(kn), (m, kn), jnp.bfloat16)
            y = jax.block_until_ready(jax.jit(f)(x, ws_api[0]))
            total, kern, rest = timed(f, [(x, ww) for ww in ws_api], reps)
            xla, _, _ = timed(lambda a, ww: jnp.dot(a, ww.T), [(x, ww) for ww in wds], reps)
            emit(out, {"part": "api_dense", "layout": "planar" if planar else "qarray", "gain": gain,
                       "max_scale": getattr(ws_api[0], "max_scale", None), "m": m, "kn": kn,
                       "rel_err": rel_err(y, dense_ref(x, ws[0])), "total_us": total, "kernel_us": kern,
                       "glue_us": total - kern, "rest": rest, "xla_bf16_us": xla, "x_vs_xla": xla / total,
                       "tbps": packed / total / 1e6, "kernel_tbps": packed / kern / 1e6 if kern else None})


DENSE_DECODE = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm"), True),
    (B(64, block_n=128, block_k=256, split_k=8, num_stages=4, decode="asm"), True),
    (B(64, block_k=256, split_k=4, num_stages=6, decode="asm"), True),
]
DENSE_PREFILL = [
    (B(128, block_k=256, split_k=1, num_stages=2, decode="asm"), True),
    (B(128, block_n=128, block_k=256, split_k=1, num_stages=2, decode="asm"), True),
    (B(64, block_n=128, block_k=256, split_k=1, num_stages=3, decode="asm"), True),
]
GROUPED = [
    B(64, block_n=128, block_k=256, num_stages=3, decode="asm"),  # the stored table's entry
    B(64, block_n=128, block_k=512, num_stages=2, decode="asm"),
    B(96, block_n=128, block_k=256, num_stages=2, decode="asm"),
]
GROUPED_DECODE = [
    B(8, block_k=256, split_k=4, num_stages=4, decode="asm"),
    B(8, block_n=128, block_k=256, split_k=4, num_stages=4, decode="asm"),
    B(8, block_n=128, block_k=256, split_k=2, num_stages=6, decode="asm"),
]
# planar weights: no x plane split and no scale transpose, so the split-K sum is the only XLA op left around a
# dense call; the word decoder (session 7) cuts the decode's integer ops about 2.5x, so deeper pipelines and split 1
# (no sum at all) may now win; "asm_lean" also converts the E8M0 scales in two ops instead of five
DENSE_DECODE_PLANAR = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm"), True),  # the stored table's tiles
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), True),  # the stored entry since session 7
    (B(64, block_k=256, split_k=4, num_stages=6, decode="asm_lean"), True),
    (B(64, block_n=128, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), True),
    (B(64, block_k=512, split_k=2, num_stages=4, decode="asm_lean"), True),
    (B(64, block_k=512, split_k=1, num_stages=6, decode="asm_lean"), True),
    (B(64, block_k=256, split_k=2, num_stages=8, decode="asm_lean"), True),
]
# window tiles (session 7, first timed in session 8): a group of up to bm - 7 rows is one tile, so bm 16 for decode;
# first the session-7 entry with packed tiles (the padded copy of x), for the comparison
GROUPED_DECODE_WINDOW = [
    (B(8, block_k=512, split_k=1, num_stages=4, decode="asm_lean"), False),
    (B(16, block_k=512, split_k=1, num_stages=4, decode="asm_lean"), True),
    (B(16, block_k=512, split_k=1, num_stages=3, decode="asm_lean"), True),
    (B(16, block_k=256, split_k=4, num_stages=4, decode="asm_lean"), True),
]
# `overlap` (session 7, timed in session 8: under 2%): a K step's wgmmas stay in flight under the next step's decode
DENSE_DECODE_OVERLAP = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), True),  # the stored entry
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean", overlap=True), True),
    (B(64, block_k=256, split_k=4, num_stages=6, decode="asm_lean", overlap=True), True),
    (B(64, block_k=512, split_k=1, num_stages=6, decode="asm_lean", overlap=True), True),
]
GROUPED_DECODE_OVERLAP = [
    B(8, block_k=512, split_k=1, num_stages=4, decode="asm_lean"),  # the session-7 entry
    B(8, block_k=512, split_k=1, num_stages=4, decode="asm_lean", overlap=True),
    (B(16, block_k=512, split_k=1, num_stages=4, decode="asm_lean", overlap=True), True),  # + window tiles
]
# session 8: window tiles won with 3 stages (120 us at 64 tokens) and lost with 4 (162 us): with bm 16 and 512-wide
# K steps a stage is 33 KB, so 4 stages leave one CTA per SM and 3 leave two; the 3-stage entry of that moment beside
# 2 stages (three CTAs per SM), 256-wide steps with 4 stages (the same 66 KB), and the packed tiles with 3 stages
GROUPED_DECODE_WINDOW2 = [
    (B(16, block_k=512, split_k=1, num_stages=3, decode="asm_lean"), True),  # the stored entry during run 2
    (B(16, block_k=512, split_k=1, num_stages=2, decode="asm_lean"), True),  # the stored entry since run 2
    (B(16, block_k=256, split_k=1, num_stages=4, decode="asm_lean"), True),
    (B(8, block_k=512, split_k=1, num_stages=3, decode="asm_lean"), False),
]
# session 8, Nsight Compute: the dense decode kernel is latency-bound (0.49 issues per cycle, 25% / 38% of DRAM
# bandwidth at K=N=4096 / 7168) at 16 / 12 warps per SM, limited by its 98 registers (4 CTAs) and, at 7168, by 4
# pipeline stages' shared memory (3 CTAs); 2 stages lift the shared-memory limit, and A in shared memory frees the
# decoded tile's registers (64 per thread) for more CTAs per SM
DENSE_DECODE_OCCUPANCY = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), True),  # the stored table's entry
    (B(64, block_k=256, split_k=8, num_stages=2, decode="asm_lean"), True),
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), False),
    (B(64, block_k=256, split_k=8, num_stages=2, decode="asm_lean"), False),
]
# session 8, not yet timed: "asm_fused" (one bf16x2 FMA per decoded register instead of two, for scales <= 2;
# random_weight's scales are far below) beside the stored entries' decoders, dense and grouped decode and prefill
DENSE_DECODE_FUSED = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_lean"), True),  # the stored entry
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_fused"), True),
]
GROUPED_FUSED = [
    (B(16, block_k=512, split_k=1, num_stages=2, decode="asm_lean"), True),  # the stored decode entry
    (B(16, block_k=512, split_k=1, num_stages=2, decode="asm_fused"), True),
]
GROUPED_PREFILL_FUSED = [
    B(96, block_n=128, block_k=256, split_k=1, num_stages=2, decode="asm"),  # the stored prefill entry
    B(96, block_n=128, block_k=256, split_k=1, num_stages=2, decode="asm_fused"),
]
# session 9: the dense decode tiles again on the thread-order layout (shorter loads, one FMA per register): fewer,
# wider K steps (less per-step overhead: TMA barrier waits, wgmma waits), fewer or more K splits, overlap
DENSE_CLUSTER = [  # session 10: split-K partials added in a cluster's shared memory instead of an XLA sum
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_fused"), True),  # the stored entry
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_fused", cluster=True), True),
    (B(64, block_k=256, split_k=4, num_stages=4, decode="asm_fused", cluster=True), True),
    (B(64, block_n=128, block_k=256, split_k=8, num_stages=2, decode="asm_fused", cluster=True), True),
]
DENSE_DECODE_SWEEP9 = [
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_fused"), True),  # the stored entry
    (B(64, block_k=512, split_k=8, num_stages=2, decode="asm_fused"), True),
    (B(64, block_k=512, split_k=4, num_stages=3, decode="asm_fused"), True),
    (B(64, block_k=256, split_k=4, num_stages=4, decode="asm_fused"), True),
    (B(64, block_k=256, split_k=16, num_stages=2, decode="asm_fused"), True),
    (B(64, block_k=256, split_k=8, num_stages=4, decode="asm_fused", overlap=True), True),
    (B(64, block_n=128, block_k=256, split_k=8, num_stages=2, decode="asm_fused"), True),
]
GROUPED_DECODE_PLANAR = [
    B(8, block_k=256, split_k=4, num_stages=4, decode="asm"),  # the stored table's entry until session 7
    B(8, block_k=256, split_k=4, num_stages=4, decode="asm_lean"),
    B(8, block_k=512, split_k=1, num_stages=4, decode="asm_lean"),  # the stored table's entry since session 7
    B(8, block_k=256, split_k=2, num_stages=6, decode="asm_lean"),
    B(8, block_n=128, block_k=256, split_k=4, num_stages=4, decode="asm_lean"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--parts", default="dense,prefill,grouped,grouped_decode")
    ap.add_argument("--budget-s", type=float, default=480)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":  # device time comes from GPU kernel events; the kernels need Hopper
        raise SystemExit("fp4_mosaic_probe: needs a GPU (Hopper); the CPU tests are tests/kernels/test_fp4_matmul*.py")
    deadline = time.time() + args.budget_s
    print(jax.devices(), flush=True)
    for part in args.parts.split(","):  # in the order given
        if part == "dense":
            for kn in (4096, 7168):
                dense_part(args.out, 16, kn, DENSE_DECODE, 12, deadline)
        elif part == "prefill":
            dense_part(args.out, 4096, 4096, DENSE_PREFILL, 2, deadline)
        elif part == "api":
            api_part(args.out, deadline)
        elif part == "api_prefill":  # the grouped prefill row alone
            api_part(args.out, deadline, token_counts=(8192,), dense=False)
        elif part == "api_planar":  # the api rows with the weights in the load-time layout
            api_part(args.out, deadline, planar=True)
        elif part == "api_planar_decode":  # the same, decode sizes only (no grouped prefill row)
            api_part(args.out, deadline, token_counts=(64, 8), planar=True)
        elif part == "api_planar_decode_mid":  # grouped decode between the 8 and 64 tokens (session 8)
            api_part(args.out, deadline, token_counts=(32, 16), dense=False, planar=True)
        elif part == "dense_planar":
            for kn in (4096, 7168):
                dense_part(args.out, 16, kn, DENSE_DECODE_PLANAR, 12, deadline, planar=True)
        elif part == "grouped_decode_planar":
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_DECODE_PLANAR, deadline, planar=True)
        elif part == "grouped_decode_window":  # window tiles (x as it is) against the padded copy
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_DECODE_WINDOW, deadline, planar=True)
        elif part == "grouped_decode_window2":  # pipeline depth against CTAs per SM (session 8)
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_DECODE_WINDOW2, deadline, planar=True)
        elif part == "dense_occupancy":  # CTAs per SM: pipeline depth and A's registers (session 8)
            for kn in (4096, 7168):
                dense_part(args.out, 16, kn, DENSE_DECODE_OCCUPANCY, 12, deadline, planar=True)
        elif part == "api_fused":  # the api on weights within the one-FMA bound: grouped and dense, every size
            api_part(args.out, deadline, token_counts=(8192, 64, 32, 16, 8), planar=True, dense_ms=(1, 8, 16),
                     gain=0.25)
        elif part == "api_grouped_fused":  # api_fused's grouped rows alone
            api_part(args.out, deadline, token_counts=(8192, 64, 32, 16, 8), planar=True, dense_ms=(), gain=0.25)
        elif part == "api_dense_fused":
            api_part(args.out, deadline, token_counts=(), planar=True, dense_ms=(1, 8, 16), gain=0.25)
        elif part == "api_dense":  # the api's dense decode at M = 1, 8, 16 (planar weights)
            api_part(args.out, deadline, token_counts=(), planar=True, dense_ms=(1, 8, 16))
        elif part == "fused_check":  # "asm_fused" on weights it is exact for (scale bytes <= 128: gain 1/4)
            dense_part(args.out, 16, 4096, DENSE_DECODE_FUSED, 12, deadline, planar=True, gain=0.25)
            grouped_part(args.out, 64, GROUPED_FUSED, deadline, planar=True, gain=0.25)
        elif part == "dense_sweep9":  # dense decode tiles on the thread-order layout (session 9), M = 16 and 8
            for kn, m in ((7168, 16), (7168, 8), (4096, 16)):
                dense_part(args.out, m, kn, DENSE_DECODE_SWEEP9, 12, deadline, planar=True, gain=0.25)
        elif part == "dense_cluster":  # split-K partials summed in a cluster (session 10), all six decode sizes
            for kn, m in ((7168, 1), (7168, 16), (4096, 1), (7168, 8), (4096, 16), (4096, 8)):
                dense_part(args.out, m, kn, DENSE_CLUSTER, 12, deadline, planar=True, gain=0.25)
        elif part == "dense_wgs_bm8":  # M = 16 as two CTAs of 8 rows per weight tile: twice the CTAs (session 10)
            for kn in (7168, 4096):
                dense_wgs_part(args.out, 16, kn, ((4, 2), (2, 4), (4, 3)), deadline, bm=8)
        elif part == "dense_wgs":  # K split across a CTA's warpgroups: one kernel per call (session 9)
            for kn, m in ((7168, 1), (7168, 16), (4096, 1), (7168, 8), (4096, 16), (4096, 8)):
                variants = ((4, 3), (4, 2), (2, 4), (2, 6)) if m <= 8 else ((4, 2), (2, 4), (2, 5))
                dense_wgs_part(args.out, m, kn, variants, deadline)
        elif part == "dense_streamk":  # stream-K over all SMs, partials summed in the kernel (session 11)
            sms = jax.devices()[0].core_count
            for kn, m in ((7168, 1), (7168, 16), (4096, 1), (7168, 8), (4096, 16), (4096, 8)):
                dense_wgs_part(args.out, m, kn, ((4, 2),), deadline)  # the session-10 kernel, same run
                variants = ((4, 2, sms), (2, 4, sms), (3, 3, sms) if m <= 8 else (3, 2, sms), (2, 2, 2 * sms),
                            (1, 4, 2 * sms), (4, 2, sms - 4))
                dense_wgs_part(args.out, m, kn, variants, deadline, streamk=True)
        elif part == "bounds":  # what bounds the dense decode: copies alone, no decode, dense_wgs's step (session 12)
            for kn in (4096, 7168):
                bounds_part(args.out, kn, deadline)
        elif part == "floor_rows":  # the fastest one-pass XLA read of the same bytes, by row count (session 12)
            for kn in (4096, 7168):
                floor_rows_part(args.out, kn)
        elif part == "floor":
            for kn in (4096, 7168):
                floor_part(args.out, kn)
        elif part == "fused":  # "asm_fused" beside the stored decoders (session 8, not yet timed)
            for kn in (4096, 7168):
                dense_part(args.out, 16, kn, DENSE_DECODE_FUSED, 12, deadline, planar=True)
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_FUSED, deadline, planar=True)
            grouped_part(args.out, 8192, GROUPED_PREFILL_FUSED, deadline, planar=True)
        elif part == "decode_overlap":  # dense and grouped decode with `overlap` beside the stored entries
            for kn in (4096, 7168):
                dense_part(args.out, 16, kn, DENSE_DECODE_OVERLAP, 12, deadline, planar=True)
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_DECODE_OVERLAP, deadline, planar=True)
        elif part == "grouped_planar":
            grouped_part(args.out, 8192, GROUPED, deadline, planar=True)
        elif part == "grouped":
            grouped_part(args.out, 8192, GROUPED, deadline)
        elif part == "grouped_decode":
            for tokens in (64, 8):
                grouped_part(args.out, tokens, GROUPED_DECODE, deadline)
        else:
            raise SystemExit(f"fp4_mosaic_probe: unknown part {part!r}")

if __name__ == "__main__":
    main()
