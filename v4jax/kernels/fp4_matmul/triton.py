"""Pallas-Triton (GPU) MXFP4 x bf16 matmuls: dense (decode with split-K, prefill) and grouped (MoE experts).

Hopper has no FP4 tensor cores, so each program decodes its packed weight tile in registers to bf16
(`common.e2m1_to_f32` bit arithmetic, times the tile's E8M0 scales broadcast over their 32 elements),
interleaves low/high nibbles back into K order (Triton `join` + reshape), and feeds `jnp.dot` with a
float32 accumulator. Weights are read once per M block, as packed bytes plus scales (0.53 bytes/element).

- Decode (small M): one M block of 16 rows, split-K so that N/bn * split programs fill the 132 SMs;
  the partial sums [split, M, N] float32 are added by XLA (tiny at decode sizes).
- Prefill (large M): the same kernel with large M/N tiles and no split.
- Grouped: rows sorted by expert, tiles from `common.tile_schedule` (one per (row block, expert) pair),
  masked loads/stores keep each row to its own expert's weights.
Block sizes come from `block_sizes.py` (tuned on the H200, stored in v4jax/kernels/block_sizes/).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax.kernels.fp4_matmul import common
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig


def _decode_tile(wv: jax.Array, ws: jax.Array, dtype) -> jax.Array:
    """Packed bytes [bn, bk/2] and E8M0 bytes [bn, bk/32] -> dequantized weights [bn, bk] in `dtype`."""
    bn, bkh = wv.shape
    lo, hi = common.decode_bytes(wv)  # [bn, bk/2] each
    s = common.e8m0_to_f32(ws)  # [bn, bk/32]
    s = jnp.broadcast_to(
        s[:, :, None], (bn, s.shape[1], common.BYTES_PER_SCALE)
    ).reshape(bn, bkh)  # per byte
    w = jnp.stack(
        [(lo * s).astype(dtype), (hi * s).astype(dtype)], axis=-1
    )  # [bn, bk/2, 2]
    return w.reshape(bn, 2 * bkh)  # element 2i = low nibble of byte i


def _dot_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """[bm, bk] x [bn, bk] -> [bm, bn] float32 (contract the last axes)."""
    return jax.lax.dot_general(
        x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _dense_kernel(x_ref, wv_ref, ws_ref, o_ref, *, cfg: BlockConfig, k_per_split: int):
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

    def body(t, acc):
        k0 = s * k_per_split + t * bk
        x = x_ref[pl.ds(i * bm, bm), pl.ds(k0, bk)]  # [bm, bk]
        wv = wv_ref[pl.ds(j * bn, bn), pl.ds(k0 // 2, bk // 2)]  # [bn, bk/2] uint8
        ws = ws_ref[
            pl.ds(j * bn, bn), pl.ds(k0 // common.SCALE_BLOCK, bk // common.SCALE_BLOCK)
        ]  # [bn, bk/32]
        return acc + _dot_nt(x, _decode_tile(wv, ws, x.dtype))  # [bm, bn]

    acc = jax.lax.fori_loop(
        0, k_per_split // bk, body, jnp.zeros((bm, bn), jnp.float32)
    )
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
    m, k = x.shape
    n = values.shape[0]
    cfg = cfg.fit(m, n, k)
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
        compiler_params=plgpu.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages
        ),
        interpret=interpret,
        name="fp4_matmul_triton",
    )(xp, values, scales)
    if cfg.split_k > 1:
        y = jnp.sum(y, axis=0).astype(x.dtype)  # [Mp, N]
    return y[:m]


def _grouped_kernel(
    group_ref,
    block_ref,
    lo_ref,
    hi_ref,
    x_ref,
    wv_ref,
    ws_ref,
    o_ref,
    *,
    cfg: BlockConfig,
    k: int,
):
    t, j = pl.program_id(0), pl.program_id(1)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    g, blk, lo, hi = group_ref[t], block_ref[t], lo_ref[t], hi_ref[t]

    @pl.when(lo < hi)
    def _():
        def body(kt, acc):
            k0 = kt * bk
            x = x_ref[pl.ds(blk * bm, bm), pl.ds(k0, bk)]  # [bm, bk]
            wv = wv_ref[g, pl.ds(j * bn, bn), pl.ds(k0 // 2, bk // 2)]  # [bn, bk/2]
            ws = ws_ref[
                g,
                pl.ds(j * bn, bn),
                pl.ds(k0 // common.SCALE_BLOCK, bk // common.SCALE_BLOCK),
            ]
            return acc + _dot_nt(x, _decode_tile(wv, ws, x.dtype))  # [bm, bn]

        acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.float32))
        rows = blk * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        mask = (rows >= lo) & (rows < hi)
        plgpu.store(
            o_ref.at[pl.ds(blk * bm, bm), pl.ds(j * bn, bn)],
            acc.astype(o_ref.dtype),
            mask=mask,
        )


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
    cfg = cfg.fit(m, n, k)
    mp = common.round_up(m, cfg.block_m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    sched = common.tile_schedule(group_sizes, m, cfg.block_m)
    y = pl.pallas_call(
        functools.partial(_grouped_kernel, cfg=cfg, k=k),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid=(sched.group.shape[0], n // cfg.block_n),
        compiler_params=plgpu.CompilerParams(
            num_warps=cfg.num_warps, num_stages=cfg.num_stages
        ),
        interpret=interpret,
        name="fp4_grouped_matmul_triton",
    )(sched.group, sched.block, sched.lo, sched.hi, xp, values, scales)
    return jnp.where(common.rows_written(group_sizes, m)[:, None], y[:m], 0).astype(
        x.dtype
    )
