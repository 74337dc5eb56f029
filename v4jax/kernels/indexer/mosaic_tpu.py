"""Pallas Mosaic-TPU lightning indexer. Interpret-tested only: it has never run on a TPU.

Same chunked structure as `triton.py`: a Pallas kernel computes the fp32 masked score row-block of a
query chunk in [block_q, block_k] tiles (heads unrolled, one MXU dot [bq, D] x [D, bk] each, relu and
head weight on the VPU), then `lax.top_k` selects per row (a Pallas TPU top-k, e.g. tokamax's
experimental one, would be the next step). Memory: one fp32 [B, chunk, N] row-block plus the outputs.
FP8 operands (quantized modes) are widened to bf16 in the kernel (E4M3 is exact in bf16); their
per-row scales are applied outside the dot as in the Triton backend. Rows are in score order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from v4jax.kernels.indexer import quantize, reference
from v4jax.kernels.indexer import triton as _tr


def _score_kernel(c0_ref, q_ref, w_ref, k_ref, ks_ref, qseg_ref, kseg_ref, kend_ref, o_ref, *,
                  block_q: int, block_k: int, num_heads: int, ratio: int, n_valid: int, score_dtype):
  """One [block_q, block_k] tile of masked scores (see triton._score_kernel)."""
  t0 = c0_ref[0] + pl.program_id(1) * block_q
  k0 = pl.program_id(2) * block_k
  seen_by_block = jnp.minimum((t0 + block_q) // ratio, n_valid)

  @pl.when(k0 < seen_by_block)
  def _():
    keys = k_ref[...]
    keys = keys.astype(jnp.bfloat16) if keys.dtype.itemsize == 1 else keys  # [bk, D]
    acc = jnp.zeros((block_q, block_k), jnp.float32)
    for h in range(num_heads):  # static unroll: one MXU dot per head
      qh = q_ref[h]
      qh = qh.astype(jnp.bfloat16) if qh.dtype.itemsize == 1 else qh  # [bq, D]
      logits = jax.lax.dot_general(qh, keys, (((1,), (1,)), ((), ())),  # [bq, bk]
                                   preferred_element_type=jnp.float32)
      acc = acc + jnp.maximum(logits, 0.0) * w_ref[:, h:h + 1]
    acc = acc * ks_ref[...]
    if score_dtype != jnp.float32:
      acc = acc.astype(score_dtype).astype(jnp.float32)
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    s = k0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    vis = (s < (t + 1) // ratio) & (s < n_valid) & (qseg_ref[...] == kseg_ref[...])
    vis &= kend_ref[...] <= t
    o_ref[...] = jnp.where(vis, acc, -jnp.inf)

  @pl.when(k0 >= seen_by_block)
  def _():
    o_ref[...] = jnp.full((block_q, block_k), -jnp.inf, jnp.float32)


def indexer_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                 topk: int, ratio: int, segment_ids: reference.SegmentIds = None,
                 quant: str | None = None, *, entry_end: Int[Array, "B N"] | None = None,
                 score_dtype=jnp.float32, interpret: bool = False, chunk: int = 2048,
                 block_q: int = 128, block_k: int = 128
                 ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Top-k visible entries per query (idx -1 / score -inf when invalid); see reference.indexer_topk."""
  reference.check_inputs(q, w, k, topk, ratio)
  quantize.check_quant(quant)
  b, s, h, d = q.shape
  n = k.shape[1]
  block_q, block_k = min(block_q, _tr._round_up(s, 8)), min(block_k, _tr._round_up(n, 8))
  qlp, w_eff, klp, kscale, qseg, kseg, kend = _tr._prepare(q, w, k, ratio, segment_ids, quant,
                                                           block_k, entry_end, operands="e4m3")
  n_pad = _tr._round_up(max(n, topk, block_k), block_k)
  pad_n = ((0, 0), (0, n_pad - klp.shape[1]))
  klp, kscale = jnp.pad(klp, pad_n + ((0, 0),)), jnp.pad(kscale, pad_n)
  kseg = jnp.pad(kseg, pad_n, constant_values=-1)
  kend = jnp.pad(kend, pad_n, constant_values=_tr.NEVER)
  chunk = _tr._round_up(min(chunk, _tr._round_up(s, block_q)), block_q)
  s_pad = _tr._round_up(s, chunk)
  pad_s = ((0, 0), (0, s_pad - s))
  q_heads = jnp.moveaxis(jnp.pad(qlp, pad_s + ((0, 0), (0, 0))), 2, 1)  # [B, H, S, D]
  w_eff = jnp.pad(w_eff, pad_s + ((0, 0),))
  qseg = jnp.pad(qseg, pad_s, constant_values=-2)[..., None]  # [B, S, 1]
  kernel = functools.partial(_score_kernel, block_q=block_q, block_k=block_k, num_heads=h,
                             ratio=ratio, n_valid=n, score_dtype=jnp.dtype(score_dtype))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, chunk // block_q, n_pad // block_k),
      in_specs=[
          pl.BlockSpec((None, h, block_q, d), lambda i, j, l, c0: (i, 0, j, 0)),
          pl.BlockSpec((None, block_q, h), lambda i, j, l, c0: (i, j, 0)),
          pl.BlockSpec((None, block_k, d), lambda i, j, l, c0: (i, l, 0)),
          pl.BlockSpec((None, 1, block_k), lambda i, j, l, c0: (i, 0, l)),
          pl.BlockSpec((None, block_q, 1), lambda i, j, l, c0: (i, j, 0)),
          pl.BlockSpec((None, 1, block_k), lambda i, j, l, c0: (i, 0, l)),
          pl.BlockSpec((None, 1, block_k), lambda i, j, l, c0: (i, 0, l)),
      ],
      out_specs=pl.BlockSpec((None, block_q, block_k), lambda i, j, l, c0: (i, j, l)),
  )
  scores_call = pl.pallas_call(
      kernel, grid_spec=grid_spec, interpret=interpret, name="indexer_scores_tpu",
      out_shape=jax.ShapeDtypeStruct((b, chunk, n_pad), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")))

  def one_chunk(c0):
    sl = lambda x, ax: jax.lax.dynamic_slice_in_dim(x, c0, chunk, axis=ax)
    scores = scores_call(c0[None].astype(jnp.int32), sl(q_heads, 2), sl(w_eff, 1), klp,
                         kscale[:, None, :], sl(qseg, 1), kseg[:, None, :],
                         kend[:, None, :])  # [B, C, n_pad]
    vals, idx = jax.lax.top_k(scores, topk)  # [B, C, topk]
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32), vals

  idx, vals = jax.lax.map(one_chunk, jnp.arange(0, s_pad, chunk))  # [nC, B, C, topk]
  idx = jnp.moveaxis(idx, 0, 1).reshape(b, s_pad, topk)[:, :s]
  vals = jnp.moveaxis(vals, 0, 1).reshape(b, s_pad, topk)[:, :s]
  return idx, vals
