"""Pallas Mosaic GPU (Hopper) score kernel for the lightning indexer, in the Triton backend's pipeline.

The pipeline is `triton.pipeline`: queries in chunks, one fp32 score row-block per chunk, the exact radix
select (a Pallas-Triton kernel) on each row. Only the score kernel differs. Each CTA (one warpgroup) owns a
[64 queries, 128 entries] tile:
  * the entry tile k [128, D] and its column vectors (key scale, segment, entry end) go to shared memory by
    TMA once;
  * `plgpu.emit_pipeline` streams the H heads' query tiles q_h [64, D] and weight rows w[:, h] through
    shared memory (double-buffered TMA). Per head one wgmma gives logits [64, 128] in fp32, and relu times
    the head weight is added to a register accumulator, the loop's carry;
  * the causal / entry-end / segment mask and the key scale are applied, and the tile goes back by TMA.
Tiles no query of the block can see are skipped and left unwritten, as in the Triton kernel: the select
never reads them.

The operands are bf16. The quantized modes pass their E4M3 values held in bf16, which is exact. fp32 q and k
are rounded to bf16, so QK runs in bf16, with fp32 accumulation. The FP8 wgmma path is not wired here: the
Triton backend's FP8 dots are the measured GPU path. Needs D % 64 == 0 (128-byte swizzled rows).

Status: tested in the Mosaic GPU interpreter on CPU and lowered for CUDA without a GPU
(tests/kernels/test_indexer_mosaic_gpu.py). It has not run on a GPU: its speed is unmeasured, and the api
picks Triton on GPU unless "mosaic_gpu" is asked for.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from v4jax.kernels.indexer import reference, triton

BQ, BK = 64, 128  # query rows (the wgmma M tile of one warpgroup) x entries per CTA
SWIZZLE = 128
BF16_TILES = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
ROW = plgpu.Layout.WGMMA.reduce(1)  # a [64] vector along the tile's rows
COL = plgpu.Layout.WGMMA.reduce(0)  # a [128] vector along its columns


def _kernel(q_gmem, w_gmem, k_gmem, ks_gmem, kseg_gmem, kend_gmem, qpos_gmem, qlim_gmem, qseg_gmem,
            o_gmem, k_smem, ks_smem, kseg_smem, kend_smem, qpos_smem, qlim_smem, qseg_smem, o_smem, bars,
            *, num_heads: int, score_dtype):
  b, i, j = (jax.lax.axis_index(a) for a in ("b", "i", "j"))
  rows, cols = pl.ds(i * BQ, BQ), pl.ds(j * BK, BK)
  plgpu.copy_gmem_to_smem(qlim_gmem.at[rows], qlim_smem, bars.at[0])
  plgpu.barrier_wait(bars.at[0])

  @pl.when(j * BK < qlim_smem[BQ - 1])  # the block's last query sees the most entries
  def _():
    copies = ((k_gmem.at[b, cols], k_smem), (ks_gmem.at[b, cols], ks_smem),
              (kseg_gmem.at[b, cols], kseg_smem), (kend_gmem.at[b, cols], kend_smem),
              (qpos_gmem.at[rows], qpos_smem), (qseg_gmem.at[b, rows], qseg_smem))
    for n, (src, dst) in enumerate(copies):
      plgpu.copy_gmem_to_smem(src, dst, bars.at[1 + n])
    for n in range(len(copies)):
      plgpu.barrier_wait(bars.at[1 + n])

    def head(_, q_smem, w_smem, acc):
      def logits_of(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.T)  # [64, D] @ [D, 128] -> fp32 [64, 128]
        plgpu.wgmma_wait(0)
        return acc_ref[...]

      logits = pl.run_scoped(logits_of, plgpu.ACC((BQ, BK), jnp.float32))
      w_h = plgpu.load(w_smem, layout=ROW)  # [64]
      return acc + jnp.maximum(logits, 0.0) * w_h[:, None]

    zero = plgpu.layout_cast(jnp.zeros((BQ, BK), jnp.float32), plgpu.Layout.WGMMA)
    acc = plgpu.emit_pipeline(
        head, grid=(num_heads,),
        in_specs=[plgpu.BlockSpec((None, None, BQ, q_gmem.shape[-1]), lambda h: (b, h, i, 0),
                                  transforms=BF16_TILES),
                  plgpu.BlockSpec((None, None, BQ), lambda h: (b, h, i))],
        max_concurrent_steps=2, init_carry=zero)(q_gmem, w_gmem)
    acc = acc * plgpu.load(ks_smem, layout=COL)[None, :]
    if score_dtype != jnp.float32:
      acc = acc.astype(score_dtype).astype(jnp.float32)
    t = plgpu.load(qpos_smem, layout=ROW)[:, None]  # [64, 1] query positions
    lim = plgpu.load(qlim_smem, layout=ROW)[:, None]  # [64, 1] min((t + 1) // ratio, N)
    s = j * BK + plgpu.broadcasted_iota(jnp.int32, (BQ, BK), 1, layout=plgpu.Layout.WGMMA)
    vis = (s < lim) & (plgpu.load(kend_smem, layout=COL)[None, :] <= t)
    vis &= plgpu.load(qseg_smem, layout=ROW)[:, None] == plgpu.load(kseg_smem, layout=COL)[None, :]
    o_smem[...] = jnp.where(vis, acc, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, rows, cols])
    plgpu.wait_smem_to_gmem(0)


def scores_call(c0, q, w, k, kscale, qseg, kseg, kend, *, ratio, n_valid, interpret, width=None,
                score_dtype=jnp.float32, block_q=BQ, block_k=BK, **_triton_only):
  """Masked fp32 scores of one query chunk against entries [0, width): [B, C, width], the contract of
  `triton._scores_call` (its warp and stage arguments do not apply here; the tiles must be BQ x BK)."""
  b, c, h, d = q.shape
  width = width or k.shape[1]
  if (block_q, block_k) != (BQ, BK) or c % BQ or width % BK:
    raise ValueError(f"mosaic_gpu indexer: tiles {BQ} x {BK} need chunk % {BQ} == 0 and width % {BK} == 0, "
                     f"got blocks {block_q} x {block_k}, chunk {c}, width {width}")
  qh = jnp.moveaxis(q.astype(jnp.bfloat16), 2, 1)  # [B, H, C, D]: one TMA tile per head
  wh = jnp.moveaxis(w.astype(jnp.float32), 2, 1)  # [B, H, C]
  qpos = c0[0] + jnp.arange(c, dtype=jnp.int32)  # [C] absolute query positions
  qlim = jnp.minimum((qpos + 1) // ratio, n_valid)  # [C] entries < qlim pass the ratio bound
  call = plgpu.kernel(
      functools.partial(_kernel, num_heads=h, score_dtype=jnp.dtype(score_dtype)),
      out_type=jax.ShapeDtypeStruct((b, c, width), jnp.float32),
      grid=(b, c // BQ, width // BK),
      grid_names=("b", "i", "j"),
      scratch_types=[plgpu.SMEM((BK, d), jnp.bfloat16, transforms=BF16_TILES),
                     plgpu.SMEM((BK,), jnp.float32), plgpu.SMEM((BK,), jnp.int32),
                     plgpu.SMEM((BK,), jnp.int32), plgpu.SMEM((BQ,), jnp.int32),
                     plgpu.SMEM((BQ,), jnp.int32), plgpu.SMEM((BQ,), jnp.int32),
                     plgpu.SMEM((BQ, BK), jnp.float32), plgpu.Barrier(num_barriers=7)],
      interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret else None,
      kernel_name="indexer_scores_mosaic_gpu",
  )
  return call(qh, wh, k.astype(jnp.bfloat16), kscale, kseg, kend, qpos, qlim, qseg)


def indexer_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                 topk: int, ratio: int, segment_ids: reference.SegmentIds = None,
                 quant: str | None = None, *, entry_end: Int[Array, "B N"] | None = None,
                 score_dtype=jnp.float32, interpret: bool = False, chunk: int | None = None,
                 select_elems: int = 16384
                 ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Top-k visible entries per query: `triton.indexer_topk`'s pipeline and outputs (increasing entry
  order within a row) with this module's score kernel; quantized modes use the fused quantizer with
  bf16-held E4M3 operands."""
  d = q.shape[-1]
  if d % 64:
    raise ValueError(f"mosaic_gpu indexer: D={d} must be a multiple of 64 (128-byte shared-memory rows)")
  if quant is None and jnp.float32 in (q.dtype, k.dtype):
    warnings.warn("mosaic_gpu indexer: float32 q / k are rounded to bf16 for the wgmma (the triton backend "
                  "keeps float32 QK); picks can differ from float32 selection in near-ties")
  return triton.indexer_topk(q, w, k, topk, ratio, segment_ids, quant, entry_end=entry_end,
                             score_dtype=score_dtype, interpret=interpret, chunk=chunk, block_q=BQ,
                             block_k=BK, operands="bf16", select_elems=select_elems,
                             scores_call=scores_call)
