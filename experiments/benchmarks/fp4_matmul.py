"""FP4 (MXFP4) matmul benchmark on one GPU: our Pallas-Triton kernels vs XLA, measured side by side in one run.

Sections (see the issue's targets):
  * decode:  M in {1, 8, 16, 64}, K = N in {4096, 7168}: TB/s on the packed weight bytes (values +
    scales) against the device copy bandwidth measured in the same run, and the ratio to XLA's bf16
    `jnp.dot` on the same shape (and to the "xla" FP4 path: dequantize then dot);
  * prefill: M = 4096, K = N in {4096, 7168}: TFLOP/s and the ratio to XLA bf16;
  * grouped: 64 experts, top-6 of 8192 tokens, K = 4096, N = 2048, vs tokamax's bf16 `ragged_dot`
    (and decode sizes 8..64 tokens: TB/s on the packed bytes of the experts touched).
Each kernel row is the best of a small sweep of block configs (the winners are written to
DIR/nvidia_h200.json, the stored table under v4jax/kernels/block_sizes/). Correctness: relative L2
error vs a float32 HIGHEST-precision reference on fresh random inputs (grouped: the rows of the first
4 experts; every row is checked for NaN), no NaN, and the output memory
poisoned (a NaN buffer of the output's size freed just before the call, so the allocator hands it back).

Timing (--timing device, the default): the summed duration of the GPU kernels one call launches, read from
a profiler trace (`device_seconds`), over calls rotating among distinct weight copies so that decode reads
do not come from L2. Wall-clock timing (--timing wall: each op n1 and n2 times inside one jitted call,
time = (T(n2) - T(n1)) / (n2 - n1)) was used until session 3; it carries the host's launch cost, 7 to 15
us per op on the H200 machine, which swamped every decode-size row (a plain XLA read of 8.5 MB timed
15.7 us wall and 8.8 us on the device: experiments/benchmarks/fp4_decode_diagnose.py).
With --mosaic, each dense shape also gets a "<section>-mosaic" row: the Pallas Mosaic GPU kernel
(mosaic_gpu.py: TMA pipeline + wgmma, best of MOSAIC_*_CONFIGS, decoded weights in registers or staged in
shared memory), with its ratios to XLA bf16 and to the Triton kernel measured in the same run; the winners
go to the table's "dense_mosaic" entry.
Usage: python experiments/benchmarks/fp4_matmul.py [--out DIR] [--sections decode,prefill,grouped] [--smoke]
       [--mosaic]
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_timing import device_seconds  # shared with the indexer benchmark

from v4jax import quant
from v4jax.kernels.fp4_matmul import block_sizes, reference, triton
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig

TOKENS: list[int] = []  # --tokens: grouped token counts to run (default: all)
SIZES: list[int] = []  # --sizes: dense K = N values to run (default: 4096, 7168)
MS: list[int] = []  # --ms: dense M values to run (default: 16, 1, 8, 64, 4096)
MOSAIC = [False]  # --mosaic: also time the Mosaic GPU dense kernel beside the Triton rows
BW = [float("nan")]  # the copy bandwidth measured in this run (bytes/s)
DEADLINE = [float("inf")]  # --budget-s: no new shape starts after this wall time (results so far are kept)


def out_of_budget(what: str) -> bool:
    if time.time() < DEADLINE[0]:
        return False
    print(f"budget reached: skipping {what} and the rest of the section", flush=True)
    return True
SMOKE = False  # --smoke: tiny shapes in interpret mode on CPU (checks this script only)
HIGHEST = jax.lax.Precision.HIGHEST


def wall(fn, *args, reps: int = 15) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


TIMING = ["device"]  # --timing: "device" (profiler kernel time, when the platform reports it) or "wall"


def per_call_seconds(op, arg_sets, n1: int, n2: int, reps: int = 15) -> float:
    """Seconds per op call. --timing device (default): `device_seconds` over the first n2 arg sets (GPU kernel
    time, launch gaps excluded); wall, or where no kernel events come back: (T(n2) - T(n1)) / (n2 - n1), op
    run on the first n arg sets in one jit."""
    if TIMING[0] == "device" and not SMOKE:
        t = device_seconds(op, arg_sets[:n2], reps=min(reps, 10))
        if t:
            return t

    def make(n):
        return jax.jit(lambda sets: tuple(op(*a) for a in sets[:n]))

    t1, t2 = wall(make(n1), arg_sets, reps=reps), wall(make(n2), arg_sets, reps=reps)
    return max((t2 - t1) / (n2 - n1), 1e-9)


def copy_bandwidth() -> float:
    """Bytes read + written per second by an XLA elementwise op over 1 GiB (the roofline we compare to)."""
    n = (1 << 20) if SMOKE else (1 << 29)
    sets = [(jnp.full((n,), i, jnp.bfloat16),) for i in range(4)]
    t = per_call_seconds(lambda a: a * 2, sets, 1, 4, reps=5)
    return 2 * n * 2 / t


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y)):
        return float("nan")
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def poisoned_call(fn, *args, out_shape, dtype):
    """Runs fn after freeing a NaN buffer of the output's size (the allocator's next block of that size)."""
    junk = jnp.full(out_shape, jnp.nan, dtype)
    jax.block_until_ready(junk)
    del junk
    return jax.block_until_ready(fn(*args))


def random_weight(key, shape):
    """W with per-block magnitudes spread over a few octaves (exercises the E8M0 scales)."""
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, shape, jnp.float32)
    spread = jnp.exp2(
        jax.random.randint(k2, (*shape[:-1], shape[-1] // 32, 1), -3, 3).astype(
            jnp.float32
        )
    )
    return (w.reshape(*shape[:-1], shape[-1] // 32, 32) * spread).reshape(shape)


def dense_ref(x, w):
    wd = quant.dequantize(w).astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), wd.T, precision=HIGHEST)


B = BlockConfig  # (block_m, block_n, block_k, split_k, num_warps, num_stages, decode, swap_ab)
DECODE_CONFIGS = [  # M = 16 (one MMA row block); M = 1 and 8 also try their FMA configs below
    B(16, 32, 512, 4, 4, 3, "asm"),  # session 3's device-timed winner at 4096 (13.5 us)
    B(16, 64, 256, 4, 4, 3, "asm", fuse_x=True),  # the diagnose run's best at both sizes (13.4 / 30.2 us)
    B(16, 32, 1024, 1, 4, 3, "asm", fuse_x=True),  # session 2's wall-clock winner (19.4 us on the device)
]
FMA_CONFIGS = {  # CUDA-core decode of 1 or 8 rows
    1: [B(1, 32, 1024, 1, 4, 3, "asm", fuse_x=True), B(1, 16, 1024, 1, 4, 3, "asm", fuse_x=True)],
    # 8 rows: only M=16's MMA winner (the 8-row FMA config took 3 minutes to compile and ran at 4137 us, session 3)
}
M64_CONFIGS = [
    B(64, 64, 512, 1, 4, 3, "asm", True),
    B(64, 32, 512, 1, 4, 3, "asm", fuse_x=True),
]
PREFILL_CONFIGS = [
    B(128, 128, 128, 1, 8, 3, "asm", True),
    B(128, 128, 64, 1, 8, 3, "asm"),
]
DEQUANT_CONFIGS = [
    B(16, 64, 256, 1, 4, 3, "asm"),
    B(16, 32, 512, 1, 4, 3, "asm"),
]
# Mosaic GPU dense (mosaic_gpu.py reads block_m = cap on rows of x per CTA, block_k = K per pipeline step,
# split_k, num_stages = TMA pipeline depth; N tiles are 64 rows). Each is tried with the decoded weights as
# wgmma's register operand and staged through shared memory (the second element).
MOSAIC_DECODE_CONFIGS = [
    (B(64, 64, 512, 2, num_stages=4), True),
    (B(64, 64, 1024, 1, num_stages=3), True),
    (B(64, 64, 512, 4, num_stages=3), True),
    (B(64, 64, 256, 4, num_stages=6), True),
    (B(64, 64, 512, 2, num_stages=4), False),
]
MOSAIC_PREFILL_CONFIGS = [
    (B(128, 64, 256, 1, num_stages=2), True),
    (B(64, 64, 512, 1, num_stages=2), True),
    (B(128, 64, 256, 1, num_stages=2), False),
]
GROUPED_DECODE_CONFIGS = [
    B(16, 128, 256, 1, 4, 3, "asm", True),
    B(16, 64, 512, 1, 4, 3, "asm", True),
    B(16, 64, 256, 1, 4, 3, "asm"),
]
GROUPED_PREFILL_CONFIGS = [
    B(128, 128, 64, 1, 8, 3, "asm", True),
    B(128, 128, 128, 1, 8, 3, "asm"),
]


def dequant_route(x, ws, n1, n2, interpret, ref):
    """The prefill alternative: our dequantize kernel (best of DEQUANT_CONFIGS), then XLA's bf16 dot.
    Returns (route seconds, dequantize config, dequantize-alone seconds)."""
    n = ws[0].shape[0]

    def route(cfg, transpose=False):
        if transpose:  # W.T [K, N] straight from the kernel: a plain NN GEMM
            return lambda a, w: jnp.dot(
                a, triton.dequantize(w.values, w.scales, cfg=cfg, transpose=True, interpret=interpret),
                preferred_element_type=jnp.float32).astype(a.dtype)
        return lambda a, w: jnp.dot(
            a, triton.dequantize(w.values, w.scales, cfg=cfg, interpret=interpret).T,
            preferred_element_type=jnp.float32).astype(a.dtype)

    cfgs = DEQUANT_CONFIGS[:1] if SMOKE else DEQUANT_CONFIGS
    if SMOKE:
        cfgs = [dataclasses.replace(c, decode="jnp") for c in cfgs]
    alone, best_cfg, _ = sweep(
        f"dequantize N=K={n}", cfgs,
        lambda cfg: per_call_seconds(
            lambda w: triton.dequantize(w.values, w.scales, cfg=cfg, interpret=interpret), [(w,) for w in ws],
            n1 if SMOKE else 2, n2 if SMOKE else 6),
        lambda cfg: rel_err(poisoned_call(route(cfg), x, ws[0], out_shape=ref.shape, dtype=jnp.bfloat16), ref))
    if best_cfg is None:
        return None, None, None
    t_route = per_call_seconds(route(best_cfg), [(x, w) for w in ws], n1, n2)
    err_t = rel_err(poisoned_call(route(best_cfg, True), x, ws[0], out_shape=ref.shape, dtype=jnp.bfloat16), ref)
    t_route_t = per_call_seconds(route(best_cfg, True), [(x, w) for w in ws], n1, n2) if err_t <= 1e-2 else 1e9
    print(f"  [dequantize route] NT {t_route * 1e6:.1f} us, NN (transposed dequantize, err {err_t:.2e}) "
          f"{t_route_t * 1e6:.1f} us (dequantize alone {alone * 1e6:.1f} us)", flush=True)
    if t_route_t < t_route:
        return t_route_t, dataclasses.replace(best_cfg, swap_ab=True), alone  # swap_ab marks "transposed"
    return t_route, best_cfg, alone


def sweep(name, configs, run_cfg, check):
    """Times run_cfg(cfg) for each config; returns (best seconds, best cfg, errors list, all timings)."""
    best, best_cfg, timings = None, None, []
    for cfg in configs:
        try:
            err = check(cfg)
            if not (err <= 1e-2):
                timings.append((cfg, None, f"rel err {err}"))
                continue
            t = run_cfg(cfg)
            timings.append((cfg, t, f"err {err:.2e}"))
            if best is None or t < best:
                best, best_cfg = t, cfg
        except Exception as e:  # noqa: BLE001  a config that does not compile (shared memory, layout) is skipped
            timings.append(
                (cfg, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            )
    for cfg, t, note in timings:
        print(
            f"  [{name}] {cfg}: {'%.1f us' % (t * 1e6) if t else 'failed'} {note}",
            flush=True,
        )
    return best, best_cfg, timings


def mosaic_dense_row(rows, best, x, ws, ref, n1, n2, interpret, triton_us, t_xla, shape, prefill, packed, flops):
    """Times the Mosaic GPU kernel on the same inputs and appends its row; best[bucket][cfg] collects timings."""
    from v4jax.kernels.fp4_matmul import (
        mosaic_gpu,  # lazy: its import needs jax's Mosaic GPU Pallas module
    )

    m, n = x.shape[0], ws[0].shape[0]

    def call(cfg_regs):
        cfg, regs = cfg_regs
        return lambda a, w: mosaic_gpu.dense(a, w.values, w.scales, cfg=cfg, interpret=interpret,
                                             a_in_registers=regs and not interpret)

    def check(cfg_regs):
        y = poisoned_call(call(cfg_regs), x, ws[0], out_shape=(m, n), dtype=jnp.bfloat16)
        return rel_err(y, ref)

    def run_cfg(cfg_regs):
        return per_call_seconds(call(cfg_regs), [(x, w) for w in ws], n1, n2)

    cfgs = list(MOSAIC_PREFILL_CONFIGS if prefill else MOSAIC_DECODE_CONFIGS)
    if SMOKE:
        cfgs = [(dataclasses.replace(c, block_k=256), False) for c, _ in cfgs[:2]]
    t, cfg, timings = sweep(f"mosaic {shape}", cfgs, run_cfg, check)
    bucket = "prefill" if prefill else ("m16" if m <= 16 else "m64")
    for c, tc, _ in timings:
        if tc:
            best.setdefault(bucket, {}).setdefault(c, []).append(tc)
    rows.append({
        "section": ("prefill" if prefill else "decode") + "-mosaic",
        "shape": shape,
        "kernel_us": t and t * 1e6,
        "xla_bf16_us": t_xla * 1e6,
        "kernel_tbps": t and packed / t / 1e12,
        "pct_copy_bw": t and 100 * packed / t / BW[0],
        "kernel_tflops": t and flops / t / 1e12,
        "ratio_vs_xla_bf16": t and t_xla / t,
        "triton_us": triton_us and triton_us * 1e6,
        "ratio_vs_triton": t and triton_us and triton_us / t,
        "rel_err": check(cfg) if cfg else float("nan"),
        "config": {**dataclasses.asdict(cfg[0]), "a_in_registers": cfg[1]} if cfg else None,
    })
    print(rows[-1], flush=True)




def mosaic_table(best) -> list[dict]:
    """The "dense_mosaic" table entries: per M bucket, the config with the least total time over the shapes
    where every config ran (a_in_registers is the kernel's GPU default, so only the BlockConfig is stored)."""
    out = []
    for bucket, max_m in (("m16", 16), ("m64", 64), ("prefill", None)):
        runs = best.get(bucket, {})
        full = {c: sum(v) for c, v in runs.items() if c[1] and len(v) == max(map(len, runs.values()))}
        if full:
            out.append({"max_m": max_m, "config": dataclasses.asdict(min(full, key=full.get)[0])})
    return out


def section_dense(rows, table, bw, interpret):
    sizes = [256] if SMOKE else (SIZES or [4096, 7168])
    ms = MS or ([16, 1, 8, 64] + ([] if SMOKE else [4096]))  # M=1, 8 also try M=16's winner
    best_decode, prefill_vs_xla_fp4, best_mosaic = {}, [], {}
    for kn in sizes:
        winner16 = None
        n = k = kn
        copies = 3 if SMOKE else 12
        keys = jax.random.split(jax.random.key(kn), copies + 1)
        ws = [
            quant.quantize(random_weight(kk, (n, k)), "mxfp4") for kk in keys[:copies]
        ]
        wbf = [quant.dequantize(w).astype(jnp.bfloat16) for w in ws]
        packed = n * k // 2 + n * k // 32
        for m in ms:
            if out_of_budget(f"dense M={m} K=N={kn}"):
                break
            prefill = m >= 1024
            x = jax.random.normal(keys[-1], (m, k), jnp.bfloat16)
            n1, n2 = (1, 3) if (prefill or SMOKE) else (2, copies)
            flops = 2 * m * n * k
            t_xla = per_call_seconds(
                lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(
                    a.dtype
                ),
                [(x, b) for b in wbf],
                n1,
                n2,
            )
            t_ref = per_call_seconds(
                reference.fp4_matmul_reference, [(x, w) for w in ws], n1, n2
            )
            ref = dense_ref(x, ws[0])
            t_deq_route, deq_cfg, t_deq_alone = (
                dequant_route(x, ws, n1, n2, interpret, ref) if prefill else (None, None, None)
            )

            def check(cfg):
                y = poisoned_call(
                    lambda a, w: triton.dense(
                        a, w.values, w.scales, cfg=cfg, interpret=interpret
                    ),
                    x,
                    ws[0],
                    out_shape=(m, n),
                    dtype=jnp.bfloat16,
                )
                return rel_err(y, ref)

            def run_cfg(cfg):
                return per_call_seconds(
                    lambda a, w: triton.dense(
                        a, w.values, w.scales, cfg=cfg, interpret=interpret
                    ),
                    [(x, w) for w in ws],
                    n1,
                    n2,
                )

            if prefill:
                cfgs = list(PREFILL_CONFIGS)
            elif m == 64:
                cfgs = list(M64_CONFIGS)
            elif m < 16:
                cfgs = FMA_CONFIGS.get(m, []) + ([winner16] if winner16 else [])
            else:
                cfgs = list(DECODE_CONFIGS)
            if SMOKE:
                cfgs = [dataclasses.replace(c, decode="jnp") for c in cfgs[:2]]
            t, cfg, timings = sweep(f"dense M={m} K=N={kn}", cfgs, run_cfg, check)
            if m == 16:
                winner16 = cfg
            if prefill and t:
                prefill_vs_xla_fp4.append((t_deq_route or t_ref) / t)
                if deq_cfg:
                    table["dequantize"] = [{"max_m": None, "config": dataclasses.asdict(deq_cfg)}]
            err = check(cfg) if cfg else float("nan")
            rows.append(
                {
                    "section": "prefill" if prefill else "decode",
                    "shape": f"M={m} K=N={kn}",
                    "kernel_us": t and t * 1e6,
                    "xla_bf16_us": t_xla * 1e6,
                    "xla_fp4_us": t_ref * 1e6,
                    "kernel_tbps": t and packed / t / 1e12,
                    "pct_copy_bw": t and 100 * packed / t / bw,
                    "kernel_tflops": t and flops / t / 1e12,
                    "xla_bf16_tflops": flops / t_xla / 1e12,
                    "ratio_vs_xla_bf16": t and t_xla / t,
                    "ratio_vs_xla_fp4": t and t_ref / t,
                    "dequant_route_us": t_deq_route and t_deq_route * 1e6,
                    "dequant_route_ratio_vs_xla_bf16": t_deq_route and t_xla / t_deq_route,
                    "dequant_kernel_us": t_deq_alone and t_deq_alone * 1e6,
                    "dequant_kernel_tbps": t_deq_alone and (packed + 2 * n * k) / t_deq_alone / 1e12,
                    "dequant_config": dataclasses.asdict(deq_cfg) if deq_cfg else None,
                    "rel_err": err,
                    "config": dataclasses.asdict(cfg) if cfg else None,
                }
            )
            print(rows[-1], flush=True)
            if MOSAIC[0]:
                try:
                    mosaic_dense_row(rows, best_mosaic, x, ws, ref, n1, n2, interpret, t, t_xla,
                                     f"M={m} K=N={kn}", prefill, packed, flops)
                except Exception:  # noqa: BLE001  keep the Triton rows when the Mosaic kernel fails
                    traceback.print_exc()
            bucket = (
                "prefill"
                if prefill
                else ("m16" if m == 16 else "m64" if m == 64 else "other")
            )
            for c, tc, _ in timings:
                if tc:
                    best_decode.setdefault(bucket, {}).setdefault(c, []).append(tc)
    table["dense"] = []
    for bucket, max_m in (("m16", 16), ("m64", 64), ("prefill", None)):
        cands = {
            c: sum(v)
            for c, v in best_decode.get(bucket, {}).items()
            if len(v) == max(map(len, best_decode[bucket].values()))
        }
        if cands:
            table["dense"].append(
                {
                    "max_m": max_m,
                    "config": dataclasses.asdict(min(cands, key=cands.get)),
                }
            )
    if best_mosaic:
        table["dense_mosaic"] = mosaic_table(best_mosaic)
    # From prefill sizes on, route to dequantize + cuBLAS when it beat our fused kernel on every prefill shape.
    table["dense_dequant_min_m"] = (
        1024 if prefill_vs_xla_fp4 and max(prefill_vs_xla_fp4) < 1.0 else None
    )


def section_grouped(rows, table, bw, interpret):
    g, k, n, topk = (8, 256, 128, 2) if SMOKE else (64, 4096, 2048, 6)
    tokens_list = TOKENS or (
        [64, 8, 16] + ([] if SMOKE else [8192])
    )  # 8 and 16 reuse 64's winner
    winners = {}
    key = jax.random.key(7)
    w = quant.quantize(random_weight(key, (g, n, k)), "mxfp4")
    wbf_kn = jnp.swapaxes(
        quant.dequantize(w).astype(jnp.bfloat16), 1, 2
    )  # [G, K, N] for ragged_dot
    try:
        import tokamax

        tk = lambda a, b, gs: tokamax.ragged_dot(a, b, gs)
    except Exception as e:  # noqa: BLE001
        print(
            f"tokamax unavailable ({type(e).__name__}: {e}); baseline is jax.lax.ragged_dot",
            flush=True,
        )
        tk = lambda a, b, gs: jax.lax.ragged_dot(a, b, gs)
    table["grouped"] = []
    for tokens in tokens_list:
        if out_of_budget(f"grouped tokens={tokens}"):
            break
        kk = jax.random.fold_in(key, tokens)
        experts = jnp.argsort(jax.random.uniform(kk, (tokens, g)), axis=-1)[
            :, :topk
        ].reshape(-1)
        gs = jnp.bincount(experts, length=g).astype(jnp.int32)
        m = tokens * topk
        x = jax.random.normal(jax.random.fold_in(kk, 1), (m, k), jnp.bfloat16)
        touched = int(jnp.sum(gs > 0))
        packed = touched * (n * k // 2 + n * k // 32)
        flops = 2 * m * n * k
        prefill = m >= 4096
        n1, n2 = (1, 3) if (prefill or SMOKE) else (2, 8)
        t_tk = per_call_seconds(tk, [(x, wbf_kn, gs)] * n2, n1, n2)
        # the FP4 alternative for large M: dequantize every expert to bf16 in XLA, then the bf16 grouped GEMM
        deq = lambda a, q, gsz: tk(
            a, jnp.swapaxes(quant.dequantize(q).astype(jnp.bfloat16), 1, 2), gsz
        )
        t_deq = per_call_seconds(deq, [(x, w, gs)] * n2, n1, n2) if prefill else None
        # ... and with our dequantize kernel (the table's dequantize config) in place of XLA's
        dcfg = BlockConfig(**table["dequantize"][0]["config"]) if table.get("dequantize") else DEQUANT_CONFIGS[0]
        if SMOKE:
            dcfg = dataclasses.replace(dcfg, decode="jnp")
        deq_k = lambda a, q, gsz: tk(
            a, triton.dequantize(q.values, q.scales, cfg=dcfg, transpose=True, interpret=interpret), gsz)
        t_deq_k = per_call_seconds(deq_k, [(x, w, gs)] * n2, n1, n2) if prefill else None
        # Reference on the rows of the first few groups only: XLA's ragged_dot on GPU is a dense masked GEMM
        # (G times the work), which in float32 HIGHEST at M = 49152 ran for minutes (run 2 timed out there).
        sizes = np.asarray(gs)
        ref_groups = min(g, 4)
        ref_rows = int(sizes[:ref_groups].sum())
        wd32 = quant.dequantize(w).astype(jnp.float32)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        ref = jnp.concatenate(
            [
                jnp.dot(
                    x[starts[i] : starts[i + 1]].astype(jnp.float32),
                    wd32[i].T,
                    precision=HIGHEST,
                )
                for i in range(ref_groups)
            ],
            axis=0,
        )  # [ref_rows, N]

        def check(cfg):
            y = poisoned_call(
                lambda a: triton.grouped(
                    a, w.values, w.scales, gs, cfg=cfg, interpret=interpret
                ),
                x,
                out_shape=(m, n),
                dtype=jnp.bfloat16,
            )
            if not np.all(np.isfinite(np.asarray(y, np.float32))):
                return float("nan")
            return rel_err(y[:ref_rows], ref)

        def run_cfg(cfg):
            return per_call_seconds(
                lambda a: triton.grouped(
                    a, w.values, w.scales, gs, cfg=cfg, interpret=interpret
                ),
                [(x,)] * n2,
                n1,
                n2,
            )

        cfgs = list(GROUPED_PREFILL_CONFIGS if prefill else GROUPED_DECODE_CONFIGS)
        if SMOKE:
            cfgs = [dataclasses.replace(c, decode="jnp") for c in cfgs[:2]]
        if tokens < 64 and winners.get(64):
            cfgs = [winners[64]]
        t, cfg, _ = sweep(f"grouped tokens={tokens}", cfgs, run_cfg, check)
        rows.append(
            {
                "section": "grouped",
                "shape": f"G={g} top{topk} of {tokens} tok (M={m}) K={k} N={n}",
                "kernel_us": t and t * 1e6,
                "baseline_bf16_us": t_tk * 1e6,
                "experts_touched": touched,
                "kernel_tbps": t and packed / t / 1e12,
                "pct_copy_bw": t and 100 * packed / t / bw,
                "kernel_tflops": t and flops / t / 1e12,
                "baseline_tflops": flops / t_tk / 1e12,
                "ratio_vs_baseline": t and t_tk / t,
                "dequant_then_bf16_us": t_deq and t_deq * 1e6,
                "dequant_then_bf16_ratio": t_deq and t_tk / t_deq,
                "dequant_kernel_then_bf16_us": t_deq_k and t_deq_k * 1e6,
                "dequant_kernel_then_bf16_ratio": t_deq_k and t_tk / t_deq_k,
                "dequant_kernel_route_rel_err": (
                    rel_err(jax.jit(deq_k)(x, w, gs)[:ref_rows], ref) if prefill else None),
                "rel_err": check(cfg) if cfg else float("nan"),
                "config": dataclasses.asdict(cfg) if cfg else None,
            }
        )
        print(rows[-1], flush=True)
        winners[tokens] = cfg
    for tokens, max_m in ((64, 512), (max(tokens_list), None)):
        if winners.get(tokens):
            table["grouped"].append(
                {"max_m": max_m, "config": dataclasses.asdict(winners[tokens])}
            )


def main():
    global SMOKE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--sections", default="decode,grouped")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--tokens", default="")
    ap.add_argument("--sizes", default="", help="dense K = N values, e.g. 4096,7168")
    ap.add_argument("--ms", default="", help="dense M values, e.g. 16,1,4096")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="start no new shape after this many seconds; what ran is still written")
    ap.add_argument("--timing", choices=["device", "wall"], default="device",
                    help="device: summed GPU kernel time per call from a profiler trace (kernel efficiency); wall: "
                         "host wall time per call inside one jit (includes the host's 7-15 us per op)")
    ap.add_argument("--mosaic", action="store_true",
                    help="also time the Mosaic GPU dense kernel (mosaic_gpu.py) beside each Triton dense row")
    ap.add_argument(
        "--grouped-prefill-configs", type=int, default=len(GROUPED_PREFILL_CONFIGS)
    )
    args = ap.parse_args()
    SMOKE = args.smoke
    TOKENS[:] = [int(t) for t in args.tokens.split(",") if t]
    SIZES[:] = [int(t) for t in args.sizes.split(",") if t]
    MS[:] = [int(t) for t in args.ms.split(",") if t]
    DEADLINE[0] = time.time() + args.budget_s
    MOSAIC[0] = args.mosaic
    TIMING[0] = args.timing
    del GROUPED_PREFILL_CONFIGS[args.grouped_prefill_configs :]
    interpret = SMOKE
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}", flush=True)
    bw = copy_bandwidth()  # device-timed too under --timing device
    BW[0] = bw
    print(
        f"copy bandwidth (read+write, XLA elementwise): {bw / 1e12:.2f} TB/s",
        flush=True,
    )
    rows, table = [], {"device_kind": dev.device_kind, "copy_tbps": bw / 1e12}
    for sec, fn in (("decode", section_dense), ("grouped", section_grouped)):
        if sec in args.sections:
            try:
                fn(rows, table, bw, interpret)
            except Exception:  # noqa: BLE001  keep the other sections' numbers
                traceback.print_exc()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(args.out, "fp4_matmul.json"), "w") as f:
        json.dump(
            {
                "date": stamp,
                "device": dev.device_kind,
                "jax": jax.__version__,
                "command": " ".join(sys.argv),
                "copy_tbps": bw / 1e12,
                "timing": TIMING[0],
                "rows": rows,
            },
            f,
            indent=1,
            default=str,
        )
    with open(
        os.path.join(args.out, block_sizes.chip_name(dev.device_kind) + ".json"), "w"
    ) as f:
        json.dump(table, f, indent=1)
    print(markdown(rows, bw))


def fmt(v, spec):
    return (
        "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)
    )


def markdown(rows, bw) -> str:
    lines = [
        f"copy bandwidth {bw / 1e12:.2f} TB/s",
        "",
        "| section | shape | kernel us | TB/s (packed) | % copy BW | TFLOP/s | baseline us | x vs baseline | x vs xla fp4 | x vs triton | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r.get("xla_bf16_us", r.get("baseline_bf16_us"))
        ratio = r.get("ratio_vs_xla_bf16", r.get("ratio_vs_baseline"))
        lines.append(
            f"| {r['section']} | {r['shape']} | {fmt(r['kernel_us'], '.1f')} | {fmt(r['kernel_tbps'], '.2f')} | "
            f"{fmt(r['pct_copy_bw'], '.0f')} | {fmt(r['kernel_tflops'], '.0f')} | {fmt(base, '.1f')} | "
            f"{fmt(ratio, '.2f')} | {fmt(r.get('ratio_vs_xla_fp4'), '.2f')} | {fmt(r.get('ratio_vs_triton'), '.2f')} | "
            f"{fmt(r['rel_err'], '.1e')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
