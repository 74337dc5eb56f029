"""Pure-jnp lightning indexer: the test oracle and the "xla" backend.

score[b, t, s] = sum_h w[b, t, h] * relu(q[b, t, h] . k[b, s]);  entry s is visible to query t iff
s < (t + 1) // ratio, end[b, s] <= t and both carry the same segment id. `entry_end` (end) defaults to
ratio * (s + 1) - 1, the last token of window s, which makes the second condition the first one; a
caller with entries compacted per document (the model's CSA compressor) passes each entry's real
window end instead, and any end >= S for an unused slot. Compacted ends satisfy end[s] >= ratio*(s+1)-1
(entry s has s windows of `ratio` distinct tokens before it), so the ratio bound stays implied and the
kernels keep using it to skip tiles. The top-k runs per query over the visible entries; picks that
land on no visible entry come back as index -1 with score -inf.
The [chunk, H, N] intermediate is what bounds XLA, so queries are processed `chunk` at a time
(`lax.map`, one chunk in flight) to keep memory at O(chunk * H * N).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.indexer import quantize

SegmentIds = Int[Array, "B S"] | tuple[Int[Array, "B S"], Int[Array, "B N"]] | None


def split_segment_ids(segment_ids: SegmentIds, batch: int, seq: int, num_entries: int,
                      ratio: int) -> tuple[jax.Array, jax.Array]:
  """(query segments [B, S], entry segments [B, N]) as int32.

  `segment_ids` is None (one segment), a pair (query ids [B, S], entry ids [B, N]), or query ids
  [B, S] alone, in which case entry s takes the segment of token ratio * s + ratio - 1, the last token
  of its compression window (the first query that can see it).
  """
  if segment_ids is None:
    return (jnp.zeros((batch, seq), jnp.int32), jnp.zeros((batch, num_entries), jnp.int32))
  if isinstance(segment_ids, (tuple, list)):
    qseg, kseg = segment_ids
  else:
    qseg = segment_ids
    last = jnp.minimum(ratio * jnp.arange(num_entries) + ratio - 1, seq - 1)
    kseg = jnp.take(jnp.asarray(qseg), last, axis=1)
  qseg, kseg = jnp.asarray(qseg, jnp.int32), jnp.asarray(kseg, jnp.int32)
  if qseg.shape != (batch, seq) or kseg.shape != (batch, num_entries):
    raise ValueError(f"segment_ids: expected [B,S]={batch, seq} and [B,N]={batch, num_entries}, "
                     f"got {qseg.shape} and {kseg.shape}")
  return qseg, kseg


def entry_ends(entry_end: Int[Array, "B N"] | None, batch: int, num_entries: int,
               ratio: int) -> jax.Array:
  """Entry ends [B, N] int32: `entry_end` checked, or the default ratio * (s + 1) - 1."""
  if entry_end is None:
    return jnp.broadcast_to(ratio * (jnp.arange(num_entries, dtype=jnp.int32) + 1) - 1,
                            (batch, num_entries))
  if tuple(entry_end.shape) != (batch, num_entries):
    raise ValueError(f"entry_end: expected shape [B,N]={batch, num_entries}, got {tuple(entry_end.shape)}")
  return jnp.asarray(entry_end, jnp.int32)


def check_inputs(q, w, k, topk: int, ratio: int) -> None:
  """One-line errors for inconsistent shapes or bad topk / ratio, before anything is traced."""
  if q.ndim != 4 or w.ndim != 3 or k.ndim != 3:
    raise ValueError(f"indexer_topk: need q [B,S,H,D], w [B,S,H], k [B,N,D]; got ranks "
                     f"{q.ndim}, {w.ndim}, {k.ndim}")
  b, s, h, d = q.shape
  if w.shape != (b, s, h):
    raise ValueError(f"indexer_topk: w shape {w.shape} != {(b, s, h)}")
  if k.shape[0] != b or k.shape[2] != d:
    raise ValueError(f"indexer_topk: k shape {k.shape} does not match q's B={b}, D={d}")
  if int(topk) < 1:
    raise ValueError(f"indexer_topk: topk must be >= 1, got {topk}")
  if int(ratio) < 1:
    raise ValueError(f"indexer_topk: ratio must be >= 1, got {ratio}")


def visible(t: jax.Array, s: jax.Array, ratio: int, qseg: jax.Array, kseg: jax.Array,
            kend: jax.Array) -> jax.Array:
  """Visibility [T, N] of entries s for queries t: causal by ratio and by entry end, same segment."""
  return ((s[None, :] < ((t + 1) // ratio)[:, None]) & (kend[None, :] <= t[:, None])
          & (qseg[:, None] == kseg[None, :]))


def indexer_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                 topk: int, ratio: int, segment_ids: SegmentIds = None, quant: str | None = None,
                 *, entry_end: Int[Array, "B N"] | None = None, chunk: int = 2048,
                 score_dtype=jnp.float32
                 ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Top-k visible entries per query (idx int32, -1 when invalid) and their scores (fp32, -inf).

  Quantized modes fake-quantise q and k (see `quantize`) and multiply in fp32. `score_dtype` is the
  dtype the top-k sees (bf16 reproduces the paper's bf16 index scores); returned scores are those
  values in fp32. Rows are sorted by decreasing score (lax.top_k order; ties by lower index).
  """
  check_inputs(q, w, k, topk, ratio)
  quantize.check_quant(quant)
  b, s, _h, _d = q.shape
  n = k.shape[1]
  qseg, kseg = split_segment_ids(segment_ids, b, s, n, ratio)
  kend = entry_ends(entry_end, b, n, ratio)
  qf, kf = quantize.fake_quant_qk(q, k, quant)
  precision = jax.lax.Precision.HIGHEST if qf.dtype == jnp.float32 else None
  chunk = min(chunk, s)
  s_pad = -(-s // chunk) * chunk
  pad = ((0, 0), (0, s_pad - s))
  qf = jnp.pad(qf, pad + ((0, 0), (0, 0)))
  wf = jnp.pad(w.astype(jnp.float32), pad + ((0, 0),))
  qseg_p = jnp.pad(qseg, pad, constant_values=-1)
  n_cols = max(n, topk)
  entries = jnp.arange(n)

  def one_chunk(c0):
    qc = jax.lax.dynamic_slice_in_dim(qf, c0, chunk, axis=1)  # [B, C, H, D]
    wc = jax.lax.dynamic_slice_in_dim(wf, c0, chunk, axis=1)  # [B, C, H]
    sc = jax.lax.dynamic_slice_in_dim(qseg_p, c0, chunk, axis=1)  # [B, C]
    logits = jnp.einsum("bchd,bnd->bchn", qc, kf, precision=precision,  # [B, C, H, N]
                        preferred_element_type=jnp.float32)
    scores = jnp.einsum("bchn,bch->bcn", jax.nn.relu(logits), wc,  # [B, C, N]
                        precision=jax.lax.Precision.HIGHEST)
    t = c0 + jnp.arange(chunk)
    vis = jax.vmap(lambda a, b_, e: visible(t, entries, ratio, a, b_, e))(sc, kseg, kend)  # [B, C, N]
    scores = jnp.where(vis, scores, -jnp.inf).astype(score_dtype)
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, n_cols - n)), constant_values=-jnp.inf)
    vals, idx = jax.lax.top_k(scores, topk)  # [B, C, topk]
    idx = jnp.where(vals == -jnp.inf, -1, idx).astype(jnp.int32)
    return idx, vals.astype(jnp.float32)

  idx, vals = jax.lax.map(one_chunk, jnp.arange(0, s_pad, chunk))  # [nC, B, C, topk]
  idx = jnp.moveaxis(idx, 0, 1).reshape(b, s_pad, topk)[:, :s]
  vals = jnp.moveaxis(vals, 0, 1).reshape(b, s_pad, topk)[:, :s]
  return idx, vals
