"""Shared pieces of the FP4 matmul backends: weight-layout checks, in-kernel MXFP4 decode, grouped tile schedule.

Weight layout every kernel reads (the checkpoint layout, `quant.qarray_from_mxfp4_checkpoint`):
  W [N, K] (dense) or [G, N, K] (grouped) as an "mxfp4" `QArray` quantized along its LAST axis (K):
  `values` uint8 [..., N, K/2], element 2i of a row in the low nibble of byte i; `scales` uint8 E8M0
  [..., N, K/32] (byte b means 2**(b - 127), 255 is NaN). The product is y = x @ W.T.

The decode helpers are plain jnp on int32/float32, so the same code runs inside Triton, Mosaic TPU and
the CPU interpreter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from v4jax.quant.qarray import QArray

SCALE_BLOCK = 32  # K elements per E8M0 scale
BYTES_PER_SCALE = SCALE_BLOCK // 2  # packed bytes per scale


def check_mxfp4_weight(w: QArray, ndim: int, name: str) -> None:
    """One-line ValueError unless `w` is an mxfp4 QArray of rank `ndim` quantized along its last axis."""
    if not isinstance(w, QArray):
        # project rule: bad input is a one-line ValueError
        msg = f"{name}: w must be a quant.QArray (quant.quantize(W, 'mxfp4')), got {type(w).__name__}"
        raise ValueError(msg)  # noqa: TRY004
    if (
        w.fmt.element != "e2m1"
        or w.fmt.scale != "e8m0"
        or w.fmt.block != (1, SCALE_BLOCK)
    ):
        raise ValueError(
            f"{name}: w must be in the 'mxfp4' format (e2m1, e8m0, 1x32 blocks), got {w.fmt.name}"
        )
    if w.ndim != ndim or w.axis != ndim - 1:
        raise ValueError(
            f"{name}: w must be rank {ndim} quantized along its last axis (K), got shape {w.shape} axis {w.axis}"
        )
    *lead, k = w.shape
    check_packed_fields(w.values, w.scales, (*lead, k // 2), (*lead, k // SCALE_BLOCK), name)


def check_packed_fields(values, scales, values_shape: tuple, scales_shape: tuple, name: str) -> None:
    """One-line ValueError unless packed `values` and E8M0 `scales` are uint8 arrays of the shapes the logical
    weight implies (the kernels read them by these shapes: a mismatch would read out of bounds)."""
    for what, a, want in (("values", values, values_shape), ("scales", scales, scales_shape)):
        if a.dtype != jnp.uint8 or tuple(a.shape) != tuple(want):
            raise ValueError(f"{name}: w.{what} must be uint8 {tuple(want)}, got {a.dtype} {tuple(a.shape)}")


def e8m0_to_f32(byte: jax.Array) -> jax.Array:
    """E8M0 bytes (any int dtype) -> float32 2**(b-127); 0 -> 2**-127, 255 -> NaN. Bit arithmetic only."""
    b = byte.astype(jnp.int32)
    bits = jnp.where(b == 0, 0x00400000, b << 23)
    bits = jnp.where(b == 255, 0x7FC00000, bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def e2m1_to_f32(code: jax.Array) -> jax.Array:
    """E2M1 nibble codes (int32, 0..15) -> float32 from the bit pattern.

    Normal codes (exponent field e >= 1) map to float32 exponent e + 126 with the mantissa bit on top:
    bits = ((c & 7) << 22) + (126 << 23); the one subnormal magnitude (code 1) is 0.5 = 0x3F000000.
    About eight integer ops per element, no table lookup (Triton and Mosaic have no cheap gather).
    """
    c = code.astype(jnp.int32)
    normal = ((c & 7) << 22) + (126 << 23)
    bits = jnp.where((c & 6) == 0, (c & 1) * 0x3F000000, normal)
    bits = bits | ((c & 8) << 28)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def decode_bytes(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Packed bytes [..., B] -> (low nibble values, high nibble values) as float32 [..., B] each."""
    c = packed.astype(jnp.int32)
    return e2m1_to_f32(c & 0xF), e2m1_to_f32((c >> 4) & 0xF)


# bf16x2 decode of two E2M1 nibbles (the Triton and Mosaic GPU "asm" decoders). prmt brings the byte of each
# element to bits 7..0 and 23..16 (`sel`, from operands `src`); the shifts move each nibble's exponent and
# mantissa to bf16 bits 8..6 and its sign to bit 15, which reads as E2M1 * 2**-126 (the E2M1 subnormal lands
# on a bf16 subnormal); the FMAs, with a -0 addend so that a zero's sign is kept, scale by 2**126 and then by
# the pair's bf16x2 E8M0 scale (operand `scale`): both exact. Result in $0.
_PTX_NIBBLE_PAIR = """{{
.reg .b32 t, u, v, c126, nz;
mov.b32 c126, 0x7E807E80;
mov.b32 nz, 0x80008000;
prmt.b32 t, {src}, {sel};
shl.b32 u, t, {sh_mag};
and.b32 u, u, 0x01C001C0;
shl.b32 v, t, {sh_sign};
and.b32 v, v, 0x80008000;
or.b32 u, u, v;
fma.rn.bf16x2 u, u, c126, nz;
fma.rn.bf16x2 $0, u, {scale}, nz;
}}"""


def ptx_nibble_pair(src: str, sel: int, high_nibble: bool, scale: str) -> str:
    """The inline PTX above for the low (bits 3..0) or high (bits 7..4) nibble of the selected bytes."""
    sh_mag, sh_sign = (2, 8) if high_nibble else (6, 12)
    return _PTX_NIBBLE_PAIR.format(src=src, sel=hex(sel), sh_mag=sh_mag, sh_sign=sh_sign, scale=scale)


# The tile tables' searches: one fused compare-and-count over the G group ends (G is tens to hundreds), where
# jnp's default binary search is a while loop of log2(G) steps, each a few GPU kernels and a host round trip.
SEARCH = "compare_all"


def prefix_sum(v: jax.Array) -> jax.Array:
    """Inclusive prefix sums of a short int32 vector [n] (n: the groups, tens to hundreds), as one
    compare-and-sum over [n, n]. XLA runs `jnp.cumsum` on the GPU as a reduce-window, a kernel of its own
    (3.8 us of the ~20 us of XLA ops around a grouped decode call on the H200); a masked row sum is an
    ordinary reduction that XLA can fuse with its neighbours (timed only within the whole call: with it and the
    window tiles, the XLA ops around a 64-token grouped decode call took 7.1 us on the H200, session 8)."""
    n = v.shape[0]
    below = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]  # [n, n]: j <= i
    return jnp.sum(jnp.where(below, v[None, :], 0), axis=1, dtype=v.dtype)  # [n]


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Rows [starts[g], ends[g]) of each group, int32 [G] each: negative sizes count as 0 and every bound is
    clipped to num_rows, so groups never overlap even when sum(group_sizes) > num_rows."""
    ends = jnp.minimum(prefix_sum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


class TileSchedule(NamedTuple):
    """The grouped kernels' work list: tile t multiplies rows [lo[t], hi[t]) of row block `block[t]` by
    expert `group[t]`. Tiles past the real count have lo == hi (nothing to do) and repeat the last block."""

    group: jax.Array  # int32 [T]
    block: jax.Array  # int32 [T]
    lo: jax.Array  # int32 [T]
    hi: jax.Array  # int32 [T]


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> TileSchedule:
    """Tiles of `block_m` rows aligned to the row grid, one per (row block, group) pair that overlaps.

    A group of rows [s, e) touches blocks s // bm .. (e - 1) // bm, so the count is at most
    num_rows / bm + G - 1: that static bound is the grid size (`num_tiles`). Rows at or past
    sum(group_sizes) belong to no tile. Built with prefix sums and a search, so it jits.
    """
    g_count = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    first = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    cum = prefix_sum(count)
    total = cum[-1]
    t = jnp.arange(num_tiles(num_rows, block_m, g_count), dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, t, side="right", method=SEARCH), g_count - 1).astype(
        jnp.int32
    )
    block = first[g] + (t - (cum[g] - count[g]))
    valid = t < total
    last_block = jnp.where(total > 0, block[jnp.maximum(total - 1, 0)], 0)
    block = jnp.where(valid, block, last_block)
    lo = jnp.where(valid, jnp.maximum(starts[g], block * block_m), 0)
    hi = jnp.where(valid, jnp.minimum(ends[g], (block + 1) * block_m), 0)
    return TileSchedule(
        jnp.where(valid, g, 0),
        block.astype(jnp.int32),
        lo.astype(jnp.int32),
        hi.astype(jnp.int32),
    )


class PaddedRows(NamedTuple):
    """x's rows laid out with every group starting at a multiple of `align` (TMA tiles need aligned row
    offsets): group g occupies padded rows [starts[g], starts[g] + sizes[g]); padded row p holds x row
    `source[p]` (num_rows: a zero row)."""

    sizes: jax.Array  # int32 [G]: group sizes rounded up to `align`
    starts: jax.Array  # int32 [G]: each group's first padded row (a multiple of `align`)
    source: jax.Array  # int32 [P]


def padded_rows(group_sizes: jax.Array, num_rows: int, align: int) -> PaddedRows:
    """The padded layout for `num_padded_rows(num_rows, G, align)` rows (see `PaddedRows`)."""
    g_count = group_sizes.shape[0]
    starts, ends = group_bounds(group_sizes, num_rows)
    sizes = ends - starts
    psizes = (sizes + align - 1) // align * align
    pends = prefix_sum(psizes)
    pstarts = pends - psizes
    p = jnp.arange(num_padded_rows(num_rows, g_count, align), dtype=jnp.int32)
    gp = jnp.minimum(jnp.searchsorted(pends, p, side="right", method=SEARCH), g_count - 1)
    i = p - pstarts[gp]
    source = jnp.where((p < pends[-1]) & (i < sizes[gp]), starts[gp] + i, num_rows)
    return PaddedRows(psizes.astype(jnp.int32), pstarts.astype(jnp.int32), source.astype(jnp.int32))


def num_padded_rows(num_rows: int, num_groups: int, align: int) -> int:
    """Static bound on the padded rows: each group gains at most align - 1."""
    return round_up(num_rows + num_groups * (align - 1), align)


def num_tiles(num_rows: int, block_m: int, num_groups: int) -> int:
    """Static upper bound on the number of grouped tiles (see `tile_schedule`)."""
    return -(-num_rows // block_m) + num_groups - 1


def rows_written(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """bool [num_rows]: rows that belong to some group (row < sum(group_sizes)); the others must read zero."""
    return jnp.arange(num_rows) < jnp.sum(jnp.maximum(group_sizes.astype(jnp.int32), 0))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# --- Word planes (the GPU kernels) -----------------------------------------------------------------------
# Packed bytes are read as little-endian uint32 words, 8 nibbles each: nibble j of word i of a row is
# element 8i + j. Plane j of a tile is nibble j of every word, i.e. the K columns j, j+8, j+16, ...
# Decoding a plane is a few shifts and masks per element and needs no shuffle; the activations are
# split into the same 8 column planes (`x_planes`) so that y = sum_j x_j @ W_j.T stays in K order.
# (Measured on the H200: reading bytes and decoding two planes per byte was slower for the grouped
# kernel, 390 vs 234 us at 64 tokens, and no faster for dense decode.)

PLANES = 8  # nibbles per uint32 word
WORDS_PER_SCALE = SCALE_BLOCK // PLANES  # words sharing one E8M0 scale (4)


def as_words(values: jax.Array) -> jax.Array:
    """Packed bytes uint8 [..., K/2] -> the same bytes as little-endian uint32 words [..., K/8]."""
    *lead, kh = values.shape
    return jax.lax.bitcast_convert_type(values.reshape(*lead, kh // 4, 4), jnp.uint32)  # [..., K/8]


def x_planes(x: jax.Array) -> jax.Array:
    """Activations [M, K] -> column planes [8, M, K/8]: plane j holds columns j, j+8, j+16, ..."""
    m, k = x.shape
    return jnp.transpose(x.reshape(m, k // PLANES, PLANES), (2, 0, 1))  # [8, M, K/8]


def _shift(v: jax.Array, s: int) -> jax.Array:
    return v << s if s >= 0 else v >> -s


def plane_f16_bits(words: jax.Array, j: int) -> jax.Array:
    """uint32 words -> the float16 bit pattern (low 16 bits) of nibble j of each word.

    E2M1 sign|exponent(2)|mantissa(1) placed at float16 bits 15 | 11..10 | 9 reads as the E2M1 value
    times 2**-14 exactly, the E2M1 subnormal (0.5) landing on a float16 subnormal. Float16 -> float32
    conversion keeps subnormals on every backend (float32 arithmetic on subnormals does not: XLA:CPU
    flushes them), which is why the detour goes through float16.
    """
    mag = _shift(words, 9 - 4 * j) & 0x0E00  # exponent and mantissa bits
    sign = _shift(words, 12 - 4 * j) & 0x8000
    return mag | sign


def decode_plane(words: jax.Array, j: int, scale: jax.Array) -> jax.Array:
    """Nibble plane j of uint32 `words` [..., W] times per-word scales `scale` float32 [..., W] -> float32."""
    bits = plane_f16_bits(words, j).astype(jnp.uint16)
    v = jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)  # E2M1 * 2**-14
    return (v * 16384.0) * scale  # two products: exact for every E8M0 scale (one would overflow above 2**113)


def scale_per_word(scales: jax.Array) -> jax.Array:
    """E8M0 bytes [R, G] -> float32 scales [R, 4G], one per uint32 word (4 words share a scale)."""
    r, g = scales.shape
    s = e8m0_to_f32(scales)  # [R, G]
    return jnp.broadcast_to(s[:, :, None], (r, g, WORDS_PER_SCALE)).reshape(r, g * WORDS_PER_SCALE)
