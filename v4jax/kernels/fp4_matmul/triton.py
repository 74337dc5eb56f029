"""Pallas-Triton (GPU) MXFP4 x bf16 matmuls: dense (decode with split-K, prefill), grouped (MoE experts),
and a dequantize kernel (MXFP4 -> bf16 at memory speed, for dequantize + cuBLAS at prefill sizes).

Hopper has no FP4 tensor cores, so each program decodes its packed weight tile in registers to bf16
and feeds the tensor cores (or, for a few rows, CUDA-core FMAs). The packed bytes are read as uint32
words; nibble plane j of a tile (K columns j, j+8, ...) decodes with a few shifts and masks and no
shuffle, and the activations come split into the same 8 column planes (`common.x_planes`, or strided
loads in the kernel with `fuse_x`), so y = sum_j x_j @ W_j.T keeps the K order without interleaving
nibbles. Two decoders:
- "jnp": `common.decode_plane` (float16 bit pattern -> float32, times 2**14 and the E8M0 scale); plain
  jnp, so the CPU interpreter runs exactly this code in CI;
- "asm": two elements per 32-bit op in PTX (prmt + shifts + masks build bf16x2 pairs whose E2M1
  subnormal lands on a bf16 subnormal, then two bf16x2 FMAs by 2**126 and the scale). GPU only: the
  interpreter cannot run PTX, so the H200 benchmark checks it (same numbers as "jnp").
Weights are read once per M block: 0.53 bytes per element (values + scales).

- Decode (small M): a 16-row M block (MMA) or 1..8 rows (FMA), split-K so that N/bn * split programs
  fill the 132 SMs; the partial sums [split, M, N] float32 are added by XLA (tiny at decode sizes).
- Prefill (large M): the same kernel with large tiles, or `dequantize` + cuBLAS (the api picks by the
  stored table).
- Grouped: rows sorted by expert, tiles from `common.tile_schedule` (one per (row block, expert) pair),
  masked stores keep each row to its own expert's weights.
Block sizes come from `block_sizes.py` (tuned on the H200, stored in v4jax/kernels/block_sizes/).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax.kernels.fp4_matmul import common
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig

P = common.PLANES

def _asm_plane(j: int) -> str:
    """PTX for nibble plane j of two uint32 words ($1: element c, $2: element c+1) and the pair's bf16x2
    scale ($3), into $0 (one asm per plane: Pallas lowers single-result inline asm only)."""
    q = j // 2  # the byte holding nibble j
    sel = ((4 + q) << 12) | ((4 + q) << 8) | (q << 4) | q  # byte q of $1 -> bits 7..0, of $2 -> bits 23..16
    return common.ptx_nibble_pair("$1, $2", sel, high_nibble=j % 2 == 1, scale="$3")


def _decode_planes(words: jax.Array, scale: jax.Array, dtype, how: str) -> list[jax.Array]:
    """uint32 words [r, w] and float32 per-word scales [r, w] -> the 8 nibble planes [r, w] in `dtype`."""
    if how.startswith("asm"):  # "asm_lean" too: its cheaper scale conversion is mosaic_gpu's only
        s16 = scale.astype(jnp.bfloat16)
        out = jax.ShapeDtypeStruct(words.shape, jnp.bfloat16)
        return [
            plgpu.elementwise_inline_asm(
                _asm_plane(j), args=[words, s16], constraints="=r,r,r,r", pack=2, result_shape_dtypes=[out]
            )[0].astype(dtype)
            for j in range(P)
        ]
    return [common.decode_plane(words, j, scale).astype(dtype) for j in range(P)]


def _for_backend(cfg: BlockConfig, interpret: bool) -> BlockConfig:
    """The interpreter cannot run PTX: it takes the "jnp" decoder, which gives the same numbers."""
    return dataclasses.replace(cfg, decode="jnp") if interpret and cfg.decode.startswith("asm") else cfg


def _partial_product(xs, planes, swap_ab: bool, fma: bool) -> jax.Array:
    """sum_p x_p [bm, b] . W_p [bn, b] over b -> float32 [bm, bn] ([bn, bm] when swap_ab)."""
    acc = None
    for xj, wj in zip(xs, planes, strict=True):
        if fma:  # a few rows: CUDA-core products, reduced along w inside each thread
            part = jnp.sum(
                xj.astype(jnp.float32)[:, None, :] * wj.astype(jnp.float32)[None, :, :], axis=-1
            )  # [bm, bn]
        elif swap_ab:
            part = jax.lax.dot_general(
                wj, xj, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [bn, bm]
        else:
            part = jax.lax.dot_general(
                xj, wj, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )  # [bm, bn]
        acc = part if acc is None else acc + part
    return acc


def _k_loop(steps: int, load_w, step, acc0):
    """acc0 + the sum over K steps t of step(t, acc, *load_w(t)) (dense and grouped share it). Loading step
    t+1's tiles ahead of step t's decode (a register double buffer) was tried in session 3 and measured on the
    H200 in session 4: slower in the dense kernel (15.0 against 13.2 us at M=16, K=N=4096) and not compiling
    in the grouped one, so it was removed."""
    return jax.lax.fori_loop(0, steps, lambda t, acc: step(t, acc, *load_w(t)), acc0)


def _dense_kernel(x_ref, wv_ref, ws_ref, o_ref, *, cfg: BlockConfig, k_per_split: int):
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    bw = bk // P  # words per row of a K tile
    fma = bm < 16
    swap = cfg.swap_ab and not fma
    acc_shape = (bn, bm) if swap else (bm, bn)

    steps = k_per_split // bk

    def load_w(t):  # the packed words [bn, bk/8] uint32 and E8M0 scales [bn, bk/32] of K step t
        k0 = pl.multiple_of(s * k_per_split + t * bk, bk)
        words = wv_ref[pl.ds(j * bn, bn), pl.ds(k0 // P, bw)]
        sc = ws_ref[pl.ds(j * bn, bn), pl.ds(k0 // common.SCALE_BLOCK, bk // common.SCALE_BLOCK)]
        return words, sc

    def step(t, acc, words, sc):
        k0 = pl.multiple_of(s * k_per_split + t * bk, bk)
        planes = _decode_planes(words, common.scale_per_word(sc), x_ref.dtype, cfg.decode)
        if cfg.fuse_x:  # column planes read straight from x [M, K] (strided loads; no XLA transpose)
            xs = [x_ref[pl.ds(i * bm, bm), pl.ds(k0 + p, bw, stride=P)] for p in range(P)]
        else:
            xs = [x_ref[p, pl.ds(i * bm, bm), pl.ds(k0 // P, bw)] for p in range(P)]  # 8 x [bm, bk/8]
        return acc + _partial_product(xs, planes, swap, fma)

    acc = _k_loop(steps, load_w, step, jnp.zeros(acc_shape, jnp.float32))
    if swap:
        acc = acc.T  # [bm, bn]
    if cfg.split_k == 1:
        o_ref[pl.ds(i * bm, bm), pl.ds(j * bn, bn)] = acc.astype(o_ref.dtype)
    else:
        o_ref[s, pl.ds(i * bm, bm), pl.ds(j * bn, bn)] = acc


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def dense(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    cfg: BlockConfig,
    interpret: bool = False,
) -> jax.Array:
    """y = x @ W.T for x [M, K], W given as packed `values` [N, K/2] and E8M0 `scales` [N, K/32]."""
    return dense_words(x, common.as_words(values), scales, cfg, interpret)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def dense_words(
    x: jax.Array,
    words: jax.Array,
    scales: jax.Array,
    cfg: BlockConfig,
    interpret: bool = False,
) -> jax.Array:
    """`dense` on the packed bytes already read as uint32 words [N, K/8] (`common.as_words`), for callers
    that keep weights in that form (and for timing the kernel without the conversion)."""
    m, k = x.shape
    n = words.shape[0]
    cfg = _for_backend(cfg, interpret).fit(m, n, k)
    mp = common.round_up(m, cfg.block_m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    k_per_split = k // cfg.split_k
    out_shape = (
        jax.ShapeDtypeStruct((mp, n), x.dtype)
        if cfg.split_k == 1
        else jax.ShapeDtypeStruct((cfg.split_k, mp, n), jnp.float32)
    )
    y = pl.pallas_call(
        functools.partial(_dense_kernel, cfg=cfg, k_per_split=k_per_split),
        out_shape=out_shape,
        grid=(mp // cfg.block_m, n // cfg.block_n, cfg.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="fp4_matmul_triton",
    )(xp if cfg.fuse_x else common.x_planes(xp), words, scales)
    if cfg.split_k > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)  # [Mp, N]
    return y[:m]


def _interleave(planes: list[jax.Array]) -> jax.Array:
    """8 planes [r, w] -> [r, 8w] in K order (element 8i + j = plane j, word i), by three levels of
    pairwise stacks whose new axis is innermost (Triton joins: each thread keeps its 8 values together)."""
    q = [jnp.stack([planes[j], planes[j + 4]], axis=-1) for j in range(4)]  # [r, w, 2]: bit 2 of j
    r = [jnp.stack([q[j], q[j + 2]], axis=-1) for j in range(2)]  # [r, w, 2, 2]: bit 1
    full = jnp.stack(r, axis=-1)  # [r, w, 2, 2, 2]: (bit 2, bit 1, bit 0) -> j
    return full.reshape(planes[0].shape[0], P * planes[0].shape[1])


def _dequant_kernel(wv_ref, ws_ref, o_ref, *, cfg: BlockConfig, transpose: bool):
    g, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn, bk = cfg.block_n, cfg.block_k
    words = wv_ref[g, pl.ds(j * bn, bn), pl.ds(t * (bk // P), bk // P)]  # [bn, bk/8]
    sc = ws_ref[g, pl.ds(j * bn, bn), pl.ds(t * (bk // common.SCALE_BLOCK), bk // common.SCALE_BLOCK)]
    tile = _interleave(_decode_planes(words, common.scale_per_word(sc), o_ref.dtype, cfg.decode))  # [bn, bk]
    if transpose:
        o_ref[g, pl.ds(t * bk, bk), pl.ds(j * bn, bn)] = tile.T  # [bk, bn]
    else:
        o_ref[g, pl.ds(j * bn, bn), pl.ds(t * bk, bk)] = tile


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "transpose", "interpret"))
def dequantize(values: jax.Array, scales: jax.Array, cfg: BlockConfig, dtype=jnp.bfloat16,
               transpose: bool = False, interpret: bool = False) -> jax.Array:
    """Packed `values` [..., N, K/2] + E8M0 `scales` [..., N, K/32] -> W [..., N, K] in `dtype`
    ([..., K, N] with `transpose`, the "x @ w" layout of bf16 grouped GEMMs).

    One pass at memory speed (0.53 bytes read and 2 written per element); the prefill routes
    (dequantize, then cuBLAS or tokamax) use it in place of XLA's slower elementwise chain.
    """
    *lead, n, kh = values.shape
    k, g = 2 * kh, math.prod(lead)
    cfg = _for_backend(cfg, interpret).fit(16, n, k)
    out = (g, k, n) if transpose else (g, n, k)
    w = pl.pallas_call(
        functools.partial(_dequant_kernel, cfg=cfg, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct(out, dtype),
        grid=(g, n // cfg.block_n, k // cfg.block_k),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="fp4_dequantize_triton",
    )(common.as_words(values.reshape(g, n, kh)), scales.reshape(g, n, -1))
    return w.reshape(*lead, *out[1:])


def _grouped_kernel(group_ref, block_ref, lo_ref, hi_ref, x_ref, wv_ref, ws_ref, o_ref, *,
                    cfg: BlockConfig, k: int):
    t, j = pl.program_id(0), pl.program_id(1)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    bw = bk // P
    g, blk, lo, hi = group_ref[t], block_ref[t], lo_ref[t], hi_ref[t]
    acc_shape = (bn, bm) if cfg.swap_ab else (bm, bn)

    @pl.when(lo < hi)
    def _():
        steps = k // bk

        def load_w(kt):  # words [bn, bk/8] and scales [bn, bk/32] of expert g's K step kt
            k0 = pl.multiple_of(kt * bk, bk)
            words = wv_ref[g, pl.ds(j * bn, bn), pl.ds(k0 // P, bw)]
            sc = ws_ref[g, pl.ds(j * bn, bn), pl.ds(k0 // common.SCALE_BLOCK, bk // common.SCALE_BLOCK)]
            return words, sc

        def step(kt, acc, words, sc):
            k0 = pl.multiple_of(kt * bk, bk)
            planes = _decode_planes(words, common.scale_per_word(sc), x_ref.dtype, cfg.decode)
            xs = [x_ref[p, pl.ds(blk * bm, bm), pl.ds(k0 // P, bw)] for p in range(P)]
            return acc + _partial_product(xs, planes, cfg.swap_ab, False)

        acc = _k_loop(steps, load_w, step, jnp.zeros(acc_shape, jnp.float32))
        if cfg.swap_ab:
            acc = acc.T  # [bm, bn]
        rows = blk * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        mask = (rows >= lo) & (rows < hi)
        plgpu.store(o_ref.at[pl.ds(blk * bm, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def grouped(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    group_sizes: jax.Array,
    cfg: BlockConfig,
    interpret: bool = False,
) -> jax.Array:
    """y[rows of g] = x[rows] @ W[g].T; x [M, K] sorted by group, W [G, N, K] as `values`/`scales`."""
    m, k = x.shape
    n = values.shape[1]
    cfg = dataclasses.replace(_for_backend(cfg, interpret), block_m=max(cfg.block_m, 16)).fit(m, n, k)  # MMA tiles
    mp = common.round_up(m, cfg.block_m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    sched = common.tile_schedule(group_sizes, m, cfg.block_m)
    y = pl.pallas_call(
        functools.partial(_grouped_kernel, cfg=cfg, k=k),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid=(sched.group.shape[0], n // cfg.block_n),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="fp4_grouped_matmul_triton",
    )(sched.group, sched.block, sched.lo, sched.hi, common.x_planes(xp), common.as_words(values), scales)
    return jnp.where(common.rows_written(group_sizes, m)[:, None], y[:m], 0).astype(x.dtype)
