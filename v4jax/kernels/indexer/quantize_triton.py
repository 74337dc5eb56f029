"""The indexer's QK quantizer as one Pallas-Triton pass over the rows (GPU; interpret mode on CPU).

Why a kernel: `quantize.quantize_rows` is XLA code built from `v4jax.quant`, whose exact divisions
(optimization barriers around materialized divisors) and Hadamard butterfly stages are separate
memory passes over fp32 copies. On the H200 at S = 32K that prologue took 1.6 ms (fp8) and 7.3 ms
(mxfp4, 11 passes over q) of a 9-15 ms pipeline, where one read of q and one write of the operands
take about 0.3 ms. Here each program holds a block of rows in registers and writes the operands once.

Same numbers as `quantize.quantize_rows` (then `quantize.e4m3_as_bf16` for bf16 output):
  * "fp8": row amax floored at 1e-4, s = amax / 448, E4M3(clip(x / s, +-448)) (IEEE divisions,
    round to nearest even): bit-identical.
  * "mxfp4": Hadamard rotation as a dot with the +-1 Sylvester matrix (products exact, fp32
    accumulation) times D^-0.5, then per 32-block E8M0 scale 2^ceil(log2(amax / 6)), E2M1
    round-to-nearest-even by the same midpoint comparisons as `v4jax.quant.e2m1`, values divided by
    the row's largest block scale and rounded to E4M3. Two differences are possible: the dot sums in
    another order than the butterfly, so a rotated value may differ in its last bit (and, sitting on
    an E2M1 midpoint, round to the neighbouring code); and an exact zero the rotation produces from
    negative zeros is +0 here where the butterfly may give -0 (the same value). On the H200 the
    benchmark found no differing value on any of its inputs (`experiments/benchmarks/indexer.py`).
Inputs are assumed finite: the XLA quantizer makes a block with inf or NaN all NaN; this kernel does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from v4jax import quant as vq
from v4jax.quant import e2m1, e8m0

# the formats' own constants (`v4jax.quant.formats`), so the kernel cannot drift from the XLA quantizer
_FP8, _MX = vq.get_format("fp8"), vq.get_format("mxfp4")
FP8_MAX, FP8_AMAX_FLOOR = _FP8.qmax, _FP8.amax_floor
E2M1_MAX, MX_BLOCK, MX_AMAX_FLOOR = _MX.qmax, _MX.block[1], _MX.amax_floor


def sylvester_hadamard(n: int) -> np.ndarray:
  """The n x n +-1 Hadamard matrix of the Walsh-Hadamard butterfly in `v4jax.quant.hadamard`."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def _e2m1_round(y):
  """y rounded to nearest-even E2M1 (saturating at 6), as float32, sign bit kept: the XLA quantizer's
  own encode and decode (`v4jax.quant.e2m1`), elementwise ops that lower in the kernel too."""
  return e2m1.decode_e2m1(e2m1.encode_e2m1(y))


def _divide(a, b, interpret: bool):
  """a / b correctly rounded (IEEE), as `v4jax.quant.divide`. Triton lowers an fp32 `/` to the
  approximate div.full.f32 (up to 2 ulp: on the H200 60% of the fp8 row scales differed from the XLA
  quantizer's), so the GPU path issues div.rn.f32 itself. XLA, which runs the kernel in interpret mode,
  turns a division by a constant or a broadcast into a multiply by the reciprocal unless the divisor
  is behind an optimization barrier."""
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
  a = jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape)
  b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), shape)
  if interpret:
    return a / jax.lax.optimization_barrier(b)
  bits = lambda v: jax.lax.bitcast_convert_type(v, jnp.int32)
  q = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[bits(a), bits(b)],
                                   constraints="=r,r,r", pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.int32)])[0]
  return jax.lax.bitcast_convert_type(q, jnp.float32)


def _fp8_rows_kernel(x_ref, v_ref, s_ref, *, interpret: bool):
  x = x_ref[...].astype(jnp.float32)  # [R, D]
  s = _divide(jnp.maximum(jnp.max(jnp.abs(x), axis=1), FP8_AMAX_FLOOR), FP8_MAX, interpret)  # [R]
  y = jnp.clip(_divide(x, s[:, None], interpret), -FP8_MAX, FP8_MAX)
  v_ref[...] = y.astype(jnp.float8_e4m3fn).astype(v_ref.dtype)
  s_ref[...] = s


def _mxfp4_rows_kernel(x_ref, h_ref, v_ref, s_ref, *, exact_fp32: bool, interpret: bool):
  x = x_ref[...]  # [R, D]
  d = x.shape[1]
  y = plgpu.dot(x, h_ref[...], allow_tf32=not exact_fp32) * np.float32(d**-0.5)  # [R, D] fp32
  mag = jnp.abs(y)
  block = jax.lax.broadcasted_iota(jnp.int32, y.shape, 1) // MX_BLOCK
  e_elem = jnp.zeros(y.shape, jnp.int32)
  e_row = None
  for b in range(d // MX_BLOCK):  # per 32-block exponent, broadcast back over its columns
    amax = jnp.max(jnp.where(block == b, mag, 0.0), axis=1)  # [R]
    e_b = e8m0.ceil_log2(_divide(jnp.maximum(amax, MX_AMAX_FLOOR), E2M1_MAX, interpret))
    e_elem = jnp.where(block == b, e_b[:, None], e_elem)
    e_row = e_b if e_row is None else jnp.maximum(e_row, e_b)
  r = _e2m1_round(y * e8m0.pow2(-e_elem))  # y / 2^e exactly
  # relative to the row's largest block scale, exact; a block 2^127 or more below it (an all-zero block
  # beside a large one) is +-0 in E4M3 anyway, and pow2 covers exponents >= -127 (its bits give 2^-127 -> 0)
  v = r * e8m0.pow2(jnp.maximum(e_elem - e_row[:, None], -127))
  v_ref[...] = v.astype(jnp.float8_e4m3fn).astype(v_ref.dtype)
  s_ref[...] = e8m0.pow2(e_row)


def quantize_rows(x: Float[Array, "*rows D"], quant: str, out_dtype=jnp.bfloat16, *,
                  block_rows: int = 64, interpret: bool = False
                  ) -> tuple[Float[Array, "*rows D"], Float[Array, "*rows"]]:
  """(E4M3 values in `out_dtype` (bf16 or float8_e4m3fn), fp32 row scales) of x's rows: the
  kernel-operand view of `quantize.quantize_rows` in one pass. D: a power of two (>= 32 for mxfp4)."""
  if quant not in ("fp8", "mxfp4"):
    raise ValueError(f"quantize_triton: quant must be 'fp8' or 'mxfp4', got {quant!r}")
  *lead, d = x.shape
  if d < 1 or d & (d - 1) or (quant == "mxfp4" and d < MX_BLOCK):
    raise ValueError(f"quantize_triton: last axis {d} must be a power of two (>= 32 for mxfp4)")
  rows = int(np.prod(lead, dtype=np.int64))
  br = min(block_rows, 1 << max(0, (rows - 1).bit_length()))
  n_blocks = -(-rows // br)
  x2 = x.reshape(rows, d)
  if n_blocks * br != rows:
    x2 = jnp.pad(x2, ((0, n_blocks * br - rows), (0, 0)))
  row_spec = pl.BlockSpec((br, d), lambda i: (i, 0))
  operands, in_specs = [x2], [row_spec]
  if quant == "mxfp4":
    exact_fp32 = x.dtype == jnp.float32
    h_dtype = jnp.float32 if exact_fp32 else jnp.bfloat16
    if x.dtype not in (jnp.float32, jnp.bfloat16):
      x2 = x2.astype(jnp.float32)
      operands[0], exact_fp32, h_dtype = x2, True, jnp.float32
    operands.append(jnp.asarray(sylvester_hadamard(d), h_dtype))
    in_specs.append(pl.BlockSpec((d, d), lambda i: (0, 0)))
    kernel = functools.partial(_mxfp4_rows_kernel, exact_fp32=exact_fp32, interpret=interpret)
  else:
    kernel = functools.partial(_fp8_rows_kernel, interpret=interpret)
  values, scales = pl.pallas_call(
      kernel,
      grid=(n_blocks,),
      in_specs=in_specs,
      out_specs=[row_spec, pl.BlockSpec((br,), lambda i: (i,))],
      out_shape=[jax.ShapeDtypeStruct((n_blocks * br, d), out_dtype),
                 jax.ShapeDtypeStruct((n_blocks * br,), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name=f"indexer_quantize_{quant}",
  )(*operands)
  return values[:rows].reshape(*lead, d), scales[:rows].reshape(lead)
