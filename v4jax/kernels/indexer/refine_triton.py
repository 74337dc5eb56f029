"""Pallas-Triton exact rescoring of indexer candidates (the refine stage, see `refine`), fused gather.

The XLA refine materialises the gathered keys [chunk, C, D] and the fp32 products [chunk, H, C] in HBM.
Here one program takes one query: its q [H, D] and w [H] stay in registers while the loop over blocks of
`block_c` candidates gathers those key rows straight from k (pointer gather; at N = 32K the bf16 keys,
8 MiB, sit in the H200's L2), runs one [H, D] x [D, block_c] tensor-core dot, applies relu and the head
weights and writes the fp32 score row [C]. The top-k of that row is the Triton backend's exact radix
select (`triton._select_call`), so ties go to the lower candidate position, i.e. the lower entry index
when candidates come sorted (as the Triton backend returns them). Memory: one fp32 [B, chunk, C] block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from v4jax.kernels.indexer import triton as _tr


def _rescore_kernel(q_ref, w_ref, cand_ref, k_ref, o_ref, *, block_c: int, num_blocks: int,
                    live_blocks: int, exact_fp32: bool):
  """Scores of one query's candidates: sum_h w[h] relu(q[h] . k[cand[c]]), -inf where cand < 0.
  Only the first `live_blocks` blocks hold candidates; the rest of the row (the select kernel's
  power-of-two padding, e.g. 1536 candidates in a 2048 row) is written -inf without a gather or dot."""
  q = q_ref[...]  # [H, D]
  w = w_ref[...]  # [H]

  def one_block(j, carry):
    c0 = pl.multiple_of(j * block_c, block_c)
    idx = cand_ref[pl.ds(c0, block_c)]  # [bc]
    keys = k_ref[jnp.maximum(idx, 0), :]  # [bc, D]: gathered rows of k
    logits = plgpu.dot(q, keys, trans_b=True, allow_tf32=not exact_fp32)  # [H, bc] fp32
    sc = jnp.sum(jnp.maximum(logits, 0.0) * w[:, None], axis=0)  # [bc]
    o_ref[pl.ds(c0, block_c)] = jnp.where(idx >= 0, sc, -jnp.inf)
    return carry

  jax.lax.fori_loop(0, live_blocks, one_block, 0)

  def empty_block(j, carry):
    o_ref[pl.ds(pl.multiple_of(j * block_c, block_c), block_c)] = jnp.full((block_c,), -jnp.inf, jnp.float32)
    return carry

  jax.lax.fori_loop(live_blocks, num_blocks, empty_block, 0)


def _rescore_call(q, w, cand, k, *, block_c, num_warps, interpret, live: int | None = None):
  """fp32 scores [B, C, Cp] of the candidates of queries q [B, C, H, D] (Cp = padded candidates; only
  the first `live` columns can hold candidates, default all)."""
  b, c, h, d = q.shape
  cp, n = cand.shape[-1], k.shape[1]
  live_blocks = -(-(cp if live is None else live) // block_c)
  kernel = functools.partial(_rescore_kernel, block_c=block_c, num_blocks=cp // block_c,
                             live_blocks=live_blocks, exact_fp32=q.dtype == jnp.float32)
  return pl.pallas_call(
      kernel,
      grid=(b, c),
      in_specs=[
          pl.BlockSpec((None, None, h, d), lambda i, t: (i, t, 0, 0)),
          pl.BlockSpec((None, None, h), lambda i, t: (i, t, 0)),
          pl.BlockSpec((None, None, cp), lambda i, t: (i, t, 0)),
          pl.BlockSpec((None, n, d), lambda i, t: (i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, cp), lambda i, t: (i, t, 0)),
      out_shape=jax.ShapeDtypeStruct((b, c, cp), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=interpret,
      name="indexer_refine_scores",
  )(q, w, cand, k)


def refine_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                cand: Int[Array, "B S C"], topk: int, *, chunk: int = 4096, block_c: int = 64,
                num_warps: int = 4, interpret: bool = False
                ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Best `topk` candidates by exact score (see `refine.refine_topk`); rows by increasing entry index
  when `cand` rows are sorted (valid ascending, then -1), else by increasing candidate position."""
  b, s, h, d = q.shape
  n, c = k.shape[1], cand.shape[-1]
  if not 1 <= topk <= c:
    raise ValueError(f"refine_topk: need 1 <= topk <= candidates, got topk={topk}, candidates={c}")
  # H and D padded with zeros to powers of two >= 16 (the dot's minimum): zero heads and zero
  # dimensions add nothing to any score
  hp, dp = max(16, _tr._next_pow2(h)), max(16, _tr._next_pow2(d))
  cp = max(_tr._next_pow2(c), block_c)
  n_pad = _tr._next_pow2(n)
  chunk = _tr._round_up(min(chunk, _tr._round_up(s, 64)), 64)
  s_pad = _tr._round_up(s, chunk)
  pad_s = ((0, 0), (0, s_pad - s))
  qp = jnp.pad(q, pad_s + ((0, hp - h), (0, dp - d)))
  wp = jnp.pad(w.astype(jnp.float32), pad_s + ((0, hp - h),))
  cand_p = jnp.pad(cand.astype(jnp.int32), pad_s + ((0, cp - c),), constant_values=-1)
  kp = jnp.pad(k.astype(q.dtype), ((0, 0), (0, n_pad - n), (0, dp - d)))
  full = jnp.array([cp], jnp.int32)  # select kernel: every column of the row counts (ratio 1, t >= cp)

  def one_chunk(c0):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, c0, chunk, axis=1)
    cand_c = sl(cand_p)  # [B, chunk, Cp]
    scores = _rescore_call(sl(qp), sl(wp), cand_c, kp, block_c=block_c, num_warps=num_warps,
                           interpret=interpret, live=c)  # [B, chunk, Cp]
    pos, vals = _tr._select_call(full, scores, topk=topk, ratio=1, n_valid=cp,
                                 interpret=interpret)  # [B, chunk, topk_pad]
    idx = jnp.take_along_axis(cand_c, jnp.maximum(pos, 0), axis=-1)
    return jnp.where(pos < 0, -1, idx), vals

  idx, vals = jax.lax.map(one_chunk, jnp.arange(0, s_pad, chunk))  # [nC, B, chunk, topk_pad]
  idx = jnp.moveaxis(idx, 0, 1).reshape(b, s_pad, -1)[:, :s, :topk]
  vals = jnp.moveaxis(vals, 0, 1).reshape(b, s_pad, -1)[:, :s, :topk]
  return idx, vals
