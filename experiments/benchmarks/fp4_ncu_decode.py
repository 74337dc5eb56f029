"""A few calls of the FP4 decode kernels for Nsight Compute: the dense planar decode (M=16, K=N=4096 and 7168) and
the grouped decode (64 experts, top-6 of 64 tokens, K=4096, N=2048), each on the stored H200 table's config, so
that `ncu` can report stall reasons, issue slots, occupancy and DRAM throughput per kernel.

Usage (GPU machine): ncu --clock-control none --kernel-name regex:fp4_ [sections] python3 \\
    experiments/benchmarks/fp4_ncu_decode.py   (or `bash scripts/gpu/pending_runs.sh fp4ncu`)
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp4_matmul import random_weight

from v4jax import quant
from v4jax.kernels import fp4_matmul


def main():
    if jax.default_backend() != "gpu":
        raise SystemExit("fp4_ncu_decode: needs a GPU (Hopper)")
    dense_args = []
    for kn in (4096, 7168):
        w = fp4_matmul.to_planar(quant.quantize(random_weight(jax.random.key(kn), (kn, kn)), "mxfp4"))
        dense_args.append((jax.random.normal(jax.random.key(1), (16, kn), jnp.bfloat16), w))
    dense = jax.jit(lambda a, ww: fp4_matmul.fp4_matmul(a, ww))
    g, k, n, tokens, topk = 64, 4096, 2048, 64, 6
    wg = fp4_matmul.to_planar(quant.quantize(random_weight(jax.random.key(2), (g, n, k)), "mxfp4"))
    choice = jax.vmap(lambda kk: jax.random.choice(kk, g, (topk,), replace=False))(
        jax.random.split(jax.random.key(3), tokens))
    sizes = jnp.bincount(choice.reshape(-1), length=g).astype(jnp.int32)
    xg = jax.random.normal(jax.random.key(4), (tokens * topk, k), jnp.bfloat16)
    grouped = jax.jit(lambda a, ww, gs: fp4_matmul.fp4_grouped_matmul(a, ww, gs))
    for _ in range(4):  # ncu --launch-skip 3: the first calls compile and warm up
        for x, w in dense_args:
            jax.block_until_ready(dense(x, w))
        jax.block_until_ready(grouped(xg, wg, sizes))
    print("fp4_ncu_decode: done", flush=True)


if __name__ == "__main__":
    main()
