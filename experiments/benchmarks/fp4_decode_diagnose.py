"""Where the time of the FP4 decode matmul (M <= 16) goes, on one GPU: a ladder of kernels over the same
packed weights, each adding one stage of the real kernel, timed side by side in one run.

Per K = N (and M = 16):
  copy      XLA elementwise op over the packed bytes (read + write): what a launch of this size reaches;
  read      XLA reduction over the packed bytes (read only): the floor for any decode kernel;
  as_words  the uint8 -> uint32 bitcast the Triton kernel's inputs go through (a copy, or free? compare
            `full` with `kernel` too);
  load      Pallas-Triton probe with the decode kernel's grid and loop: loads the word and scale tiles and
            XOR-folds them (no decode, no x);
  decode    the probe plus the 8-plane decode ("asm" or "jnp"), summed into a float32 tile (no x, no dot);
  kernel    the real kernel on pre-made words (`triton.dense_words`), config sweep;
  full      `triton.dense` (bitcast inside) with the best kernel config;
  mosaic    the Mosaic GPU kernel (`mosaic_gpu.dense`, TMA pipeline on the uint8 tiles), config sweep.
Two times per call: wall (fp4_matmul.per_call_seconds: several weight copies in one jit, dispatch removed,
but the host's 7-15 us per op remain) and device (fp4_matmul.device_seconds: the summed kernel durations
from a profiler trace), which is what kernel efficiency is judged by. A big copy's device time gives the
bandwidth ceiling.
Usage: python experiments/benchmarks/fp4_decode_diagnose.py [--sizes 4096,7168] [--budget-s S] [--out DIR]
       [--smoke] (tiny shapes, interpret mode, CPU: checks this script only)
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(__file__))
import fp4_matmul as bench  # the benchmark's timing and correctness helpers

from v4jax import quant
from v4jax.kernels.fp4_matmul import common, triton
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig as B

KERNEL_CONFIGS = [  # (block_m, block_n, block_k, split_k, num_warps, num_stages, decode, swap_ab), fuse_x
    B(16, 32, 1024, 1, 4, 3, "asm", fuse_x=True),  # session 2's (wall-clock) m16 winner
    B(16, 32, 512, 1, 4, 3, "asm", fuse_x=True),
    B(16, 16, 1024, 1, 4, 3, "asm", fuse_x=True),
    B(16, 32, 512, 2, 4, 3, "asm", fuse_x=True),
    B(16, 64, 256, 4, 4, 3, "asm", fuse_x=True),
    B(16, 32, 256, 4, 2, 3, "asm", fuse_x=True),
    B(16, 32, 512, 2, 8, 3, "asm", fuse_x=True),
    B(16, 32, 512, 2, 4, 3, "asm"),
    B(16, 32, 512, 2, 4, 3, "jnp", fuse_x=True),
]
PROBE_CONFIGS = [  # block_n, block_k, split_k, num_warps for the load / decode probes
    B(16, 32, 1024, 1, 4, 3),
    B(16, 32, 512, 2, 4, 3),
    B(16, 16, 512, 4, 4, 3),
    B(16, 64, 256, 4, 8, 3),
]
MOSAIC_CONFIGS = [(c, True) for c, _ in bench.MOSAIC_DECODE_CONFIGS[:4]] + [(bench.MOSAIC_DECODE_CONFIGS[0][0], False)]


def _probe_kernel(wv_ref, ws_ref, o_ref, *, cfg: B, k_per_split: int, decode: bool):
    j, s = pl.program_id(0), pl.program_id(1)
    bn, bk = cfg.block_n, cfg.block_k
    bw = bk // common.PLANES

    def body(t, acc):
        k0 = pl.multiple_of(s * k_per_split + t * bk, bk)
        words = wv_ref[pl.ds(j * bn, bn), pl.ds(k0 // common.PLANES, bw)]  # [bn, bw] uint32
        sc = ws_ref[pl.ds(j * bn, bn), pl.ds(k0 // common.SCALE_BLOCK, bk // common.SCALE_BLOCK)]
        if not decode:  # keep the loads live: fold the words and (broadcast) scales into the accumulator
            return acc ^ words ^ jnp.repeat(sc.astype(jnp.uint32), bw // sc.shape[1], axis=1)
        planes = triton._decode_planes(words, common.scale_per_word(sc), jnp.bfloat16, cfg.decode)
        return acc + sum(p.astype(jnp.float32) for p in planes)

    dtype = jnp.float32 if decode else jnp.uint32
    acc = jax.lax.fori_loop(0, k_per_split // bk, body, jnp.zeros((bn, bw), dtype))
    if not decode:  # Pallas Triton has no xor-reduce: reduce the bits as float sums (only liveness matters)
        acc = (acc & 0xFF).astype(jnp.float32)
    o_ref[s, pl.ds(j * bn, bn)] = jnp.sum(acc, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "decode", "interpret"))
def probe(words, scales, cfg: B, decode: bool, interpret: bool = False):
    n, kw = words.shape
    k = kw * common.PLANES
    cfg = cfg.fit(16, n, k)
    return pl.pallas_call(
        functools.partial(_probe_kernel, cfg=cfg, k_per_split=k // cfg.split_k, decode=decode),
        out_shape=jax.ShapeDtypeStruct((cfg.split_k, n), jnp.float32),
        grid=(n // cfg.block_n, cfg.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="fp4_stream_probe",
    )(words, scales)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,7168")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    ap.add_argument("--no-mosaic", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    bench.SMOKE = args.smoke
    interpret = args.smoke
    deadline = time.time() + args.budget_s
    sizes = [256] if args.smoke else [int(s) for s in args.sizes.split(",")]
    rows = []
    if not args.smoke:  # the ceiling: device time of a 1 GiB elementwise copy (read + write)
        big = [(jnp.full((1 << 29,), i, jnp.bfloat16),) for i in range(2)]
        t = bench.device_seconds(lambda a: a * 2, big, reps=3)
        print(json.dumps({"stage": "copy_1GiB", "device_tbps": t and 2 * 2 * (1 << 29) / t / 1e12}), flush=True)
        del big

    def row(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    def timed(stage, shape, fn, arg_sets, n1, n2, check=None, config=None):
        if time.time() > deadline:
            print(f"budget reached: skipping {stage} {config}", flush=True)
            return None
        try:
            err = check() if check else None
            t = bench.per_call_seconds(fn, arg_sets, n1, n2)
            dev = bench.device_seconds(fn, arg_sets, reps=3 if args.smoke else 10)
        except Exception as e:  # noqa: BLE001  a config that does not compile is reported and skipped
            row(stage=stage, shape=shape, config=config, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        row(stage=stage, shape=shape, config=config, us=t * 1e6, packed_tbps=packed / t / 1e12, rel_err=err,
            device_us=dev and dev * 1e6, device_packed_tbps=dev and packed / dev / 1e12)
        return dev or t

    for kn in sizes:
        n = k = kn
        m = min(args.m, 16) if args.smoke else args.m
        copies = 3 if args.smoke else 12
        n1, n2 = (1, 3) if args.smoke else (2, copies)
        keys = jax.random.split(jax.random.key(kn), copies + 1)
        ws = [quant.quantize(bench.random_weight(kk, (n, k)), "mxfp4") for kk in keys[:copies]]
        words = [common.as_words(w.values) for w in ws]
        x = jax.random.normal(keys[-1], (m, k), jnp.bfloat16)
        ref = bench.dense_ref(x, ws[0])
        packed = n * k // 2 + n * k // 32
        shape = f"M={m} K=N={kn}"
        timed("copy", shape, lambda v: v ^ jnp.uint8(1), [(w.values,) for w in ws], n1, n2)
        timed("read", shape, lambda v, sc: jnp.sum(v.astype(jnp.uint32)) + jnp.sum(sc.astype(jnp.uint32)),
              [(w.values, w.scales) for w in ws], n1, n2)
        timed("as_words", shape, common.as_words, [(w.values,) for w in ws], n1, n2)
        for decode in (False, True):
            for cfg in PROBE_CONFIGS:
                cfg = dataclasses.replace(cfg, decode="jnp" if interpret else "asm")
                timed("decode" if decode else "load", shape,
                      lambda wv, sc: probe(wv, sc, cfg=cfg, decode=decode, interpret=interpret),
                      [(wv, w.scales) for wv, w in zip(words, ws)], n1, n2, config=dataclasses.asdict(cfg))
        best = None
        for cfg in KERNEL_CONFIGS[:2] if args.smoke else KERNEL_CONFIGS:
            if interpret:
                cfg = dataclasses.replace(cfg, decode="jnp")
            call = lambda a, wv, sc: triton.dense_words(a, wv, sc, cfg=cfg, interpret=interpret)
            t = timed("kernel", shape, call, [(x, wv, w.scales) for wv, w in zip(words, ws)], n1, n2,
                      check=lambda: bench.rel_err(bench.poisoned_call(call, x, words[0], ws[0].scales,
                                                                      out_shape=(m, n), dtype=jnp.bfloat16), ref),
                      config=dataclasses.asdict(cfg))
            if t and (best is None or t < best[0]):
                best = (t, cfg)
        if best:
            cfg = best[1]
            timed("full", shape, lambda a, w: triton.dense(a, w.values, w.scales, cfg=cfg, interpret=interpret),
                  [(x, w) for w in ws], n1, n2, config=dataclasses.asdict(cfg))
        timed("xla_bf16", shape, lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(a.dtype),
              [(x, quant.dequantize(w).astype(jnp.bfloat16)) for w in ws], n1, n2)
        if not args.no_mosaic:
            try:
                from v4jax.kernels.fp4_matmul import mosaic_gpu
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                continue
            cfgs = [(dataclasses.replace(c, block_k=256), False) for c, _ in MOSAIC_CONFIGS[:1]] if args.smoke \
                else MOSAIC_CONFIGS
            for cfg, regs in cfgs:
                call = lambda a, w: mosaic_gpu.dense(a, w.values, w.scales, cfg=cfg, interpret=interpret,
                                                     a_in_registers=regs and not interpret)
                timed("mosaic", shape, call, [(x, w) for w in ws], n1, n2,
                      check=lambda: bench.rel_err(bench.poisoned_call(call, x, ws[0], out_shape=(m, n),
                                                                      dtype=jnp.bfloat16), ref),
                      config={**dataclasses.asdict(cfg), "a_in_registers": regs})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp4_decode_diagnose.json"), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "command": " ".join(sys.argv),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
