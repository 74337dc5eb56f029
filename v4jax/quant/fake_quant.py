"""`fake_quant`: quantize -> dequantize in the forward pass, a straight-through estimator (STE) backward.

A `jax.custom_vjp`, so the backward rule is deliberate rather than whatever the casts' JVPs happen to be.
It works under jit, vmap, lax.scan and jax.checkpoint (remat), and returns the input's dtype.

Backward (g is the incoming cotangent):
  * ste="plain":   dx = g                                 (the straight-through definition);
  * ste="clipped": dx = g * (|x / s| <= qmax)             where s is x's block scale and qmax is 6 (FP4)
    or 448 (FP8): zero gradient exactly where the quantizer's clip changed the value. For power-of-two
    scales this is |x| <= qmax * s. DeepSeek's ceil rule never clips, so there it equals "plain"; the
    OCP rule (values in (6, 8)·X) and NVFP4 (E4M3-rounded block scales) do clip.
  * stochastic rounding (when `stochastic_rounding_key` is given) is applied to the gradient that
    leaves the op, after the STE: with `grad_format=None` dx is rounded stochastically to bfloat16
    (add 16 random low bits to the float32 pattern, truncate); with a format (e.g. "mxfp4", "fp8")
    dx gets that format's block scales along the same axis and its elements are rounded
    stochastically onto the E2M1 / E4M3 grid, as TE's NVFP4 recipe does for gradients. Both are
    unbiased (E[dx_rounded] = dx), except for elements beyond qmax·s, which saturate (OCP/NVFP4 only).
    The key is an ordinary (non-differentiated) input: pass a fresh key per step and per call site.
    NaN/inf gradients pass through unchanged in bfloat16 mode and make their block NaN in format mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from v4jax.quant import e8m0
from v4jax.quant.formats import (
    ELEMENT_EMIN,
    ELEMENT_MANTISSA_BITS,
    QuantFormat,
    get_format,
)
from v4jax.quant.quantize import (
    block_view,
    compute_block_scales,
    dequantize,
    expand_blocks,
    from_blocked_layout,
    normalize_axis,
    quantize,
    scale_elements,
    to_blocked_layout,
)

STE_MODES = ("plain", "clipped")


def not_saturated(x: Float[Array, ...], fmt: QuantFormat, axis: int) -> jax.Array:
    """Boolean mask, x's shape: True where |x / s| <= qmax, i.e. where the quantizer does not clip."""
    xm = to_blocked_layout(x, axis, fmt).astype(jnp.float32)
    y = scale_elements(xm, compute_block_scales(xm, fmt), fmt)
    return from_blocked_layout(jnp.abs(y) <= fmt.qmax, axis, x.ndim)


def stochastic_round_bf16(g: Float[Array, ...], key: jax.Array) -> Float[Array, ...]:
    """Unbiased stochastic rounding of float32 values to bfloat16-representable float32 values."""
    g32 = g.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(g32, jnp.uint32)
    noise = jax.random.bits(key, g32.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isfinite(g32), rounded, g32)


def stochastic_round_to_grid(y: Float[Array, ...], key: jax.Array, fmt: QuantFormat) -> Float[Array, ...]:
    """Rounds scaled values y (float32) stochastically onto the element grid of `fmt` (E2M1 or E4M3).

    The grid spacing at |y| is 2**(max(floor(log2 |y|), emin) - mantissa_bits); |y| is first clipped to qmax.
    """
    a = jnp.minimum(jnp.abs(y), fmt.qmax)
    e = jnp.maximum(e8m0.floor_log2(a), ELEMENT_EMIN[fmt.element])
    spacing = e8m0.pow2(e - ELEMENT_MANTISSA_BITS[fmt.element])
    low = jnp.floor(a / spacing) * spacing
    up = jax.random.uniform(key, a.shape) < (a - low) / spacing
    return jnp.copysign(low + jnp.where(up, spacing, 0.0), y)


def stochastic_round_gradient(g: jax.Array, key: jax.Array, grad_fmt: QuantFormat | None, axis: int) -> jax.Array:
    """Stochastic rounding of a gradient: to bfloat16 (grad_fmt None) or to `grad_fmt` blocks along `axis`."""
    if grad_fmt is None:
        return stochastic_round_bf16(g, key).astype(g.dtype)
    gm = to_blocked_layout(g, axis, grad_fmt).astype(jnp.float32)
    scales = compute_block_scales(gm, grad_fmt)
    r = stochastic_round_to_grid(scale_elements(gm, scales, grad_fmt), key, grad_fmt)
    out = (block_view(r, grad_fmt.block) * expand_blocks(scales.effective)).reshape(gm.shape)
    return from_blocked_layout(out, axis, g.ndim).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fake_quant(fmt, axis, ste, grad_fmt, x, key):
    return dequantize(quantize(x, fmt, axis=axis))


def _fake_quant_fwd(fmt, axis, ste, grad_fmt, x, key):
    y = dequantize(quantize(x, fmt, axis=axis))
    mask = not_saturated(x, fmt, axis) if ste == "clipped" else None
    return y, (mask, key)


def _fake_quant_bwd(fmt, axis, ste, grad_fmt, residuals, g):
    mask, key = residuals
    if mask is not None:
        g = jnp.where(mask, g, jnp.zeros_like(g))
    if key is not None:
        g = stochastic_round_gradient(g, key, grad_fmt, axis)
    return g, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@functools.partial(jax.jit, static_argnames=("fmt", "axis", "ste", "grad_format"))
def fake_quant(
    x: Float[Array, ...],
    fmt: str | QuantFormat = "mxfp4",
    *,
    axis: int = -1,
    ste: str = "plain",
    stochastic_rounding_key: jax.Array | None = None,
    grad_format: str | QuantFormat | None = None,
) -> Float[Array, ...]:
    """dequantize(quantize(x, fmt, axis)) with an STE backward; see the module docstring for the options.

    Jitted (everything but x and the key static), so eager calls compile once.
    """
    fmt = get_format(fmt)
    if ste not in STE_MODES:
        raise ValueError(f"fake_quant: ste={ste!r} is not one of {STE_MODES}")
    x = jnp.asarray(x)
    axis = normalize_axis(axis, x.ndim, fmt)
    to_blocked_layout(x, axis, fmt)  # shape checks up front, before tracing the custom_vjp
    grad_fmt = None if grad_format is None else get_format(grad_format)
    if grad_fmt is not None:
        if stochastic_rounding_key is None:
            raise ValueError("fake_quant: grad_format needs a stochastic_rounding_key")
        normalize_axis(axis, x.ndim, grad_fmt)
        to_blocked_layout(x, axis, grad_fmt)
    return _fake_quant(fmt, axis, ste, grad_fmt, x, stochastic_rounding_key)


def round_to_dtype(x: Float[Array, ...], dtype=jnp.bfloat16) -> Float[Array, ...]:
    """x rounded to `dtype` (nearest even) and returned in x's dtype; the convert's gradient is the identity.

    Used for the index scores, which DeepSeek-V4 casts from FP32 to BF16 before top-k (spec/dsv4.md 7.1).
    """
    return x.astype(dtype).astype(x.dtype)
