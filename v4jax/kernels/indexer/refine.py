"""Exact rescoring of a candidate set: the second stage of the refined (quantized) lightning indexer.

Quantized QK (fp8 / mxfp4) keeps the O(S * N) scoring cheap but loses recall against the exact
selection: on unstructured inputs the true top-k sits in a dense tail where quantisation noise reorders
entries. Refinement takes `candidates` (> topk) entries per query from the quantized scores, rescores
only those exactly (q and k in their input dtype, fp32 accumulation, fp32 head sum) and keeps the best
topk. The final set equals the exact top-k whenever the exact top-k lies inside the candidates; with
candidates >= the visible count it is the exact selection.

Work and memory: O(S * candidates * H * D) FLOPs, and per query chunk one gathered key block
[B, chunk, candidates, D] and one fp32 [B, chunk, H, candidates] product, so O(S * candidates) overall
(`lax.map` over chunks of queries). Plain XLA: a gather and a batched matmul per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def refine_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                cand: Int[Array, "B S C"], topk: int, *, chunk: int = 1024,
                cand_sorted: bool = False
                ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Best `topk` of the candidate entries `cand` (-1 = none) by exact score; rows by decreasing score.

  Ties go to the lower entry index, as in the reference (candidates are sorted by index first, unless
  `cand_sorted` says they come sorted, valid ones ascending then -1s, as the Triton backend returns them).
  Returns idx [B, S, topk] int32 (-1 when fewer than topk candidates) and fp32 scores (-inf there).
  """
  b, s, _h, _d = q.shape
  c = cand.shape[-1]
  if cand.shape[:2] != (b, s):
    raise ValueError(f"refine_topk: candidates shape {cand.shape} does not match q's [B,S]={b, s}")
  if not 1 <= topk <= c:
    raise ValueError(f"refine_topk: need 1 <= topk <= candidates, got topk={topk}, candidates={c}")
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  chunk = min(chunk, s)
  s_pad = -(-s // chunk) * chunk
  pad = ((0, 0), (0, s_pad - s))
  qp = jnp.pad(q, pad + ((0, 0), (0, 0)))
  wp = jnp.pad(w.astype(jnp.float32), pad + ((0, 0),))
  cp = jnp.pad(cand.astype(jnp.int32), pad + ((0, 0),), constant_values=-1)
  gather = jax.vmap(lambda kb, ib: kb[ib])  # per row: k [N, D], idx [C, Cand] -> [C, Cand, D]

  def one_chunk(c0):
    qc = jax.lax.dynamic_slice_in_dim(qp, c0, chunk, axis=1)  # [B, C, H, D]
    wc = jax.lax.dynamic_slice_in_dim(wp, c0, chunk, axis=1)  # [B, C, H]
    ic = jax.lax.dynamic_slice_in_dim(cp, c0, chunk, axis=1)  # [B, C, Cand]
    if not cand_sorted:
      big = jnp.iinfo(jnp.int32).max
      ic = jnp.sort(jnp.where(ic < 0, big, ic), axis=-1)
      ic = jnp.where(ic == big, -1, ic)
    kc = gather(k, jnp.maximum(ic, 0)).astype(qc.dtype)  # [B, C, Cand, D]
    logits = jnp.einsum("bchd,bcnd->bchn", qc, kc, precision=precision,  # [B, C, H, Cand]
                        preferred_element_type=jnp.float32)
    sc = jnp.einsum("bchn,bch->bcn", jax.nn.relu(logits), wc,  # [B, C, Cand]
                    precision=jax.lax.Precision.HIGHEST)
    sc = jnp.where(ic >= 0, sc, -jnp.inf)
    vals, pos = jax.lax.top_k(sc, topk)  # [B, C, topk]
    idx = jnp.take_along_axis(ic, pos, axis=-1)
    return jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32), vals

  idx, vals = jax.lax.map(one_chunk, jnp.arange(0, s_pad, chunk))  # [nC, B, C, topk]
  idx = jnp.moveaxis(idx, 0, 1).reshape(b, s_pad, topk)[:, :s]
  vals = jnp.moveaxis(vals, 0, 1).reshape(b, s_pad, topk)[:, :s]
  return idx, vals
