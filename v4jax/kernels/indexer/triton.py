"""Pallas-Triton lightning indexer for NVIDIA GPUs (tuned on the H200), also runs in interpret mode.

Why two kernels and not a fused streaming top-k: a running top-512 per query does not fit a Triton
program's registers beside a [bq, bk] score tile, and Pallas-Triton has no sort or heap primitive, so a
merge per key tile would cost more than the QK product. Instead queries go in chunks of `chunk` rows
(one chunk's score row-block in flight, `lax.map`), each chunk through two kernels:

  1. `_score_kernel`: tiles [bq queries, bk entries]; per tile a loop over the H heads, each a
     [bq, D] x [D, bk] tensor-core dot (bf16; FP8 operands for the quantized modes), relu, times the
     head weight, accumulated in fp32 registers; causal / entry-end / segment masking writes -inf. Tiles that no
     query of the block can see are skipped (left unwritten: the select kernel never reads them).
     Output: the chunk's fp32 score row-block [B, chunk, W], W = the chunk's visible width rounded up
     to a power of two (chunks are grouped by W, one `lax.map` per group, so early chunks do no work
     on entries nobody can see). On the H200, device time: 76% of the bf16 matmul rate at S = 128K.
  2. `_select_kernel`: a few rows per program (about 64 elements per thread), the rows' visible
     prefixes in registers. Exact radix select on the order-preserving int32 image of the fp32 scores:
     32 bisection steps over the bits find each row's k-th largest key T; entries above T are taken,
     then ties at T by increasing entry index until k are taken (deterministic); the picks are
     compacted with a prefix sum and scattered. The score FLOPs are spent once (no second pass).

Memory: O(S * topk) outputs plus one fp32 [B, chunk, W] row-block (<= 256 MiB by default); quantized
modes quantize q one chunk at a time inside the same step (the XLA quantizer 2048 rows at a time; keys
whole: N = S / ratio rows). Output order within a row:
increasing entry index (compare rows as sets); scores are those of the returned indices; unused slots
hold idx -1 and score -inf. fp32 scores (not bf16) keep the selection exact, with no bf16 ties.
Quantized modes: q and k are E4M3 values with one positive fp32 scale per row (see `quantize`), by
default on FP8 tensor cores (`operands`); the query scale is folded into the head weight and
the key scale multiplies the score column after the head sum (relu commutes with positive scales).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from v4jax.kernels import fp8_accumulation
from v4jax.kernels.indexer import quantize, quantize_triton, reference

fp8_accumulation.enable()  # FP8 dots: native accumulation over each head's D <= 128 products
_INT_MIN = -(2**31)
NEVER = 2**31 - 1  # entry end of padded slots: no query ever sees them
SCORE_BLOCK_BYTES = 256 * 2**20  # default chunk: one fp32 score row-block of at most this size
Q_QUANT_PIECE = 2048  # rows of q quantized at a time inside a chunk
OPERANDS = ("bf16", "e4m3_widen", "e4m3")


def _next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _score_kernel(c0_ref, q_ref, w_ref, k_ref, ks_ref, qseg_ref, kseg_ref, kend_ref, o_ref, *,
                  block_q: int, block_k: int, num_heads: int, ratio: int, n_valid: int,
                  exact_fp32: bool, widen: bool, score_dtype, heads_per_step: int):
  """One [block_q, block_k] tile of masked scores: sum_h w[t,h] relu(q[t,h] . k[s]) * kscale[s].

  The tile skip uses the ratio bound s < (t+1)//ratio, which every entry_end respects (reference doc).
  Scores are rounded to `score_dtype` (kept in fp32) when it is not fp32. `heads_per_step` heads per
  loop step issue their dots before their epilogues (room for the tensor cores to run ahead).
  """
  t0 = c0_ref[0] + pl.program_id(1) * block_q
  k0 = pl.program_id(2) * block_k
  seen_by_block = jnp.minimum((t0 + block_q) // ratio, n_valid)  # entries < this are seen by a row

  @pl.when(k0 < seen_by_block)
  def _():
    keys = k_ref[...]  # [bk, D]
    keys = keys.astype(jnp.bfloat16) if widen else keys

    def heads_step(i, acc):
      heads = [i * heads_per_step + j for j in range(heads_per_step)]
      logits = []
      for h in heads:
        qh = q_ref[:, h, :]  # [bq, D]
        qh = qh.astype(jnp.bfloat16) if widen else qh
        logits.append(plgpu.dot(qh, keys, trans_b=True, allow_tf32=not exact_fp32))  # [bq, bk] fp32
      for h, lg in zip(heads, logits):
        acc = acc + jnp.maximum(lg, 0.0) * w_ref[:, h][:, None]
      return acc

    acc = jax.lax.fori_loop(0, num_heads // heads_per_step, heads_step,
                            jnp.zeros((block_q, block_k), jnp.float32))
    acc = acc * ks_ref[...][None, :]
    if score_dtype != jnp.float32:
      acc = acc.astype(score_dtype).astype(jnp.float32)
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    s = k0 + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    vis = (s < (t + 1) // ratio) & (s < n_valid) & (kend_ref[...][None, :] <= t)
    vis &= qseg_ref[...][:, None] == kseg_ref[...][None, :]
    o_ref[...] = jnp.where(vis, acc, -jnp.inf)


def _select_kernel(c0_ref, x_ref, idx_ref, val_ref, *, topk: int, ratio: int, n_valid: int,
                   width: int, rows: int, topk_pad: int):
  """Exact top-k of `rows` rows' visible prefixes by radix (bit-bisection) select; see module doc.

  Several rows per program let one cross-warp reduction serve all of them. Outputs are flat blocks
  [rows * topk_pad] so the compaction is a 1-D scatter.
  """
  t = c0_ref[0] + pl.program_id(1) * rows + jax.lax.iota(jnp.int32, rows)  # [R]
  count = jnp.minimum((t + 1) // ratio, n_valid)  # [R]
  cols = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 1)
  x = plgpu.load(x_ref, mask=cols < count[:, None], other=-jnp.inf)  # [R, W]
  valid = x > -jnp.inf
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  key = jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int32 order == float order
  key = jnp.where(valid, key, _INT_MIN)
  k_eff = jnp.minimum(jnp.sum(valid.astype(jnp.int32), axis=1), topk)  # [R]

  def bisect(i, thr):  # thr [R]: offset-binary prefix of the k_eff-th largest key, MSB first
    bit = jnp.left_shift(jnp.int32(1), 31 - i)
    cand = ((thr ^ _INT_MIN) | bit) ^ _INT_MIN  # > INT_MIN, so invalid keys never count
    n_ge = jnp.sum((key >= cand[:, None]).astype(jnp.int32), axis=1)
    return jnp.where(n_ge >= k_eff, cand, thr)

  thr = jax.lax.fori_loop(0, 32, bisect, jnp.full((rows,), _INT_MIN, jnp.int32))
  above = valid & (key > thr[:, None])
  tied = valid & (key == thr[:, None])
  need = k_eff - jnp.sum(above.astype(jnp.int32), axis=1)
  take = above | (tied & (jnp.cumsum(tied.astype(jnp.int32), axis=1) <= need[:, None]))
  # Unselected entries point past the end: masked on the GPU, and dropped by interpret mode's scatter
  # (which would otherwise write old values back through colliding indices).
  row = jax.lax.broadcasted_iota(jnp.int32, (rows, width), 0)
  pos = jnp.where(take, row * topk_pad + jnp.cumsum(take.astype(jnp.int32), axis=1) - 1,
                  rows * topk_pad)
  plgpu.store(idx_ref.at[pos.reshape(-1)], cols.reshape(-1), mask=take.reshape(-1))
  plgpu.store(val_ref.at[pos.reshape(-1)], x.reshape(-1), mask=take.reshape(-1))
  slots = jax.lax.broadcasted_iota(jnp.int32, (rows, topk_pad), 1)
  pad = (slots >= k_eff[:, None]).reshape(-1)
  plgpu.store(idx_ref, jnp.full((rows * topk_pad,), -1, jnp.int32), mask=pad)
  plgpu.store(val_ref, jnp.full((rows * topk_pad,), -jnp.inf, jnp.float32), mask=pad)


def _scores_call(c0, q, w, k, kscale, qseg, kseg, kend, *, ratio, n_valid, block_q, block_k,
                 num_warps, num_stages, interpret, width=None, widen=False, score_dtype=jnp.float32,
                 heads_per_step=1):
  """Masked fp32 scores of one query chunk against entries [0, width): [B, C, width]. `widen`: E4M3
  operands go to bf16 in registers before the dot (else FP8 operands take the FP8 dot)."""
  b, c, h, d = q.shape
  width = width or k.shape[1]
  kernel = functools.partial(_score_kernel, block_q=block_q, block_k=block_k, num_heads=h,
                             ratio=ratio, n_valid=n_valid, exact_fp32=q.dtype == jnp.float32,
                             widen=widen and q.dtype.itemsize == 1,
                             score_dtype=jnp.dtype(score_dtype),
                             heads_per_step=min(heads_per_step, h))
  return pl.pallas_call(
      kernel,
      grid=(b, c // block_q, width // block_k),
      in_specs=[
          pl.BlockSpec((1,), lambda i, j, l: (0,)),
          pl.BlockSpec((None, block_q, h, d), lambda i, j, l: (i, j, 0, 0)),
          pl.BlockSpec((None, block_q, h), lambda i, j, l: (i, j, 0)),
          pl.BlockSpec((None, block_k, d), lambda i, j, l: (i, l, 0)),
          pl.BlockSpec((None, block_k), lambda i, j, l: (i, l)),
          pl.BlockSpec((None, block_q), lambda i, j, l: (i, j)),
          pl.BlockSpec((None, block_k), lambda i, j, l: (i, l)),
          pl.BlockSpec((None, block_k), lambda i, j, l: (i, l)),
      ],
      out_specs=pl.BlockSpec((None, block_q, block_k), lambda i, j, l: (i, j, l)),
      out_shape=jax.ShapeDtypeStruct((b, c, width), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="indexer_scores",
  )(c0, q, w, k, kscale, qseg, kseg, kend)


def _select_rows(width: int, chunk: int, select_elems: int) -> int:
  """Rows per select program: about select_elems elements, a power of two (<= 64) dividing chunk."""
  rows = 1
  while rows < 64 and 2 * rows * width <= select_elems and chunk % (2 * rows) == 0:
    rows *= 2
  return rows


def _select_call(c0, scores, *, topk, ratio, n_valid, interpret, select_elems=16384):
  """Top-k of each row of a chunk's score row-block: (idx [B, C, topk_pad], scores [B, C, topk_pad]).

  About 64 elements per thread measured best on the H200 (8 warps for 16384 elements; one 32768-wide
  row takes 16 warps; 128 per thread ran 2x slower).
  """
  b, c, width = scores.shape
  topk_pad = _next_pow2(topk)
  rows = _select_rows(width, c, select_elems)
  num_warps = int(min(16, max(4, rows * width // 2048)))
  kernel = functools.partial(_select_kernel, topk=topk, ratio=ratio, n_valid=n_valid, width=width,
                             rows=rows, topk_pad=topk_pad)
  flat = jax.ShapeDtypeStruct((b, c * topk_pad), jnp.int32)
  idx, vals = pl.pallas_call(
      kernel,
      grid=(b, c // rows),
      in_specs=[pl.BlockSpec((1,), lambda i, r: (0,)),
                pl.BlockSpec((None, rows, width), lambda i, r: (i, r, 0))],
      out_specs=[pl.BlockSpec((None, rows * topk_pad), lambda i, r: (i, r))] * 2,
      out_shape=[flat, flat.update(dtype=jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="indexer_select",
  )(c0, scores)
  return idx.reshape(b, c, topk_pad), vals.reshape(b, c, topk_pad)


def chunk_scores(q, w, k, ratio, segment_ids=None, quant=None, *, c0: int = 0, chunk: int | None = None,
                 entry_end=None, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                 num_stages: int = 3, interpret: bool = False) -> jax.Array:
  """Masked scores of queries [c0, c0 + chunk) only ([B, chunk, n_pad] fp32; for tests and benchmarks).

  Entries no query of a tile can see are left unwritten (garbage), as in the full pipeline.
  """
  qlp, w_eff, klp, kscale, qseg, kseg, kend = _prepare(q, w, k, ratio, segment_ids, quant, block_k,
                                                       entry_end, operands="e4m3")
  chunk = chunk or q.shape[1] - c0
  sl = lambda x: jax.lax.slice_in_dim(x, c0, c0 + chunk, axis=1)
  return _scores_call(jnp.array([c0], jnp.int32), sl(qlp), sl(w_eff), klp, kscale, sl(qseg), kseg, kend,
                      ratio=ratio, n_valid=k.shape[1], block_q=block_q, block_k=block_k,
                      num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _quantize_operand(x, quant, operands, quantizer="xla", interpret=False):
  """(x in the kernel's operand format, row scale or None): E4M3 for "e4m3"/"e4m3_widen", the same
  values held in bf16 for "bf16" (exact); x itself for quant=None. quantizer "triton": one fused
  pass (`quantize_triton`); "xla": `quantize.quantize_rows` (then `quantize.e4m3_as_bf16`)."""
  if quant is None:
    return x, None
  if quantizer == "triton":
    out_dtype = jnp.bfloat16 if operands == "bf16" else jnp.float8_e4m3fn
    return quantize_triton.quantize_rows(x, quant, out_dtype, interpret=interpret)
  xlp, scale = quantize.quantize_rows(x, quant)
  if operands == "bf16":
    xlp = quantize.e4m3_as_bf16(xlp)
  return xlp, scale


def _quantize_q_chunk(q_c, quant, operands, piece: int | None = None, quantizer="xla",
                      interpret=False):
  """A chunk of q in the operand format and its row scales. The XLA quantizer goes `piece` (default
  Q_QUANT_PIECE) rows at a time (`lax.map`), so that its fp32 temporaries (copy, Hadamard rotation,
  scales) stay at one piece's size; the Triton quantizer has none."""
  b, c, h, d = q_c.shape
  piece = piece or Q_QUANT_PIECE
  quantize_fn = functools.partial(_quantize_operand, quant=quant, operands=operands,
                                  quantizer=quantizer, interpret=interpret)
  if quantizer == "triton" or c <= piece or c % piece:
    return quantize_fn(q_c)
  pieces = jnp.moveaxis(q_c.reshape(b, c // piece, piece, h, d), 1, 0)  # [nP, B, P, H, D]
  xlp, scale = jax.lax.map(quantize_fn, pieces)
  return (jnp.moveaxis(xlp, 0, 1).reshape(b, c, h, d),
          jnp.moveaxis(scale, 0, 1).reshape(b, c, h))


def _prepare(q, w, k, ratio, segment_ids, quant, block_k, entry_end=None, quantize_q=True, *,
             operands, quantizer="xla", interpret=False):
  """Kernel operands: low-precision q/k (in the `operands` format), folded weights, key scales,
  segments, entry ends (padded slots never visible); keys padded to a power of two >= block_k.
  `quantize_q=False` leaves q (and w) as given, for a caller that quantizes q per chunk
  (`quantize.quantize_rows` is row-local)."""
  b, s, _h, _d = q.shape
  n = k.shape[1]
  qlp, qscale = _quantize_operand(q, quant if quantize_q else None, operands, quantizer, interpret)
  klp, kscale = _quantize_operand(k, quant, operands, quantizer, interpret)
  w_eff = w.astype(jnp.float32) * (1.0 if qscale is None else qscale)
  if kscale is None:
    kscale = jnp.ones((b, n), jnp.float32)
  qseg, kseg = reference.split_segment_ids(segment_ids, b, s, n, ratio)
  kend = reference.entry_ends(entry_end, b, n, ratio)
  n_pad = max(_next_pow2(n), block_k)
  pad_n = ((0, 0), (0, n_pad - n))
  klp = jnp.pad(klp, pad_n + ((0, 0),))
  return (qlp, w_eff, klp, jnp.pad(kscale, pad_n), qseg, jnp.pad(kseg, pad_n, constant_values=-1),
          jnp.pad(kend, pad_n, constant_values=NEVER))


def default_chunk(s: int, n: int, block_q: int, b: int = 1) -> int:
  """Query rows per chunk: the most (a power of two in [1024, 8192]) whose fp32 score row-block
  [B, chunk, N_pad] fits SCORE_BLOCK_BYTES; at most S rounded up to block_q. (Past the floor, at
  B * N_pad > 2^16, the block is B * 1024 rows and exceeds the budget.)

  128K keeps 2048 rows (256 MiB); shorter sequences get fewer, larger launches: on the H200 (bf16 QK)
  8192 rows instead of 2048 raised the score kernels from 49% to 58% of the bf16 rate at S = 8K
  (one launch instead of four, three of them small) and from 67% to 70% at 32K. The 8192 cap bounds
  a quantized chunk's bf16 q operand (8192 x H x D)."""
  fit = SCORE_BLOCK_BYTES // (4 * max(b, 1) * _next_pow2(max(n, 1)))
  rows = max(1024, min(8192, 1 << max(fit.bit_length() - 1, 0)))
  return _round_up(min(rows, _round_up(s, block_q)), block_q)


def chunk_width(c0: int, chunk: int, ratio: int, n: int, block_k: int) -> int:
  """Static score-row width for queries [c0, c0 + chunk): the visible prefix rounded up to a power
  of two (>= block_k), so early chunks neither compute nor scan entries that no row can see."""
  return max(block_k, _next_pow2(max(1, min((c0 + chunk) // ratio, n))))


def indexer_topk(q: Float[Array, "B S H D"], w: Float[Array, "B S H"], k: Float[Array, "B N D"],
                 topk: int, ratio: int, segment_ids: reference.SegmentIds = None,
                 quant: str | None = None, *, entry_end: Int[Array, "B N"] | None = None,
                 score_dtype=jnp.float32, interpret: bool = False, chunk: int | None = None,
                 block_q: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 3,
                 operands: str = "e4m3", quantizer: str = "triton", heads_per_step: int | None = None,
                 select_elems: int = 16384, scores_call=None
                 ) -> tuple[Int[Array, "B S topk"], Float[Array, "B S topk"]]:
  """Top-k visible entries per query by the two-kernel pipeline above; see `reference.indexer_topk`.

  Within a row, indices come in increasing entry order (not score order); -1 / -inf pad the rest.
  Chunks are grouped by their static visible width (`chunk_width`); each group is one `lax.map`,
  so one chunk's score row-block is in flight at a time; `chunk=None` picks `default_chunk`.
  `operands` (quantized modes only; the same E4M3 values in each):
    "e4m3" (default): E4M3 in memory, Triton's FP8 tensor-core dot, accumulating natively over each
        head's D products (`fp8_accumulation`: DeepSeek's promotion interval of 128; the other two
        accumulate in fp32, a selection may differ in a near-tie: 99.99% of the picks agree). On the
        H200 with 2 heads per step: 68% / 82% of the FP8 rate at S = 8K / 32K.
    "bf16": the quantized values are written as bf16 (exact) and the score kernel is the bf16 one:
        46% / 57% of the FP8 rate (60% / 74% of the bf16 rate).
    "e4m3_widen": E4M3 in memory, widened to bf16 in registers before each dot (slowest).
  `heads_per_step`: None picks 2 for "e4m3" (0.209 against 0.226 ms at 8K) and 1 otherwise (2 was
  slower with bf16 dots, 0.36 against 0.31 ms).
  `quantizer`: "triton" (default) quantizes q and k in one fused pass per operand (`quantize_triton`,
  the same values; on the H200 the XLA quantizer took 1.6 / 7.3 ms of 9 / 15 ms at S = 32K for fp8 /
  mxfp4); "xla" runs `quantize.quantize_rows`. Only the XLA quantizer turns a row block holding inf or
  NaN into NaN operands; the Triton one assumes finite q and k.
  `entry_end` / `score_dtype`: see `reference.indexer_topk`; with bf16 scores, ties (frequent) are
  broken by lower index, as lax.top_k does. `scores_call`: another score kernel with `_scores_call`'s
  contract (the Mosaic GPU backend passes its own); None is this module's.
  """
  reference.check_inputs(q, w, k, topk, ratio)
  quantize.check_quant(quant)
  b, s, h, d = q.shape
  n = k.shape[1]
  if heads_per_step is None:
    heads_per_step = 2 if quant is not None and operands == "e4m3" else 1
  for name, v in (("H", h), ("D", d), ("block_q", block_q), ("block_k", block_k),
                  ("heads_per_step", heads_per_step)):
    if v < 1 or v & (v - 1):
      raise ValueError(f"triton indexer: {name}={v} must be a power of two")
  if operands not in OPERANDS:
    raise ValueError(f"triton indexer: operands must be one of {OPERANDS}, got {operands!r}")
  if quantizer not in ("triton", "xla"):
    raise ValueError(f"triton indexer: quantizer must be 'triton' or 'xla', got {quantizer!r}")
  # quantized modes quantize q inside each chunk's step (the XLA quantizer Q_QUANT_PIECE rows at a time):
  # the whole-q prologue held fp32 copies of q (rotation, scales), 5.7 / 12.5 GiB at 128K (session 2)
  q_per_chunk = quant is not None
  qlp, w_eff, klp, kscale, qseg, kseg, kend = _prepare(q, w, k, ratio, segment_ids, quant, block_k,
                                                       entry_end, quantize_q=not q_per_chunk,
                                                       operands=operands, quantizer=quantizer,
                                                       interpret=interpret)
  chunk = default_chunk(s, n, block_q, b) if chunk is None else chunk
  chunk = _round_up(min(chunk, _round_up(s, block_q)), block_q)
  s_pad = _round_up(s, chunk)
  if s_pad != s:  # (no copy of q when S is a multiple of the chunk)
    pad_s = ((0, 0), (0, s_pad - s))
    qlp = jnp.pad(qlp, pad_s + ((0, 0), (0, 0)))
    w_eff = jnp.pad(w_eff, pad_s + ((0, 0),))
    qseg = jnp.pad(qseg, pad_s, constant_values=-2)

  def one_chunk(width, c0):
    c0_arr = c0[None].astype(jnp.int32)
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, c0, chunk, axis=1)
    q_c, w_c = sl(qlp), sl(w_eff)
    if q_per_chunk:  # [B, C, H, D] -> low precision + row scales [B, C, H], folded into the weights
      q_c, q_scale = _quantize_q_chunk(q_c, quant, operands, quantizer=quantizer,
                                       interpret=interpret)
      w_c = w_c * q_scale
    scores = (scores_call or _scores_call)(c0_arr, q_c, w_c, klp, kscale, sl(qseg), kseg, kend,
                          ratio=ratio, n_valid=n, block_q=block_q, block_k=block_k,
                          num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                          width=width, widen=operands == "e4m3_widen",
                          score_dtype=score_dtype, heads_per_step=heads_per_step)  # [B, C, width]
    return _select_call(c0_arr, scores, topk=topk, ratio=ratio, n_valid=n, interpret=interpret,
                        select_elems=select_elems)

  groups: dict[int, list[int]] = {}
  for c0 in range(0, s_pad, chunk):
    groups.setdefault(chunk_width(c0, chunk, ratio, n, block_k), []).append(c0)
  outs = [jax.lax.map(functools.partial(one_chunk, width), jnp.asarray(c0s, jnp.int32))
          for width, c0s in groups.items()]  # each [nC_g, B, C, topk_pad]
  idx = jnp.concatenate([o[0] for o in outs], axis=0)
  vals = jnp.concatenate([o[1] for o in outs], axis=0)
  idx = jnp.moveaxis(idx, 0, 1).reshape(b, s_pad, -1)[:, :s, :topk]
  vals = jnp.moveaxis(vals, 0, 1).reshape(b, s_pad, -1)[:, :s, :topk]
  return idx, vals
