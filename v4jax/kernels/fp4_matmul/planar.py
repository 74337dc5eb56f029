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
  contiguous slice of x, read as it is.
- Words: the chunk row's 8 x 128 elements form 32 words W(s, q), one per k-step s (0..7) and lane q (0..3) of a
  quad: the 8 elements a thread of the WGMMA register layout holds for k-step s of both planes, plane columns
  16s + 8h + 2q + e (h, e in {0, 1}): four bf16x2 registers R(p, h) of wgmma's A operand.
- Bits: each element's E2M1 bits (sign S, exponent e1 e0, mantissa m) sit where a rotation of the word puts
  them on bf16 bits 15 | 8 7 | 6 (+16 for e = 1): R(0, 0) = word & mask, R(0, 1) and R(1, 0) one rotation
  each, R(1, 1) two (`ROTATIONS`, `bit_positions`). Those bits read as E2M1 * 2**-126 (the E2M1 subnormal
  lands on a bf16 subnormal); two exact bf16x2 FMAs apply 2**126 and the E8M0 scale, or one FMA by
  2**126 * scale = 2**(byte - 1) when every scale byte is <= 128 ("asm_fused", `fused_scales_ok`). No rotation set
  tiles the word with four whole elements (checked by search), so R(1, 1) costs two rotations.
- Thread order (session 9): within each tile of 64 rows x one chunk (the [64, 128] bytes one TMA box of the
  kernel lands in shared memory, row-major), the 8 KB hold the words of the warpgroup's 128 threads in thread
  order: byte 2048j + 16t + 4i is word i of segment j of thread t = 32w + 4r + q (warp w, quad r, lane q),
  segment j = 2hr + half holding W(s = 4half + i, q) of weight row 16w + 8hr + r. A thread loads its 16 words
  with four 16-byte shared-memory loads (`ld.shared.v4`), a quarter warp 128 contiguous bytes (no bank
  conflict), instead of 32 two-byte loads and 16 prmt merges (the SASS of the session-8 kernel: 48 of its 360
  loop instructions per k-step were shared-memory loads). The E8M0 scales [.., K/32, N] are permuted the same
  way within each [8 blocks, 64 rows] box of a chunk: byte 16pi + 8hr + g of the box (row-major) is the scale
  of block 8c + g of weight row 16w + 8hr + r, pi = 8w + r, so a thread's 16 scales (its two rows, the chunk's
  8 blocks) are one 16-byte load. Both permutations stay inside a 64-row tile and a chunk, so slicing the
  experts or 64-row blocks of N keeps each slice in the layout.
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
TILE_ROWS = 64  # weight rows per storage tile: the kernel's wgmma M tile, one warpgroup's A operand
SCALE_BOX = CHUNK // 32  # scale blocks per chunk: a tile's scales are an [8, 64] box of [K/32, N]
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
    E8M0 bytes [..., K/32, N], both permuted within their boxes (thread order: read them through `to_qarray`,
    `planar_codes` or `load_scales`, not as a plain transpose). Static: the logical `shape` (..., N, K), the
    `dtype` dequantization returns, and `max_scale`, the largest byte of `scales` when known at conversion (None under a trace), which tells
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
        return QArray(values=_interleave(self.values), scales=load_scales(self.scales), global_scale=None,
                      fmt=quant.get_format("mxfp4"), shape=self.shape, dtype=self.dtype, axis=self.ndim - 1)


def _replace(self, **updates) -> PlanarMXFP4:
    """`dataclasses.replace`, except that new `scales` without a `max_scale` leave it unknown (None): a stale
    maximum could let the one-FMA decoder run on scales it is not exact for."""
    if "scales" in updates and "max_scale" not in updates:
        updates["max_scale"] = None
    return dataclasses.replace(self, **updates)


PlanarMXFP4.replace = _replace  # after the decorator, which installs a plain dataclasses.replace


def to_planar(w: QArray) -> PlanarMXFP4:
    """An mxfp4 `QArray` of W [..., N, K] quantized along K (its last axis), N % 64 == 0, K % 256 == 0 ->
    `PlanarMXFP4`."""
    common.check_mxfp4_weight(w, max(2, getattr(w, "ndim", 2)), "to_planar")
    if w.shape[-1] % CHUNK or w.shape[-2] % TILE_ROWS:
        raise ValueError(f"to_planar: needs N % {TILE_ROWS} == 0 and K % {CHUNK} == 0 (the layout's tiles), got "
                         f"N={w.shape[-2]}, K={w.shape[-1]}")
    return PlanarMXFP4(values=_planarize(w.values), scales=store_scales(w.scales), shape=tuple(w.shape),
                       dtype=w.dtype, max_scale=max_scale_byte(w.scales))


def max_scale_byte(scales) -> int | None:
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


def _store_words(words: jax.Array) -> jax.Array:
    """Row words uint32 [..., N, chunks, 8 (s), 4 (q)] -> the layout's bytes [..., N, chunks * 128]: per tile of 64
    rows and a chunk, thread order (module docstring), each word little-endian."""
    *lead, n, c, _, _ = words.shape
    w = words.reshape(*lead, n // TILE_ROWS, 4, 2, 8, c, 2, 4, 4)  # [.., T, warp, hr, r, C, half, i, q]
    nl = len(lead)
    w = jnp.transpose(w, (*range(nl), nl, nl + 4, nl + 2, nl + 5, nl + 1, nl + 3, nl + 7, nl + 6))
    b = jnp.stack([(w >> (8 * k)) & 0xFF for k in range(4)], axis=-1).astype(jnp.uint8)  # [.., T, C, hr, half, warp, r, q, i, byte]
    b = b.reshape(*lead, n // TILE_ROWS, c, TILE_ROWS, HALF)  # [.., T, C, 64, 128]: the TMA box, row-major
    return jnp.swapaxes(b, -3, -2).reshape(*lead, n, c * HALF)


def _load_words(values: jax.Array) -> jax.Array:
    """The inverse of `_store_words`: the layout's bytes [..., N, K/2] -> row words [..., N, chunks, 8, 4]."""
    *lead, n, kh = values.shape
    c = kh // HALF
    b = jnp.swapaxes(values.reshape(*lead, n // TILE_ROWS, TILE_ROWS, c, HALF), -3, -2).astype(jnp.uint32)
    b = b.reshape(*lead, n // TILE_ROWS, c, 2, 2, 4, 8, 4, 4, 4)  # [.., T, C, hr, half, warp, r, q, i, byte]
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)  # [.., T, C, hr, half, warp, r, q, i]
    nl = len(lead)
    w = jnp.transpose(w, (*range(nl), nl, nl + 4, nl + 2, nl + 5, nl + 1, nl + 3, nl + 7, nl + 6))
    return w.reshape(*lead, n, c, 8, 4)  # [.., T, warp, hr, r, C, half, i, q] -> rows, chunks, s, q


def store_scales(scales: jax.Array) -> jax.Array:
    """E8M0 scales [..., N, K/32] (a QArray's) -> the layout's [..., K/32, N]: each [8, 64] box (a chunk's 8
    blocks x a tile's 64 rows) holds, row-major, a thread's 16 scales at 16pi + 8hr + g (module docstring)."""
    *lead, n, blocks = scales.shape
    c, t = blocks // SCALE_BOX, n // TILE_ROWS
    sc = scales.reshape(*lead, t, 4, 2, 8, c, SCALE_BOX)  # [.., T, warp, hr, r, C, g]
    nl = len(lead)
    sc = jnp.transpose(sc, (*range(nl), nl + 4, nl, nl + 1, nl + 3, nl + 2, nl + 5))  # [.., C, T, warp, r, hr, g]
    sc = sc.reshape(*lead, c, t, SCALE_BOX, TILE_ROWS)  # each box's 512 bytes, row-major [8, 64]
    return jnp.swapaxes(sc, -3, -2).reshape(*lead, blocks, n)


def load_scales(stored: jax.Array) -> jax.Array:
    """The inverse of `store_scales`: [..., K/32, N] in the layout -> [..., N, K/32]."""
    *lead, blocks, n = stored.shape
    c, t = blocks // SCALE_BOX, n // TILE_ROWS
    sc = jnp.swapaxes(stored.reshape(*lead, c, SCALE_BOX, t, TILE_ROWS), -3, -2)  # [.., C, T, 8, 64]
    sc = sc.reshape(*lead, c, t, 4, 8, 2, SCALE_BOX)  # [.., C, T, warp, r, hr, g]
    nl = len(lead)
    sc = jnp.transpose(sc, (*range(nl), nl + 1, nl + 2, nl + 4, nl + 3, nl, nl + 5))  # [.., T, warp, hr, r, C, g]
    return sc.reshape(*lead, n, blocks)


def _planarize(values: jax.Array) -> jax.Array:
    """QArray packing (elements 2b, 2b + 1 in byte b) -> the planar layout's bytes (module docstring)."""
    *lead, kh = values.shape
    codes = _nibbles(values).reshape(*lead, kh // HALF, 2, 8, 2, 4, 2).astype(jnp.uint32)  # [.., c, p, s, h, q, e]
    words = jnp.zeros((*lead, kh // HALF, 8, 4), jnp.uint32)
    for (p, h, e, b), pos in np.ndenumerate(POSITIONS):
        words = words | (((codes[..., p, :, h, :, e] >> b) & 1) << int(pos))
    return _store_words(words)


def planar_codes(values: jax.Array) -> jax.Array:
    """The planar layout's bytes [..., N, K/2] -> E2M1 codes uint8 [..., N, K] in K order."""
    *lead, kh = values.shape
    words = _load_words(values)  # [.., c, s, q]
    slots = np.ndindex(2, 2, 2)  # (p, h, e): the 8 elements of a word
    codes = {ph_e: sum(((words >> int(POSITIONS[ph_e][b])) & 1) << b for b in range(4)) for ph_e in slots}
    stacked = jnp.stack([jnp.stack([jnp.stack([codes[p, h, e] for e in range(2)], -1) for h in range(2)], -3)
                         for p in range(2)], -5)  # [.., c, p, s, h, q, e]
    return stacked.reshape(*lead, 2 * kh).astype(jnp.uint8)


def _interleave(values: jax.Array) -> jax.Array:
    """The inverse of `_planarize`."""
    c = planar_codes(values)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # [..., K/2]
