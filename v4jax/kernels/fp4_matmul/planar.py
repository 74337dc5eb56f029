"""`PlanarMXFP4`: MXFP4 weights in the Mosaic GPU kernel's load-time layout, so that a call neither splits x
into column planes nor transposes the scales.

A `QArray` of W [..., N, K] packs K elements 2b and 2b + 1 into byte b (low, high nibble) and keeps the E8M0
scales [..., N, K/32]. The Hopper kernel (`mosaic_gpu.py`) decodes a byte's two nibbles into two column
planes and multiplies each by the matching columns of x; with the QArray layout those are x's even and odd
columns, which XLA must split out of x on every call (a pass over the activations: 280 of the 2460 us of
the grouped prefill on the H200), and the scales need a transpose per call ([N, K/32] -> [K/32, N], one
scale block per shared-memory row).

The planar layout stores, for every chunk of 256 K elements, element j in the low nibble and element
128 + j in the high nibble of byte j (j < 128): the two planes are then the chunk's contiguous halves, so the
kernel reads x as it is. Scales are stored [..., K/32, N]. Convert once, when the weights are loaded
(`to_planar`, or `v4jax.infer.fp4.planarize_experts` for a model's experts); `to_qarray` inverts it, which
the other backends (and the gradient) use.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.kernels.fp4_matmul import common
from v4jax.quant.qarray import QArray

CHUNK = 256  # K elements per chunk: bytes j of a chunk hold elements j (low nibble) and 128 + j (high)
HALF = CHUNK // 2


@flax.struct.dataclass
class PlanarMXFP4:
    """W [..., N, K] as MXFP4 in the planar layout (module docstring): `values` uint8 [..., N, K/2], `scales`
    E8M0 bytes [..., K/32, N]. Static: the logical `shape` (..., N, K) and the `dtype` dequantization returns."""

    values: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: np.dtype = flax.struct.field(pytree_node=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_qarray(self) -> QArray:
        """The same numbers as an mxfp4 `QArray` of W [..., N, K] along K (a pass over the packed bytes)."""
        return QArray(values=_interleave(self.values), scales=jnp.swapaxes(self.scales, -1, -2), global_scale=None,
                      fmt=quant.get_format("mxfp4"), shape=self.shape, dtype=self.dtype, axis=self.ndim - 1)


def to_planar(w: QArray) -> PlanarMXFP4:
    """An mxfp4 `QArray` of W [..., N, K] quantized along K (its last axis), K % 256 == 0 -> `PlanarMXFP4`."""
    common.check_mxfp4_weight(w, max(2, getattr(w, "ndim", 2)), "to_planar")
    if w.shape[-1] % CHUNK:
        raise ValueError(f"to_planar: K must be a multiple of {CHUNK}, got K={w.shape[-1]}")
    return PlanarMXFP4(values=_planarize(w.values), scales=jnp.swapaxes(w.scales, -1, -2), shape=tuple(w.shape),
                       dtype=w.dtype)


def as_qarray(w: QArray | PlanarMXFP4) -> QArray:
    """`w` as a QArray (planar weights converted; a pass over the packed bytes)."""
    return w.to_qarray() if isinstance(w, PlanarMXFP4) else w


def _nibbles(values: jax.Array) -> jax.Array:
    """Packed bytes uint8 [..., B] -> nibbles [..., B, 2] (low, high)."""
    return jnp.stack([values & 0xF, values >> 4], axis=-1)


def _planarize(values: jax.Array) -> jax.Array:
    """QArray packing (elements 2b, 2b + 1 in byte b) -> planar packing (elements j, 128 + j in byte j of
    each 256-element chunk)."""
    *lead, kh = values.shape
    e = _nibbles(values).reshape(*lead, kh // HALF, CHUNK)  # [..., chunks, 256] nibbles in K order
    return (e[..., :HALF] | (e[..., HALF:] << 4)).reshape(*lead, kh)  # [..., K/2]


def _interleave(values: jax.Array) -> jax.Array:
    """The inverse of `_planarize`."""
    *lead, kh = values.shape
    v = values.reshape(*lead, kh // HALF, HALF)  # [..., chunks, 128]
    e = jnp.concatenate([v & 0xF, v >> 4], axis=-1).reshape(*lead, kh, 2)  # [..., K/2, 2]: elements 2b, 2b + 1
    return e[..., 0] | (e[..., 1] << 4)  # [..., K/2]
