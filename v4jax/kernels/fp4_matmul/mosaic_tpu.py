"""Pallas Mosaic-TPU MXFP4 x bf16 matmuls (dense and grouped). No TPU was available: tested in interpret mode only.

TPU layout choices (written for Mosaic's (8, 128) tiles, not yet compiled on a chip):
- No lane interleave: x is split into its even and odd K columns by XLA (x[:, 0::2], x[:, 1::2]), so the
  low nibbles of a byte tile multiply x_even and the high nibbles x_odd: y = x_e @ lo.T + x_o @ hi.T.
- Scales are passed transposed, [K/32, N] (per group [G, K/32, N]), so a scale block (bk/32, bn) keeps N
  on lanes; it is expanded to one scale per byte with a 0/1 matmul (E[bk/2, bk/32] @ s), exact for
  powers of two, instead of a lane repeat.
- Grid (M, N, K) with a float32 VMEM accumulator; grouped: scalar-prefetched tile schedule (common.py),
  grid (N, tiles, K); tiles of one row block are consecutive, so the output block stays in VMEM and
  each tile writes only its own rows (where(mask, acc, previous)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from v4jax.kernels.fp4_matmul import common
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig


def _split_even_odd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x[:, 0::2], x[:, 1::2]  # [M, K/2] each


def _partial_product(xe, xo, wv, st, dtype):
    """x_even/x_odd [bm, bk/2], bytes [bn, bk/2], scales^T [bk/32, bn] -> [bm, bn] float32."""
    bkh = wv.shape[1]
    groups = st.shape[0]
    byte_group = (
        jax.lax.broadcasted_iota(jnp.int32, (bkh, groups), 0) // common.BYTES_PER_SCALE
    )
    expand = (
        byte_group == jax.lax.broadcasted_iota(jnp.int32, (bkh, groups), 1)
    ).astype(jnp.float32)
    s = jnp.dot(
        expand, common.e8m0_to_f32(st), precision=jax.lax.Precision.HIGHEST
    )  # [bk/2, bn]
    lo, hi = common.decode_bytes(wv)  # [bn, bk/2] each
    lo = (lo.T * s).astype(dtype)  # [bk/2, bn]
    hi = (hi.T * s).astype(dtype)
    return (
        jnp.dot(xe, lo, preferred_element_type=jnp.float32)  # [bm, bn]
        + jnp.dot(xo, hi, preferred_element_type=jnp.float32)
    )


def _dense_kernel(xe_ref, xo_ref, wv_ref, st_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _partial_product(
        xe_ref[...], xo_ref[...], wv_ref[...], st_ref[...], xe_ref.dtype
    )

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def dense(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    cfg: BlockConfig,
    interpret: bool = False,
) -> jax.Array:
    """y = x @ W.T for x [M, K], W as packed `values` [N, K/2] and E8M0 `scales` [N, K/32]."""
    m, k = x.shape
    n = values.shape[0]
    cfg = cfg.fit(m, n, k)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    mp = common.round_up(m, bm)
    xe, xo = _split_even_odd(jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x)
    y = pl.pallas_call(
        _dense_kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid=(mp // bm, n // bn, k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bn, bk // 2), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((bk // common.SCALE_BLOCK, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        interpret=_interpret(interpret),
        name="fp4_matmul_mosaic_tpu",
    )(xe, xo, values, scales.T)
    return y[:m]


def _grouped_kernel(
    group_ref,
    block_ref,
    lo_ref,
    hi_ref,
    xe_ref,
    xo_ref,
    wv_ref,
    st_ref,
    o_ref,
    acc_ref,
    *,
    bm: int,
):
    t, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += _partial_product(
        xe_ref[...], xo_ref[...], wv_ref[...], st_ref[...], xe_ref.dtype
    )

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        rows = block_ref[t] * bm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mask = (rows >= lo_ref[t]) & (rows < hi_ref[t])
        o_ref[...] = jnp.where(mask, acc_ref[...].astype(o_ref.dtype), o_ref[...])


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
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    mp = common.round_up(m, bm)
    xe, xo = _split_even_odd(jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x)
    sched = common.tile_schedule(group_sizes, m, bm)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(n // bn, sched.group.shape[0], k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk // 2), lambda j, t, kk, g, b, lo, hi: (b[t], kk)),
            pl.BlockSpec((bm, bk // 2), lambda j, t, kk, g, b, lo, hi: (b[t], kk)),
            pl.BlockSpec(
                (None, bn, bk // 2), lambda j, t, kk, g, b, lo, hi: (g[t], j, kk)
            ),
            pl.BlockSpec(
                (None, bk // common.SCALE_BLOCK, bn),
                lambda j, t, kk, g, b, lo, hi: (g[t], kk, j),
            ),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda j, t, kk, g, b, lo, hi: (b[t], j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    y = pl.pallas_call(
        functools.partial(_grouped_kernel, bm=bm),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid_spec=grid_spec,
        interpret=_interpret(interpret),
        name="fp4_grouped_matmul_mosaic_tpu",
    )(
        sched.group,
        sched.block,
        sched.lo,
        sched.hi,
        xe,
        xo,
        values,
        jnp.swapaxes(scales, 1, 2),
    )
    return jnp.where(common.rows_written(group_sizes, m)[:, None], y[:m], 0).astype(
        x.dtype
    )
