"""Public entry point of the lightning indexer: dispatch to a backend, with an XLA fallback.

    from v4jax.kernels import indexer
    idx, scores = indexer.indexer_topk(q, w, k, topk, ratio)

q [B,S,H,D], w [B,S,H], k [B,N,D] (compressed keys). score[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]);
entry s is visible to query t iff s < (t+1)//ratio, entry_end[s] <= t and both share a segment
(`segment_ids`: query ids [B,S], or the pair (query ids [B,S], entry ids [B,N])). `entry_end` [B,N]
defaults to ratio*(s+1)-1 (the ratio form); entries compacted per document pass their window ends
(>= S for unused slots), see `reference`. Returns idx [B,S,topk]
int32 (-1 when fewer than topk entries are visible) and scores [B,S,topk] fp32 (-inf there).
The order of the entries within a row depends on the backend (xla / mosaic_tpu: by decreasing
score; triton / mosaic_gpu: by increasing index): compare rows as sets; scores always belong to their idx.
Backends: "triton" (the GPU default, measured on the H200), "mosaic_gpu" (its pipeline with a Mosaic GPU
score kernel in bf16; interpreter-tested and lowered for CUDA, not yet run on a GPU), "mosaic_tpu"
(interpret-tested), "xla" (the reference).
quant: None (QK in the input dtype, fp32 accumulation), "fp8" (E4M3, per-row scales) or "mxfp4"
(Hadamard-rotated, MXFP4; on Hopper E4M3 values on FP8 tensor cores, see `triton.indexer_topk(operands=...)`).
`candidates` (static int >= topk, or None): refined selection. The backend picks `candidates` entries
per query with the (quantized) scores, then `refine.refine_topk` rescores only those exactly (q, k in
their input dtype, fp32 accumulation) and keeps the best topk: the scoring stays O(S*N) in the cheap
precision while the final set is exact whenever the exact top-k lies inside the candidates (always
when candidates >= the visible count). The rescoring runs in `refine_triton` (fused gather, Triton
select) with the triton backend, else in XLA (`refine`); scores are the exact fp32 ones, rows in the
backend's order (Triton: increasing index; XLA: decreasing score).
`score_dtype` (static): the dtype the top-k sees (bf16 = the paper's bf16 index scores; returned in fp32).
`topk` and `ratio` are static Python ints. The selection has no gradient, and the Pallas backends define
no VJP: a loss on the selected scores (the indexer's KL loss) should recompute them differentiably
from q, w, k[idx].
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.indexer import quantize, reference, refine

IMPLEMENTATIONS = ("xla", "triton", "mosaic_gpu", "mosaic_tpu")


def _pow2(x: int) -> bool:
  return x > 0 and not x & (x - 1)


def _pick(implementation: str | None, platform: str, interpret: bool, h: int, d: int) -> str:
  """The backend to run: the requested one if it can run here, else the best for the platform."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
  triton_ok = _pow2(h) and _pow2(d) and d >= 16 and (platform == "gpu" or interpret)
  if implementation is None:
    if platform == "gpu" and triton_ok:
      return "triton"
    if platform == "tpu":
      return "mosaic_tpu"
    return "xla"
  if implementation == "mosaic_gpu" and not (triton_ok and d % 64 == 0):
    fallback = "triton" if triton_ok else "xla"  # the same pipeline and output order when it can run
    warnings.warn(f"indexer: mosaic_gpu needs a GPU (or interpret=True), power-of-two H and D % 64 == 0 "
                  f"(got H={h}, D={d}, platform={platform}); falling back to {fallback!r}")
    return fallback
  if implementation == "triton" and not triton_ok:
    warnings.warn(f"indexer: triton needs a GPU (or interpret=True) and power-of-two H, D >= 16 "
                  f"(got H={h}, D={d}, platform={platform}); falling back to 'xla'")
    return "xla"
  if implementation == "mosaic_tpu" and platform != "tpu" and not interpret:
    warnings.warn(f"indexer: mosaic_tpu needs a TPU or interpret=True (platform={platform}); "
                  "falling back to 'xla'")
    return "xla"
  return implementation


def indexer_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                 topk: int, ratio: int, segment_ids: reference.SegmentIds = None,
                 quant: str | None = None, implementation: str | None = None,
                 interpret: bool = False, *, entry_end: Int[Array, "B N"] | None = None,
                 score_dtype=jnp.float32, candidates: int | None = None
                 ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Top-k compressed entries per query by lightning-indexer score (module doc for semantics)."""
  reference.check_inputs(q, w, k, topk, ratio)
  quantize.check_quant(quant)
  if jnp.dtype(score_dtype) not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"score_dtype must be float32 or bfloat16, got {jnp.dtype(score_dtype)}")
  reference.entry_ends(entry_end, k.shape[0], k.shape[1], ratio)  # shape check
  impl = _pick(implementation, jax.default_backend(), interpret, q.shape[2], q.shape[3])
  if candidates is not None:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < topk:
      raise ValueError(f"candidates must be an int >= topk={topk} or None, got {candidates!r}")
    cand, _ = indexer_topk(q, w, k, candidates, ratio, segment_ids, quant, impl, interpret,
                           entry_end=entry_end, score_dtype=score_dtype)
    if impl in ("triton", "mosaic_gpu"):
      from v4jax.kernels.indexer import refine_triton
      return refine_triton.refine_topk(q, w, k, cand, topk, interpret=interpret)
    return refine.refine_topk(q, w, k, cand, topk)
  opts = {"entry_end": entry_end, "score_dtype": score_dtype}
  if impl == "triton":
    from v4jax.kernels.indexer import triton
    return triton.indexer_topk(q, w, k, topk, ratio, segment_ids, quant, interpret=interpret, **opts)
  if impl == "mosaic_gpu":
    from v4jax.kernels.indexer import mosaic_gpu
    return mosaic_gpu.indexer_topk(q, w, k, topk, ratio, segment_ids, quant, interpret=interpret, **opts)
  if impl == "mosaic_tpu":
    from v4jax.kernels.indexer import mosaic_tpu
    return mosaic_tpu.indexer_topk(q, w, k, topk, ratio, segment_ids, quant, interpret=interpret,
                                   **opts)
  return reference.indexer_topk(q, w, k, topk, ratio, segment_ids, quant, **opts)
