"""`PlanarMXFP4`: MXFP4 weights in the Mosaic GPU kernel's load-time layout, so that a call neither splits x
into column planes nor transposes the scales, and the kernel decodes four packed bytes with a prmt and nine
integer ops.

A `QArray` of W [..., N, K] packs K elements 2b and 2b + 1 into byte b (low, high nibble) and keeps the E8M0
scales [..., N, K/32]. The Hopper kernel (`mosaic_gpu.py`) decodes the packed tile in registers and feeds
wgmma; with the QArray layout it needs x split into even and odd columns on every call (a pass over the
activations: 280 of the 2460 us of the grouped prefill on the H200), the scales transposed per call, and
six integer ops per two decoded elements (the decoder, not the memory, bounded the decode-sized matmuls).

The planar layout, per row and per chunk of 256 K elements (128 bytes):
- Planes: plane p of the chunk is its elements [128p, 128p + 128), so the kernel multiplies each plane by a
  contiguous slice of x, read as it is. Scales are stored [..., K/32, N].
- Words: the chunk's bytes form 32 little-endian 32-bit words, word q of 16-byte group s made of bytes
  16s + (2q, 2q + 1, 2q + 8, 2q + 9): exactly the four bytes a thread of the WGMMA register layout loads
  for k-step s (two 16-bit registers, merged by one prmt). A word holds the 8 elements of both planes at
  plane columns 16s + 8h + 2q + e (h, e in {0, 1}): four bf16x2 registers R(p, h) of wgmma's A operand.
- Bits: each element's E2M1 bits (sign S, exponent e1 e0, mantissa m) sit where a rotation of the word puts
  them on bf16 bits 15 | 8 7 | 6 (+16 for e = 1): R(0, 0) = word & mask, R(0, 1) and R(1, 0) one rotation
  each, R(1, 1) two (`ROTATIONS`, `bit_positions`). Those bits read as E2M1 * 2**-126 (the E2M1 subnormal
  lands on a bf16 subnormal); two exact bf16x2 FMAs apply 2**126 and the E8M0 scale, or one FMA by
  2**126 * scale = 2**(byte - 1) when every scale byte is <= 128 ("asm_fused", `fused_scales_ok`). No rotation set tiles
  the word with four whole elements (checked by search), so R(1, 1) costs two rotations.
Convert once, when the weights are loaded (`to_planar`, or `v4jax.infer.fp4.planarize_experts` for a model's
experts); `to_qarray` inverts it, which the other backends (and the gradient) use.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.kernels.fp4_matmul import common
from v4jax.quant.qarray import QArray

CHUNK = 256  # K elements per chunk: plane p is the chunk's elements [128p, 128p + 128)
HALF = CHUNK // 2
TARGET_BITS = (6, 7, 8, 15)  # bf16 bit of an E2M1 code's bits m, e0, e1, S (low half; +16 for the high half)
# register R(p, h) <- (rotate-left amount, the code bits that rotation brings) ...; bits 0..3 = m, e0, e1, S
ROTATIONS = {(0, 0): ((0, (0, 1, 2, 3)),), (0, 1): ((4, (0, 1, 2, 3)),), (1, 0): ((10, (0, 1, 2, 3)),),
             (1, 1): ((6, (0, 1, 3)), (14, (2,)))}


def bit_positions() -> np.ndarray:
    """int [2 (plane p), 2 (h), 2 (e), 4 (code bit)]: the word bit that holds each element's code bit, the one
    `ROTATIONS` moves onto its bf16 target. Every word bit holds exactly one (checked at import)."""
    pos = np.zeros((2, 2, 2, 4), np.int64)
    for (p, h), rots in ROTATIONS.items():
        for rot, bits in rots:
            for e in range(2):
                for b in bits:
                    pos[p, h, e, b] = (TARGET_BITS[b] + 16 * e - rot) % 32
    return pos


POSITIONS = bit_positions()
assert sorted(POSITIONS.reshape(-1).tolist()) == list(range(32)), "the word layout must use every bit once"


@flax.struct.dataclass
class PlanarMXFP4:
    """W [..., N, K] as MXFP4 in the planar layout (module docstring): `values` uint8 [..., N, K/2], `scales`
    E8M0 bytes [..., K/32, N]. Static: the logical `shape` (..., N, K), the `dtype` dequantization returns,
    and `max_scale`, the largest byte of `scales` when known at conversion (None under a trace), which tells
    whether the one-FMA decoder applies (`fused_scales_ok`); `replace` with new scales resets it to None."""

    values: jax.Array
    scales: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: np.dtype = flax.struct.field(pytree_node=False)
    max_scale: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_qarray(self) -> QArray:
        """The same numbers as an mxfp4 `QArray` of W [..., N, K] along K (a pass over the packed bytes)."""
        return QArray(values=_interleave(self.values), scales=jnp.swapaxes(self.scales, -1, -2), global_scale=None,
                      fmt=quant.get_format("mxfp4"), shape=self.shape, dtype=self.dtype, axis=self.ndim - 1)


def _replace(self, **updates) -> PlanarMXFP4:
    """`dataclasses.replace`, except that new `scales` without a `max_scale` leave it unknown (None): a stale
    maximum could let the one-FMA decoder run on scales it is not exact for."""
    if "scales" in updates and "max_scale" not in updates:
        updates["max_scale"] = None
    return dataclasses.replace(self, **updates)


PlanarMXFP4.replace = _replace  # after the decorator, which installs a plain dataclasses.replace


def to_planar(w: QArray) -> PlanarMXFP4:
    """An mxfp4 `QArray` of W [..., N, K] quantized along K (its last axis), K % 256 == 0 -> `PlanarMXFP4`."""
    common.check_mxfp4_weight(w, max(2, getattr(w, "ndim", 2)), "to_planar")
    if w.shape[-1] % CHUNK:
        raise ValueError(f"to_planar: K must be a multiple of {CHUNK}, got K={w.shape[-1]}")
    return PlanarMXFP4(values=_planarize(w.values), scales=jnp.swapaxes(w.scales, -1, -2), shape=tuple(w.shape),
                       dtype=w.dtype, max_scale=_max_scale(w.scales))


def _max_scale(scales) -> int | None:
    """The largest scale byte, read once at conversion (one device reduction and a scalar to the host), or
    None where it cannot be read: traced scales, or an array not fully held by this process."""
    if isinstance(scales, jax.core.Tracer) or not getattr(scales, "is_fully_addressable", True):
        return None
    with jax.ensure_compile_time_eval():  # concrete even when to_planar runs inside a trace
        return int(jnp.max(scales))


FUSED_MAX_SCALE = 128  # E8M0 byte of 2**1: up to it, 2**126 * scale = 2**(byte - 1) is a finite bf16


def fused_scales_ok(w) -> bool:
    """Whether `w` is planar with every scale byte known to be <= FUSED_MAX_SCALE (scales <= 2; LLM weights
    sit far below), so that decoding may multiply by 2**126 * scale in one bf16x2 FMA instead of two."""
    return isinstance(w, PlanarMXFP4) and w.max_scale is not None and w.max_scale <= FUSED_MAX_SCALE


def as_qarray(w: QArray | PlanarMXFP4) -> QArray:
    """`w` as a QArray (planar weights converted; a pass over the packed bytes)."""
    return w.to_qarray() if isinstance(w, PlanarMXFP4) else w


def _nibbles(values: jax.Array) -> jax.Array:
    """Packed bytes uint8 [..., B] -> nibbles [..., B, 2] (low, high)."""
    return jnp.stack([values & 0xF, values >> 4], axis=-1)


def _words_to_bytes(words: jax.Array) -> jax.Array:
    """uint32 words [..., chunks, 8 (s), 4 (q)] -> the chunk rows' bytes [..., chunks * 128]: byte k of word q
    of group s at 16s + 8 (k >> 1) + 2q + (k & 1)."""
    *lead, chunks, _, _ = words.shape
    b = jnp.stack([(words >> (8 * k)) & 0xFF for k in range(4)], axis=-1).astype(jnp.uint8)  # [.., s, q, k]
    b = b.reshape(*lead, chunks, 8, 4, 2, 2).swapaxes(-3, -2)  # [.., s, k >> 1, q, k & 1]
    return b.reshape(*lead, chunks * HALF)


def _bytes_to_words(values: jax.Array) -> jax.Array:
    """The inverse of `_words_to_bytes`: bytes [..., K/2] -> uint32 words [..., chunks, 8, 4]."""
    *lead, kh = values.shape
    b = values.reshape(*lead, kh // HALF, 8, 2, 4, 2).swapaxes(-3, -2).astype(jnp.uint32)  # [.., s, q, k>>1, k&1]
    b = b.reshape(*lead, kh // HALF, 8, 4, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _planarize(values: jax.Array) -> jax.Array:
    """QArray packing (elements 2b, 2b + 1 in byte b) -> the planar layout's bytes (module docstring)."""
    *lead, kh = values.shape
    codes = _nibbles(values).reshape(*lead, kh // HALF, 2, 8, 2, 4, 2).astype(jnp.uint32)  # [.., c, p, s, h, q, e]
    words = jnp.zeros((*lead, kh // HALF, 8, 4), jnp.uint32)
    for (p, h, e, b), pos in np.ndenumerate(POSITIONS):
        words = words | (((codes[..., p, :, h, :, e] >> b) & 1) << int(pos))
    return _words_to_bytes(words)


def planar_codes(values: jax.Array) -> jax.Array:
    """The planar layout's bytes [..., K/2] -> E2M1 codes uint8 [..., K] in K order (one elementwise pass)."""
    *lead, kh = values.shape
    words = _bytes_to_words(values)  # [.., c, s, q]
    slots = np.ndindex(2, 2, 2)  # (p, h, e): the 8 elements of a word
    codes = {ph_e: sum(((words >> int(POSITIONS[ph_e][b])) & 1) << b for b in range(4)) for ph_e in slots}
    stacked = jnp.stack([jnp.stack([jnp.stack([codes[p, h, e] for e in range(2)], -1) for h in range(2)], -3)
                         for p in range(2)], -5)  # [.., c, p, s, h, q, e]
    return stacked.reshape(*lead, 2 * kh).astype(jnp.uint8)


def _interleave(values: jax.Array) -> jax.Array:
    """The inverse of `_planarize`."""
    c = planar_codes(values)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # [..., K/2]
