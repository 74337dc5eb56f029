"""QK quantisation for the lightning indexer: the "fp8" and "mxfp4" modes.

Kept local (and small) until `v4jax.quant` lands; the semantics follow the brief and spec/dsv4.md 7.4:
  * "fp8":   E4M3 with one fp32 scale per 128-wide row (amax / 448), no rotation.
  * "mxfp4": orthonormal 128-point Hadamard rotation of q and k, then MXFP4 fake-quant: 1x32 blocks
             along D, E8M0 power-of-two scales 2**ceil(log2(amax / 6)), round-to-nearest-even, saturate
             at 6.
Two views of the same numbers are produced:
  * `fake_quant_qk` gives the dequantised fp32 values (what the XLA reference multiplies);
  * `kernel_operands` gives FP8 tensors plus one positive fp32 scale per row, so that a kernel can run
    the QK product on FP8 tensor cores and apply the scales after the dot. For "mxfp4" every E2M1 value
    times a power of two is exact in E4M3 once divided by the row's largest block scale, as long as the
    row's four block exponents lie within 2**5 of each other; smaller blocks round to E4M3 subnormals
    (their contribution is below 2**-6 of the row's scale).
Positive per-row scales commute with relu: relu(a * s) = s * relu(a), which is what lets the kernel fold
the query scale into the head weight and the key scale into the score column.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

QUANT_MODES = (None, "fp8", "mxfp4")
FP8_MAX = 448.0
FP4_MAX = 6.0
MX_BLOCK = 32


def check_quant(quant: str | None) -> None:
  """One-line error for an unknown quant mode."""
  if quant not in QUANT_MODES:
    raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


@functools.lru_cache(maxsize=8)
def _hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester-Hadamard matrix of size n (a power of two)."""
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / np.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array) -> jax.Array:
  """Rotate the last axis (a power of two) by the orthonormal Hadamard matrix, in fp32."""
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f"hadamard needs a power-of-two last axis, got {d}")
  h = jnp.asarray(_hadamard_matrix(d))
  return jnp.einsum("...d,de->...e", x.astype(jnp.float32), h,  # [..., D]
                    precision=jax.lax.Precision.HIGHEST)


def _pow2_ceil_exponent(x: jax.Array) -> jax.Array:
  """ceil(log2(x)) for x > 0, exactly (frexp, not a float log)."""
  m, e = jnp.frexp(x)
  return jnp.where(m == 0.5, e - 1, e)


def mxfp4_block_exponents(x: jax.Array) -> jax.Array:
  """E8M0 exponents of the 1x32 blocks along the last axis: ceil(log2(amax / 6)); [..., D/32] int32."""
  blocks = x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  return jnp.where(amax > 0, _pow2_ceil_exponent(amax / FP4_MAX), 0).astype(jnp.int32)


def fake_quant_mxfp4(x: jax.Array) -> jax.Array:
  """MXFP4 round trip (E2M1 values, E8M0 block scales, RNE, saturating at 6), fp32 out."""
  x = x.astype(jnp.float32)
  if x.shape[-1] % MX_BLOCK:
    raise ValueError(f"mxfp4 needs the last axis to be a multiple of {MX_BLOCK}, got {x.shape[-1]}")
  scale = jnp.ldexp(1.0, mxfp4_block_exponents(x)).astype(jnp.float32)
  blocks = x.reshape(*x.shape[:-1], x.shape[-1] // MX_BLOCK, MX_BLOCK)
  q = jnp.clip(blocks / scale[..., None], -FP4_MAX, FP4_MAX).astype(jnp.float4_e2m1fn)
  return (q.astype(jnp.float32) * scale[..., None]).reshape(x.shape)


def _fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """E4M3 values and one fp32 scale (amax / 448) per row of the last axis."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
  return (x / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def fake_quant_qk(q: jax.Array, k: jax.Array, quant: str | None) -> tuple[jax.Array, jax.Array]:
  """Dequantised q, k (fp32) as the quantised QK product sees them; identity for quant=None."""
  check_quant(quant)
  if quant is None:
    return q, k
  if quant == "fp8":
    (q8, qs), (k8, ks) = _fp8_rows(q), _fp8_rows(k)
    return q8.astype(jnp.float32) * qs[..., None], k8.astype(jnp.float32) * ks[..., None]
  return fake_quant_mxfp4(hadamard(q)), fake_quant_mxfp4(hadamard(k))


def _mxfp4_as_fp8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MXFP4 values re-expressed as E4M3 relative to the row's largest block scale (a power of two)."""
  xq = fake_quant_mxfp4(hadamard(x))
  row_exp = jnp.max(mxfp4_block_exponents(hadamard(x)), axis=-1)
  scale = jnp.ldexp(1.0, row_exp).astype(jnp.float32)
  return (xq / scale[..., None]).astype(jnp.float8_e4m3fn), scale


def kernel_operands(q: jax.Array, k: jax.Array, quant: str | None):
  """(q_lowp, q_scale [B,S,H], k_lowp, k_scale [B,N]) for a kernel; scales are None for quant=None."""
  check_quant(quant)
  if quant is None:
    return q, None, k, None
  rows = _fp8_rows if quant == "fp8" else _mxfp4_as_fp8_rows
  (q8, qs), (k8, ks) = rows(q), rows(k)
  return q8, qs, k8, ks
