"""Dump the Mosaic GPU FP4 decode kernels' PTX, ptxas report and SASS (MOSAIC_GPU_DUMP_*), to count the
instructions per packed byte of the inner loop and see registers and spills.

Usage (on the GPU machine): python experiments/benchmarks/fp4_sass_dump.py --out DIR [--decode asm,asm_lean]
    [--kernels dense,grouped_decode,grouped_prefill]
Writes DIR/<decoder>/ (Mosaic's SASS, ptxas report and PTX, gzipped; its other dumps stay in a temporary folder)
and DIR/sass_summary.txt (instruction mix per kernel, where Mosaic finds nvdisasm; on the H200 image it did not,
even with the nvidia-cuda-nvdisasm wheel installed, session 9); prints each kernel's registers and spills (ptxas).
SASS without the GPU, from the kept PTX (session 9): unpack the nvidia-cuda-nvcc and nvidia-cuda-nvdisasm wheels,
then `ptxas -arch=sm_90a -O3 K.ptx -o K.cubin && nvdisasm -c K.cubin`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import os
import re
import shutil
import sys
import tempfile


def summarize(path: str) -> str:
    """Opcode counts of every SASS file under `path`."""
    lines = []
    for f in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if not os.path.isfile(f):
            continue
        with open(f, errors="replace") as fh:
            text = fh.read()
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text)
        if not ops:
            continue
        c = collections.Counter(o.split(".")[0] for o in ops)
        lines.append(f"{f}: {len(ops)} instructions: " + ", ".join(f"{k} {v}" for k, v in c.most_common(30)))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--decode", default="asm")
    ap.add_argument("--kernels", default="dense,grouped_decode,grouped_prefill")
    args = ap.parse_args()
    kernels = args.kernels.split(",")
    for dec in args.decode.split(","):
        d = tempfile.mkdtemp(prefix=f"mosaic_dump_{dec}_")  # every dump; the SASS, ptxas and PTX are kept
        os.environ.update(MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1",
                          MOSAIC_GPU_DUMP_TO=d)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from fp4_matmul import random_weight

        from v4jax import quant
        from v4jax.kernels import fp4_matmul
        from v4jax.kernels.fp4_matmul import mosaic_gpu
        from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig as B

        kn, m = 7168, 16
        if "dense" in kernels:
            dump_dense(fp4_matmul, quant, random_weight, mosaic_gpu, B, kn, m, dec)
        if "grouped_decode" in kernels:
            dump_grouped_decode(fp4_matmul, quant, random_weight, mosaic_gpu, B, dec)
        if "grouped_prefill" in kernels:
            dump_grouped_prefill(fp4_matmul, quant, random_weight, mosaic_gpu, B, dec)
        keep = os.path.join(args.out, dec)
        os.makedirs(keep, exist_ok=True)
        for f in glob.glob(os.path.join(d, "*")):
            if "sass" in os.path.basename(f) or f.endswith(".ptxas"):
                shutil.copy(f, keep)
            elif f.endswith(".ptx"):
                with open(f, "rb") as src, gzip.open(os.path.join(keep, os.path.basename(f) + ".gz"), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    with open(os.path.join(args.out, "sass_summary.txt"), "w") as f:
        f.write(summarize(args.out))
    for f in sorted(glob.glob(os.path.join(args.out, "*", "*.ptxas"))):  # registers, spills per kernel
        with open(f) as fh:
            # registers, spills, and any ptxas warning (e.g. wgmma serialization: "Potential Performance Loss")
            print(f, [ln.strip() for ln in fh if any(w in ln for w in ("registers", "spill", "arning", "erformance",
                                                                         "serializ"))])


def dump_dense(fp4_matmul, quant, random_weight, mosaic_gpu, B, kn, m, dec):
    import jax
    import jax.numpy as jnp

    w = fp4_matmul.to_planar(quant.quantize(random_weight(jax.random.key(0), (kn, kn)), "mxfp4"))
    x = jax.random.normal(jax.random.key(1), (m, kn), jnp.bfloat16)
    cfg = B(block_m=64, block_n=64, block_k=256, split_k=8, num_stages=4, decode=dec)
    jax.block_until_ready(mosaic_gpu.dense(x, w.values, w.scales, cfg=cfg, planar=True))


def dump_grouped_decode(fp4_matmul, quant, random_weight, mosaic_gpu, B, dec):
    import jax
    import jax.numpy as jnp

    # the grouped decode's stored tile (window tiles, bm 16, 512-wide K steps; session 8)
    wd = fp4_matmul.to_planar(quant.quantize(random_weight(jax.random.key(4), (8, 2048, 4096)), "mxfp4"))
    xd = jax.random.normal(jax.random.key(5), (48, 4096), jnp.bfloat16)
    cfg = B(block_m=16, block_n=64, block_k=512, split_k=1, num_stages=2, decode=dec, window=True)
    gd = jnp.array([7, 5, 9, 0, 6, 8, 6, 7], jnp.int32)
    jax.block_until_ready(mosaic_gpu.grouped(xd, wd.values, wd.scales, gd, cfg=cfg, planar=True))


def dump_grouped_prefill(fp4_matmul, quant, random_weight, mosaic_gpu, B, dec):
    import jax
    import jax.numpy as jnp

    # the grouped prefill's tile (bm 96, 128 weight rows: two accumulators): the most live registers
    wg = fp4_matmul.to_planar(quant.quantize(random_weight(jax.random.key(2), (8, 2048, 1024)), "mxfp4"))
    xg = jax.random.normal(jax.random.key(3), (4096, 1024), jnp.bfloat16)
    cfg = B(block_m=96, block_n=128, block_k=256, split_k=1, num_stages=2, decode=dec)
    gs = jnp.full((8,), 512, jnp.int32)
    jax.block_until_ready(mosaic_gpu.grouped(xg, wg.values, wg.scales, gs, cfg=cfg, planar=True))


if __name__ == "__main__":
    main()
