"""Building blocks shared by every V4 module: dtypes, parameters with logical axis names, RMSNorm, dense
layers, and interleaved partial RoPE with YaRN (spec section 4.2, hf_reference section 3.3).

Every parameter is declared with logical axis names (`nn.with_logical_partitioning`); the mapping of
logical to physical mesh axes lives in `v4jax.parallel`, as data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def normal_init(std: float):
    return nn.initializers.normal(stddev=std)


def declare(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None], dtype):
    """A parameter with logical axis names; `axes` has one name per dimension of `shape`."""
    assert len(axes) == len(shape), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def rms_normalize(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """Unweighted RMSNorm in float32 (the per-head query norm and the mHC input norm)."""
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """Weighted RMSNorm `w * x / sqrt(mean(x^2) + eps)`, computed in float32 and cast back once."""

    eps: float
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        w = declare(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,), self.param_dtype)
        return (rms_normalize(x, self.eps) * w.astype(jnp.float32)).astype(x.dtype)


class Dense(nn.Module):
    """`x @ kernel` with kernel [in, out] (PyTorch weights are [out, in]: transposed on import)."""

    features: int
    axes: tuple[str | None, str | None]
    std: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
        kernel = declare(self, "kernel", normal_init(self.std), (x.shape[-1], self.features), self.axes,
                         self.param_dtype)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))  # [..., out]


# ---- rotary embeddings -----------------------------------------------------------------------------

def rope_inv_freq(rope_dim: int, base: float, yarn_factor: float = 0.0, original_max_position: int = 0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """Inverse frequencies of the rope pairs, YaRN-corrected when `yarn_factor > 0` (no mscale, spec 4.2)."""
    inv = 1.0 / (base ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))
    if yarn_factor <= 0:
        return inv.astype(np.float32)

    def corr_dim(rotations: float) -> float:
        return rope_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    inv = inv / yarn_factor * ramp + inv * (1.0 - ramp)
    return inv.astype(np.float32)


def apply_rope(x: Float[Array, "... r"], positions, inv_freq, inverse: bool = False) -> Float[Array, "... r"]:
    """Rotates interleaved pairs (2i, 2i+1) of `x` by `positions * inv_freq` (negated when `inverse`).

    `positions` broadcasts against `x.shape[:-1]` (e.g. [B, S, 1] for x [B, S, H, r]).
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [..., r/2]
    if inverse:
        angles = -angles
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def rope_tail(x: Float[Array, "... c"], positions, inv_freq, rope_dim: int, inverse: bool = False):
    """Applies RoPE to the last `rope_dim` channels of `x` (head layout [nope | rope])."""
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    return jnp.concatenate([nope, apply_rope(rope, positions, inv_freq, inverse)], axis=-1)
