"""`quantize` (array -> QArray) and `dequantize` (QArray -> array), for every format in formats.py.

Blocks run along `axis` (default last): the axis must be a multiple of the block size, or `quantize`
raises a one-line ValueError. 2-D block formats tile the last two axes and need `axis=-1`. All
arithmetic is float32 whatever the input dtype (bf16, fp16, fp32); `dequantize` returns the input's
shape and dtype.

Scale rules (spec/dsv4.md 7.2, spec/anchors.md C4/C5), with amax the block's max |x| floored at
`fmt.amax_floor` (so an all-zero block gets the floor's scale):
  * E8M0, "ceil" (DeepSeek): s = 2**ceil(log2(amax / qmax));  "floor" (OCP MX): s = 2**(floor(log2 amax) - emax).
    Exponents are exact integer bit arithmetic (e8m0.py) and clamped to [-126, 127].
  * FP32 (DeepSeek FP8 default): s = amax / qmax.
  * NVFP4: g = global_amax / (448 * 6) (1 if the tensor is all zero); block scale
    sb = float8_e4m3fn(amax / 6 / g) (round to nearest even); effective scale s = float32(sb) * g;
    a block whose sb underflows to 0 quantizes to zeros.
Elements: y = x / s, then E2M1 round-to-nearest-even with saturation at 6 (e2m1.py), or
clip(y, -448, 448) cast to float8_e4m3fn (XLA's convert, round to nearest even).

Non-finite input: a block containing inf or NaN gets the NaN scale (E8M0 byte 255 or a NaN float scale,
and for NVFP4 a NaN per-tensor scale), so it dequantizes to all-NaN: corruption stays visible instead
of being silently clipped. Dequantizing values within about 2x of the float32 max can overflow to inf.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from v4jax.quant import e2m1, e8m0
from v4jax.quant.formats import ELEMENT_EMAX, QuantFormat, get_format
from v4jax.quant.qarray import QArray


class BlockScales(NamedTuple):
    """What the quantizer derives per block (blocked layout [..., M/bm, K/bk])."""

    stored: jax.Array  # the scales as kept in the QArray
    global_scale: jax.Array | None  # NVFP4 per-tensor scale
    effective: jax.Array  # float32 scale multiplying the elements (NaN for non-finite blocks)


def normalize_axis(axis: int, ndim: int, fmt: QuantFormat) -> int:
    """Checks `axis` against the array rank and the format's block shape; returns it as a non-negative int."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"quant: axis {axis} is out of range for an array of rank {ndim}")
    axis = axis % ndim
    if fmt.is_2d and (ndim < 2 or axis != ndim - 1):
        raise ValueError(f"quant: {fmt.name} has 2-D blocks {fmt.block}; they tile the last two axes, so axis must be -1")
    return axis


def to_blocked_layout(x: jax.Array, axis: int, fmt: QuantFormat) -> jax.Array:
    """Moves `axis` last and makes the array at least 2-D ([..., M, K]); checks block divisibility."""
    xm = jnp.moveaxis(x, axis, -1)
    if xm.ndim == 1:
        xm = xm[None]
    bm, bk = fmt.block
    if xm.shape[-1] % bk:
        raise ValueError(f"quant: axis {axis} has size {xm.shape[-1]}, not a multiple of the {fmt.name} block {bk}")
    if xm.shape[-2] % bm:
        raise ValueError(f"quant: axis {xm.ndim - 2} has size {xm.shape[-2]}, not a multiple of the {fmt.name} block {bm}")
    return xm


def from_blocked_layout(a: jax.Array, axis: int, ndim: int) -> jax.Array:
    """Inverse of `to_blocked_layout` for a blocked-layout result (values or scales)."""
    if ndim == 1:
        a = a[0]
    return jnp.moveaxis(a, -1, axis)


def block_view(xm: jax.Array, block: tuple[int, int]) -> jax.Array:
    """[..., M, K] -> [..., M/bm, bm, K/bk, bk]."""
    bm, bk = block
    *lead, m, k = xm.shape
    return xm.reshape(*lead, m // bm, bm, k // bk, bk)


def expand_blocks(s: jax.Array) -> jax.Array:
    """Per-block [..., M/bm, K/bk] -> [..., M/bm, 1, K/bk, 1], broadcastable against `block_view`."""
    return s[..., :, None, :, None]


def divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """a / b, correctly rounded. XLA rewrites a division by a broadcast scalar or constant into a multiply
    by its reciprocal, which is off by one ulp for ~20% of inputs and would break bit-exactness with the
    spec's formulas; an optimization barrier around the materialized divisor keeps a true division."""
    b = jnp.broadcast_to(jnp.asarray(b, jnp.float32), jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b)))
    return a / jax.lax.optimization_barrier(b)


def compute_block_scales(xm: Float[Array, "... m k"], fmt: QuantFormat) -> BlockScales:
    """The scales of every block of a blocked-layout float32 array under `fmt`'s rule."""
    amax = jnp.max(jnp.abs(block_view(xm, fmt.block)), axis=(-3, -1))  # [..., M/bm, K/bk]
    nonfinite = ~jnp.isfinite(amax)
    if fmt.scale == "e8m0":
        a = jnp.maximum(jnp.where(nonfinite, 1.0, amax), fmt.amax_floor)
        if fmt.scale_rule == "ceil":
            e = e8m0.ceil_log2(divide(a, fmt.qmax))
        else:
            e = e8m0.floor_log2(a) - ELEMENT_EMAX[fmt.element]
        stored = e8m0.exponent_to_e8m0(e, nonfinite)
        return BlockScales(stored, None, e8m0.e8m0_to_float(stored))
    if fmt.scale == "fp32":
        s = divide(jnp.maximum(amax, fmt.amax_floor), fmt.qmax)
        s = jnp.where(nonfinite, jnp.nan, s)
        return BlockScales(s, None, s)
    # NVFP4: E4M3 block scales under an FP32 per-tensor scale.
    gamax = jnp.max(jnp.abs(xm))
    g = jnp.where(gamax > 0, divide(gamax, 448.0 * fmt.qmax), 1.0)
    g = jnp.where(jnp.isfinite(gamax), g, jnp.nan).astype(jnp.float32)
    # the barrier keeps two correctly rounded divisions: XLA rewrites (a / b) / c into a / (b * c), which rounds
    # differently (seen: 336.00003 instead of 336, an E4M3 scale of 352 instead of 320)
    per_block = jax.lax.optimization_barrier(divide(jnp.maximum(amax, fmt.amax_floor), fmt.qmax))
    sb = divide(per_block, g).astype(jnp.float8_e4m3fn)
    return BlockScales(sb, g, sb.astype(jnp.float32) * g)


def scale_elements(xm: jax.Array, scales: BlockScales, fmt: QuantFormat) -> jax.Array:
    """y = x / s per block in float32 (0 where the scale is 0), back in the blocked layout [..., M, K]."""
    s = expand_blocks(scales.effective)
    xv = block_view(xm, fmt.block)
    y = jnp.where(s > 0, divide(xv, jnp.where(s > 0, s, 1.0)), 0.0)
    return y.reshape(xm.shape)


@functools.partial(jax.jit, static_argnames=("fmt", "axis"))
def quantize(x: Float[Array, ...], fmt: str | QuantFormat = "mxfp4", *, axis: int = -1) -> QArray:
    """Quantizes `x` into a `QArray` in format `fmt` (a preset name or a QuantFormat), blocks along `axis`.

    Jitted (fmt and axis static) so that eager calls compile once instead of dispatching op by op.
    """
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize: input dtype {x.dtype} is not a floating type")
    axis = normalize_axis(axis, x.ndim, fmt)
    xm = to_blocked_layout(x, axis, fmt).astype(jnp.float32)
    scales = compute_block_scales(xm, fmt)
    y = scale_elements(xm, scales, fmt)
    if fmt.element == "e2m1":
        values = e2m1.pack_nibbles(e2m1.encode_e2m1(y))
    else:
        values = jnp.clip(y, -fmt.qmax, fmt.qmax).astype(jnp.float8_e4m3fn)
    return QArray(
        values=from_blocked_layout(values, axis, x.ndim),
        scales=from_blocked_layout(scales.stored, axis, x.ndim),
        global_scale=scales.global_scale,
        fmt=fmt,
        shape=tuple(x.shape),
        dtype=np.dtype(x.dtype),
        axis=axis,
    )


def effective_scales(q: QArray) -> jax.Array:
    """The float32 scale of every block of `q`, in the QArray's (logical-axis) scale layout."""
    if q.fmt.scale == "e8m0":
        return e8m0.e8m0_to_float(q.scales)
    if q.fmt.scale == "fp32":
        return q.scales.astype(jnp.float32)
    return q.scales.astype(jnp.float32) * q.global_scale


@jax.jit
def dequantize(q: QArray) -> Float[Array, ...]:
    """The QArray's values times their block scales, in its logical shape and dtype."""
    ndim = q.ndim
    vals = jnp.moveaxis(q.values, q.axis, -1)
    if q.fmt.element == "e2m1":
        vals = e2m1.decode_e2m1(e2m1.unpack_nibbles(vals))
    else:
        vals = vals.astype(jnp.float32)
    s = jnp.moveaxis(effective_scales(q), q.axis, -1)
    if ndim == 1:
        vals, s = vals[None], s[None]
    out = (block_view(vals, q.fmt.block) * expand_blocks(s)).reshape(vals.shape)
    return from_blocked_layout(out, q.axis, ndim).astype(q.dtype)


def qarray_from_mxfp4_checkpoint(weight, scale, dtype=jnp.bfloat16) -> QArray:
    """Wraps an upstream DeepSeek FP4 expert tensor as an "mxfp4" QArray without touching its bits.

    weight: int8 or uint8 [..., out, in/2] (element 2i in the low nibble); scale: float8_e8m0fnu or
    uint8 [..., out, in/32]. `dequantize` of the result is the checkpoint's dequantized weight.
    """
    weight, scale = jnp.asarray(weight), jnp.asarray(scale)
    if weight.dtype not in (jnp.int8, jnp.uint8):
        raise ValueError(f"qarray_from_mxfp4_checkpoint: weight dtype {weight.dtype} is not int8/uint8")
    if scale.dtype not in (jnp.uint8, jnp.float8_e8m0fnu):
        raise ValueError(f"qarray_from_mxfp4_checkpoint: scale dtype {scale.dtype} is not float8_e8m0fnu/uint8")
    shape = (*weight.shape[:-1], weight.shape[-1] * 2)
    if scale.shape != (*shape[:-1], shape[-1] // 32):
        raise ValueError(f"qarray_from_mxfp4_checkpoint: scale shape {scale.shape} does not match weight {weight.shape}")
    return QArray(
        values=jax.lax.bitcast_convert_type(weight, jnp.uint8),
        scales=jax.lax.bitcast_convert_type(scale, jnp.uint8),
        global_scale=None,
        fmt=get_format("mxfp4"),
        shape=shape,
        dtype=np.dtype(dtype),
        axis=len(shape) - 1,
    )
