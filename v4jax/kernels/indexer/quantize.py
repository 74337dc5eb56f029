"""QK quantisation for the lightning indexer ("fp8" and "mxfp4" modes), on top of `v4jax.quant`.

Semantics (spec/dsv4.md 7.4 and the brief):
  * "fp8":   E4M3 with one fp32 scale per 128-wide row (`v4jax.quant` format "fp8"), no rotation.
  * "mxfp4": orthonormal Hadamard rotation of q and k, then MXFP4 (1x32 blocks along D, E8M0 scales
             2**ceil(log2(amax / 6)), RNE, saturating at 6; format "mxfp4").
Two views of the same numbers:
  * `fake_quant_qk`: the dequantised fp32 values (what the XLA reference multiplies);
  * `quantize_rows`: E4M3 tensors plus one positive fp32 scale per row, so that a kernel runs the QK
    product on FP8 tensor cores and applies the scales after the dot. For "mxfp4", E2M1 values times
    a power of two are exact in E4M3 once divided by the row's largest block scale, as long as the
    row's block exponents lie within 2**5 of each other (smaller blocks round to E4M3 subnormals, a
    contribution below 2**-6 of the row's scale).
Positive per-row scales commute with relu (relu(a * s) = s * relu(a)), which lets the kernel fold the
query scale into the head weight and the key scale into the score column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax import quant as vq

QUANT_MODES = (None, "fp8", "mxfp4")


def check_quant(quant: str | None) -> None:
  """One-line error for an unknown quant mode."""
  if quant not in QUANT_MODES:
    raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _rotate(x: jax.Array) -> jax.Array:
  return vq.hadamard(x.astype(jnp.float32))


def fake_quant_qk(q: jax.Array, k: jax.Array, quant: str | None) -> tuple[jax.Array, jax.Array]:
  """Dequantised q, k (fp32) as the quantised QK product sees them; identity for quant=None."""
  check_quant(quant)
  if quant is None:
    return q, k
  if quant == "fp8":
    return (vq.fake_quant(q.astype(jnp.float32), _fp8_format(q)),
            vq.fake_quant(k.astype(jnp.float32), _fp8_format(k)))
  return vq.fake_quant(_rotate(q), "mxfp4"), vq.fake_quant(_rotate(k), "mxfp4")


def _fp8_format(x: jax.Array):
  """Format "fp8" with one block per row (1x128 at the model's D = 128; 1xD for other test sizes)."""
  return vq.get_format("fp8", block=(1, x.shape[-1]))


def _fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """E4M3 values and their fp32 row scale."""
  qa = vq.quantize(x.astype(jnp.float32), _fp8_format(x))
  return qa.values, vq.effective_scales(qa)[..., 0]


def _mxfp4_as_fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotated MXFP4 values as E4M3 relative to the row's largest block scale (a power of two)."""
  xr = _rotate(x)
  qa = vq.quantize(xr, "mxfp4")
  row_scale = jnp.max(vq.effective_scales(qa), axis=-1)  # [...]
  xq = vq.dequantize(qa).astype(jnp.float32)
  return (xq / row_scale[..., None]).astype(jnp.float8_e4m3fn), row_scale


def quantize_rows(x: jax.Array, quant: str | None) -> tuple[jax.Array, jax.Array | None]:
  """(x_lowp, row scale [...]) of one operand as the kernel reads it; (x, None) for quant=None.
  Row-local, so it can run on any slice of the rows (the Triton indexer quantizes q chunk by chunk)."""
  check_quant(quant)
  if quant is None:
    return x, None
  return (_fp8_rows if quant == "fp8" else _mxfp4_as_fp8_rows)(x)


def e4m3_as_bf16(x: jax.Array) -> jax.Array:
  """E4M3 values widened to bf16, bit-exactly (every finite E4M3 number is a bf16 number).

  Decoded from the bits with integer ops rather than `astype`: XLA:GPU's default
  `xla_allow_excess_precision` may fold convert(convert(f32 -> e4m3) -> bf16) into one f32 -> bf16
  convert, and the operands would silently stop being quantized. The bitcast pins the E4M3 rounding.
  (E4M3FN's NaN byte is never produced by the saturating quantizers here.)
  """
  b = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  sign, exp, man = (b >> 7) & 1, (b >> 3) & 0xF, b & 7
  normal = jax.lax.bitcast_convert_type((sign << 31) | ((exp + 120) << 23) | (man << 20), jnp.float32)
  subnormal = man.astype(jnp.float32) * 2.0**-9 * (1.0 - 2.0 * sign.astype(jnp.float32))  # m * 2^-9, exact
  return jnp.where(exp > 0, normal, subnormal).astype(jnp.bfloat16)  # <= 4 significant bits: exact
