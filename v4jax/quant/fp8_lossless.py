"""MXFP4 -> FP8 E4M3 with 128x128 block scales, and the test of when that conversion is lossless.

DeepSeek-V4's expert QAT (spec/dsv4.md 7.3) quantizes FP32 master weights to FP4 (1x32 blocks, E8M0
scales) and then dequantizes them *losslessly* into the FP8 E4M3 format with 128x128 block scales that
the existing FP8 GEMMs consume. With the FP8 block scale S = s_max * 2**-6 (s_max the largest 1x32
scale in the 128x128 block), an FP4 value v * s (v in {0.5, 1, ..., 6}) becomes v * 2**(6 - d) in FP8
units, d = log2(s_max / s) >= 0; its largest value 6 * 2**6 = 384 <= 448, and all of them are exact in
E4M3 iff d <= 14 (E4M3 subnormals reach 2**-9) or d <= 11 if only normal FP8 values are allowed.
`lossless_blocks` applies that DERIVED rule to the 1x32 scales; 1x32 sub-blocks whose values are all
zero are left out of s_min (they convert to exact zeros whatever their scale), and a block holding a
NaN scale is never lossless. `mxfp4_to_fp8` does the conversion and also reports, per block, whether
it was exact, which the rule must imply.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from v4jax.quant import e2m1, e8m0
from v4jax.quant.formats import E8M0_MAX_EXPONENT, E8M0_MIN_EXPONENT
from v4jax.quant.qarray import QArray

FP8_BLOCK = 128
SUB_BLOCK = 32
MAX_EXPONENT_GAP = {True: 14, False: 11}  # keyed by allow_subnormals


class Fp8Blocks(NamedTuple):
    """An FP8 E4M3 weight with one power-of-two scale per 128x128 block (E8M0 bytes)."""

    values: jax.Array  # float8_e4m3fn [..., N, K]
    scales: jax.Array  # uint8 E8M0 [..., N/128, K/128]
    exact: jax.Array  # bool [..., N/128, K/128]: every FP4 value of the block was represented exactly


def _check(q: QArray) -> None:
    if q.fmt.element != "e2m1" or q.fmt.scale != "e8m0" or q.fmt.block != (1, SUB_BLOCK):
        raise ValueError(f"fp8_lossless: needs an MXFP4 QArray (e2m1, e8m0, 1x32), got {q.fmt.name}")
    if q.ndim < 2 or q.axis != q.ndim - 1:
        raise ValueError("fp8_lossless: the QArray must be a weight [..., N, K] quantized along its last axis")
    n, k = q.shape[-2:]
    if n % FP8_BLOCK or k % FP8_BLOCK:
        raise ValueError(f"fp8_lossless: weight dims {(n, k)} are not multiples of {FP8_BLOCK}")


def _by_fp8_block(a: jax.Array) -> jax.Array:
    """Per-sub-block [..., N, K/32] -> [..., N/128, 128, K/128, 4]."""
    *lead, n, kb = a.shape
    return a.reshape(*lead, n // FP8_BLOCK, FP8_BLOCK, kb // (FP8_BLOCK // SUB_BLOCK), FP8_BLOCK // SUB_BLOCK)


def _sub_block_exponents(q: QArray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scale exponents, non-NaN flags and has-a-nonzero-value flags of every 1x32 sub-block, [..., N, K/32]."""
    exps = q.scales.astype(jnp.int32) - 127
    finite = q.scales != e8m0.E8M0_NAN
    codes = e2m1.unpack_nibbles(q.values)  # [..., N, K]
    nonzero = jnp.any((codes & 7).reshape(*codes.shape[:-1], -1, SUB_BLOCK) != 0, axis=-1)
    return exps, finite, nonzero


@functools.partial(jax.jit, static_argnames=("allow_subnormals",))
def lossless_blocks(q: QArray, *, allow_subnormals: bool = True) -> Bool[Array, "... nb kb"]:
    """Per 128x128 block: do the 1x32 scales satisfy s_max / s_min <= 2**14 (2**11 without FP8 subnormals)?"""
    _check(q)
    exps, finite, nonzero = _sub_block_exponents(q)
    e_max = jnp.max(_by_fp8_block(exps), axis=(-3, -1))
    e_min = jnp.min(_by_fp8_block(jnp.where(nonzero, exps, E8M0_MAX_EXPONENT)), axis=(-3, -1))
    all_finite = jnp.all(_by_fp8_block(finite), axis=(-3, -1))
    return all_finite & (e_max - e_min <= MAX_EXPONENT_GAP[allow_subnormals])


@functools.partial(jax.jit, static_argnames=("allow_subnormals",))
def lossless_fraction(q: QArray, *, allow_subnormals: bool = True) -> Float[Array, ""]:
    """Fraction of the 128x128 blocks of an MXFP4 weight that convert to FP8 losslessly (spec 7.3 rule)."""
    return jnp.mean(lossless_blocks(q, allow_subnormals=allow_subnormals).astype(jnp.float32))


@jax.jit
def mxfp4_to_fp8(q: QArray) -> Fp8Blocks:
    """Converts an MXFP4 weight to FP8 E4M3 values with 128x128 power-of-two block scales S = s_max * 2**-6.

    Each element is computed as e2m1_value * 2**(e_sub - e_S) with integer exponents, then cast to E4M3
    (round to nearest even), so dequantized FP8 = values * S equals the FP4 weight wherever `exact`.
    """
    _check(q)
    exps, _, _ = _sub_block_exponents(q)
    e_max = jnp.max(_by_fp8_block(exps), axis=(-3, -1))  # [..., N/128, K/128]
    e_block = jnp.clip(e_max - 6, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    shift = jnp.clip(_by_fp8_block(exps) - e_block[..., :, None, :, None], E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    shift = shift.reshape(exps.shape)  # [..., N, K/32]
    vals = e2m1.decode_e2m1(e2m1.unpack_nibbles(q.values))  # [..., N, K]
    vals = vals.reshape(*exps.shape, SUB_BLOCK) * e8m0.pow2(shift)[..., None]  # [..., N, K/32, 32]
    fp8 = vals.astype(jnp.float8_e4m3fn)
    same = (fp8.astype(jnp.float32) == vals) | jnp.isnan(vals)
    exact = jnp.all(_by_fp8_block(jnp.all(same, axis=-1)), axis=(-3, -1))
    return Fp8Blocks(fp8.reshape(q.shape), e8m0.exponent_to_e8m0(e_block), exact)
