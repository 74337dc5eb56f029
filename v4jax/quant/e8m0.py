"""Exact power-of-two exponents and the E8M0 scale byte, computed with integer bit arithmetic.

A cast to `float8_e8m0fnu` rounds to the *nearest* power of two, which is neither DeepSeek's ceil rule
nor the OCP floor rule, and `log2` in floating point can round a value just above 2**k down to k. So
exponents are read from the float32 bit pattern instead: for a positive normal float32 with biased
exponent field E and mantissa bits M, floor(log2 r) = E - 127 and ceil(log2 r) = E - 127 + (M != 0).

E8M0 scales are stored as uint8 biased exponents: byte b means 2**(b - 127), byte 255 means NaN. Use
`jax.lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)` to view them as ml_dtypes' E8M0 type.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt8

from v4jax.quant.formats import E8M0_MAX_EXPONENT, E8M0_MIN_EXPONENT

E8M0_NAN = 255


def _exponent_and_mantissa_bits(r: Float[Array, ...]) -> tuple[Int[Array, ...], Int[Array, ...]]:
    bits = jax.lax.bitcast_convert_type(r.astype(jnp.float32), jnp.int32)
    return (bits >> 23) & 0xFF, bits & 0x7FFFFF


def floor_log2(r: Float[Array, ...]) -> Int[Array, ...]:
    """floor(log2 r) exactly, for positive normal float32 r (subnormals read as -127)."""
    exp_field, _ = _exponent_and_mantissa_bits(r)
    return exp_field - 127


def ceil_log2(r: Float[Array, ...]) -> Int[Array, ...]:
    """ceil(log2 r) exactly, for positive normal float32 r."""
    exp_field, mantissa = _exponent_and_mantissa_bits(r)
    return exp_field - 127 + (mantissa != 0).astype(jnp.int32)


def pow2(e: Int[Array, ...]) -> Float[Array, ...]:
    """2**e as float32 for integer e in [-126, 127], built from the bit pattern (exact, no exp2 rounding)."""
    return jax.lax.bitcast_convert_type(((e + 127) << 23).astype(jnp.int32), jnp.float32)


def exponent_to_e8m0(e: Int[Array, ...], nonfinite: jax.Array | None = None) -> UInt8[Array, ...]:
    """Clamps e to [-126, 127] and stores it as a biased byte; blocks flagged `nonfinite` get the NaN byte."""
    byte = jnp.clip(e, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT) + 127
    if nonfinite is not None:
        byte = jnp.where(nonfinite, E8M0_NAN, byte)
    return byte.astype(jnp.uint8)


def e8m0_to_float(byte: UInt8[Array, ...]) -> Float[Array, ...]:
    """Decodes E8M0 bytes to float32: 2**(b - 127); byte 0 is 2**-127 (a float32 subnormal), 255 is NaN."""
    b = byte.astype(jnp.int32)
    bits = jnp.where(b == 0, 0x00400000, b << 23)
    bits = jnp.where(b == E8M0_NAN, 0x7FC00000, bits)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)
