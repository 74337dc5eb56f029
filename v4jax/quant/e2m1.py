"""FP4 E2M1 elements: explicit round-to-nearest-even, nibble codes, packing two per byte.

E2M1 magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}. A nibble code is `sign << 3 | magnitude_index`, so
the decode table is the checkpoint LUT `[0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]`
(spec/hf_reference.md section 5). Rounding is done with explicit comparisons against the midpoints,
not with a cast, so it is the same on every backend: a tie goes to the even code (codes 0, 2, 4, 6,
i.e. magnitudes 0, 1, 2, 4), and anything above 6 saturates to 6. Negative values keep their sign
bit even when they round to zero (-0 is code 8), as ml_dtypes' `float4_e2m1fn` cast does. NaN encodes
as code 0; callers mark such blocks through the scale (see quantize.py).

Packing runs along the last axis: byte i holds element 2i in the LOW nibble and 2i+1 in the high one.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, UInt8

from v4jax.quant.e8m0 import pow2

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_LUT = E2M1_VALUES + tuple(-v for v in E2M1_VALUES)

# (midpoint between magnitude codes k and k+1, whether a tie rounds up to k+1 because k+1 is even)
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def encode_e2m1(y: Float[Array, ...]) -> UInt8[Array, ...]:
    """Rounds float32 `y` to nearest-even E2M1 (saturating at +-6) and returns nibble codes 0..15 as uint8."""
    y = y.astype(jnp.float32)
    mag = jnp.abs(y)
    index = jnp.zeros(y.shape, jnp.uint8)
    for mid, tie_up in _MIDPOINTS:
        index = index + (mag >= mid if tie_up else mag > mid).astype(jnp.uint8)
    sign = jnp.signbit(y).astype(jnp.uint8)
    return index | (sign << 3)


def decode_e2m1(codes: UInt8[Array, ...]) -> Float[Array, ...]:
    """Nibble codes (0..15) to float32, the values of E2M1_LUT.

    Decoded arithmetically (exponent e = bits 1-2, mantissa m = bit 0: m/2 if e == 0 else
    2**(e-1) * (1 + m/2)) rather than by a table gather, which stays elementwise, so it keeps any
    sharding of `codes` (a gather from an unsharded table does not under explicit sharding).
    """
    c = codes.astype(jnp.int32)
    e, m = (c >> 1) & 3, (c & 1).astype(jnp.float32)
    normal = pow2(e - 1) * (1.0 + 0.5 * m)  # exact powers of two from the bit pattern
    mag = jnp.where(e == 0, 0.5 * m, normal)
    return jnp.where((c & 8) != 0, -mag, mag)


def pack_nibbles(codes: UInt8[Array, "... k"]) -> UInt8[Array, "... k_half"]:
    """Packs codes along the last axis (even length): element 2i -> low nibble, 2i+1 -> high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles: last axis has odd size {codes.shape[-1]}")
    pairs = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)


def unpack_nibbles(packed: UInt8[Array, "... k_half"]) -> UInt8[Array, "... k"]:
    """Inverse of `pack_nibbles`: [..., K/2] bytes -> [..., K] codes."""
    packed = packed.astype(jnp.uint8)
    pairs = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
