"""Pallas Mosaic GPU (Hopper) MXFP4 x bf16 matmuls, dense and grouped (MoE experts): TMA pipeline,
in-register decode, wgmma.

Hopper has no FP4 tensor cores, so each CTA (one warpgroup) streams its packed weight tiles through shared
memory with TMA copies (`plgpu.emit_pipeline`, `num_stages` deep), decodes them in registers to bf16 and
feeds `wgmma` with float32 accumulators. Swap-AB: the decoded weights are wgmma's A operand (64 rows of N,
the wgmma M tile) and the activations its B operand, so a decode-sized M (1..64 rows, padded to a multiple
of 8, wgmma's smallest N) costs no padding to 64 rows: the bytes, not the FLOPs, bound it. A CTA covers 64
or 128 weight rows (`wn`, from the config's block_n): with 128, two accumulators share each x tile, which
halves the activation traffic per FLOP (the grouped prefill's winner on the H200).

Layout (why bytes): the packed uint8 tile goes to shared memory by TMA as it is stored (no per-call XLA
bitcast or copy of the weights: the kernel's only weight traffic is one read of values + scales). QArray
weights are loaded in the WGMMA register layout from 128-byte swizzled tiles; each register tile covers 8 consecutive bytes of a row = 16 K elements, half an
E8M0 scale block, so each row's scale is constant over a register tile: a [64] row vector broadcast over 16
columns (`_tile_scales`), with no gather. Byte b holds K elements 2b (low nibble, plane 0) and 2b+1 (high,
plane 1), and the activations come split into the same 2 column planes, so y.T = W_0 @ x_0.T + W_1 @ x_1.T
keeps the K order. Each pipeline step decodes its tile in chunks of 128 bytes per row (8 scale blocks) to
bound the live registers. The scales are read transposed ([K/32, N], a small XLA transpose: 1/16 of the
packed bytes) so that one scale block of a tile is one contiguous row.

Planar weights (`planar.PlanarMXFP4`, converted once at load time; the layout the GPU default should get):
plane p of each 256-element K chunk c is its elements [256c + 128p, 256c + 128p + 128), so the kernel reads
x [M, K] as it is (no per-call plane split) and the scales without a per-call transpose. Each chunk row is 32
words, one per k-step and lane of a quad: the 8 elements a WGMMA-layout thread holds for that k-step of both
planes, bits placed so that a word decodes into four bf16x2 registers with ten rotate/mask ops in the PTX
(`word_decode_ptx`, `planar.ROTATIONS`). Since session 9 the words of each [64 rows, 128 bytes] TMA box sit in
thread order and the scales of each [8 blocks, 64 rows] box likewise (`planar`), so a thread fetches its 16
words with four 16-byte shared-memory loads and its 16 scales with one (`_decode_tile_ptx`), where the
swizzled WGMMA-layout load took 32 two-byte loads, 16 prmt merges and 16 one-byte scale loads (SASS of the
session-8 dense kernel: 48 of the 360 instructions of a k-step's loop were shared-memory loads).

Decoders: "asm" (the GPU's): inline PTX on the registers (`plgpu.inline_mgpu`): for QArray weights one asm
per plane and register turns two packed bytes into a bf16x2 pair (prmt + shifts + masks), for planar
weights one asm per output register from the word; then two exact bf16x2 FMAs (by 2**126 and by the
scale). "asm_lean": "asm" with the E8M0 scales converted by max(b << 7, 0x0040) (two ops, not five): exact
for every scale byte but the E8M0 NaN (255), which reads as +inf (the block's outputs are non-finite
either way: inf or NaN instead of NaN); planar weights convert their scales this way under "asm" too
(`scale_ptx`, on the bytes of one 16-byte load). "asm_fused" (planar weights whose scale bytes are all <= 128, i.e.
scales <= 2, as in LLM weights: `planar.fused_scales_ok`; the api falls back to "asm_lean" for other weights):
one bf16x2 FMA per register, by 2**126 * scale, instead of two: 15 instead of 19 ops per word in the PTX
(H200, session 9: kernels 3-6% faster; the stored table's dense m16 and grouped entries). "jnp"
(`decode_plane16`, `decode_words_jnp`): the same numbers in jnp; the interpreter runs it (it cannot run PTX).
Measured on the H200 (M = 16, K = N = 7168, kernel alone): 28.2 us with "jnp", 18.6 with "asm" (QArray layout, session 5); planar words 14.6 ("asm") and 14.1
("asm_lean") us, against 15.7 with the session-6 planar decoder (session 7).

Tiles and stores: a launch is a list of tiles (`tile_table`): expert, first row of its x tile, and the output
rows it owns. Dense tiles are row blocks of x. Grouped tiles are either grid tiles (row blocks of x as it
is, one per (block, expert) pair that overlaps; a block spanning two experts is computed twice) or, for
decode-sized M, packed tiles (each expert's rows from an 8-aligned row of a padded copy of x, so an expert
with <= bm rows streams its weights once). Window tiles (`window=True`, the H200 table's decode entry since
session 8): packed tiles that read x as it is, from the aligned row at or below each expert's first row, which
drops the padded copy (a gather of x, 5.6 of the ~20 us of XLA ops around a 64-token call) and its bookkeeping
(x is still padded, by a copy, when M is not a multiple of 8 or is below bm); bm 16 then keeps an expert of
up to 9 rows in one tile. Each CTA writes its [64, bm] accumulator transposed into shared
memory and stores only its own rows straight into y [M, N] with a ladder of power-of-two TMA row stores (a
TMA copy's size is static; the row count is not): no masked stores, no XLA gather after the kernel. A float32
transposed store does not lower (jax 0.11.2), so float32 sums leave as bf16 terms (`out_terms`): one for a
bf16 result, two for split-K partial sums (added by XLA; see below), three (float32's 24 bits) for a float32
result.

Overlapped steps (`BlockConfig.overlap`): by default each K step ends by waiting for its wgmmas; with
`overlap` it waits only for the previous step's, so a step's tensor-core work runs under the next step's TMA
wait and decode, and x's pipeline buffer is released a step late (wgmma reads it asynchronously). On the H200
(session 8) it changed the decode kernels by less than 2% (dense 0.8%, grouped up to 1.6%), so no stored entry
uses it.

The decode kernels are latency-bound, not issue- or bandwidth-bound (Nsight Compute, session 8). The dense
decode tile (98-99 registers, no spills, no ptxas wgmma serialization) fits 4 CTAs (16 warps) per SM, 3 at
K = N = 7168 where 4 pipeline stages' shared memory limits it; at 4096 its 512 CTAs are one wave, the SMs are
busy 68% of the kernel's time, each scheduler issues every other cycle with 0.93 eligible warps, and DRAM runs
at 25% of its peak (38% at 7168). More warps alone did not help it: 2 stages at 7168 (4 CTAs per SM instead of
3) left it at 14.0 us. The grouped decode tile (168 registers) did gain from them: it went from 123.7 to 109.2
us at 64 tokens (78.7 to 72.0 at 8) when 2 pipeline stages instead of 3 let three CTAs share an SM, not two.

A operand: in registers on the GPU (`a_in_registers`, the fast path: no shared-memory round trip). The
Mosaic GPU interpreter (jax 0.11.2) only runs wgmma with A in shared memory, so interpret mode stores the
decoded tile to shared memory first; everything else (TMA pipeline, decode, scales, B operand, epilogue)
is the same code. Both variants lower for CUDA without a GPU (tests/kernels/test_fp4_matmul_mosaic_gpu.py).

Float32 x: wgmma multiplies bf16 (or tf32) operands, so an f32 x runs as its three bf16 terms (x = hi + mid
+ lo: 3 x 8 significand bits, float32's 24); the decoded weights are exact in bf16 (2-bit significands,
power-of-two scales), so the f32 result matches the reference to float32 rounding. Dense stacks the three
terms along M (one launch: the weights are read once); grouped runs one launch per term (stacking would break
the rows' group order), so it reads the weights three times.

Split-K sums: by default the K splits of a tile store bf16 partials that XLA adds (1.0-1.8 us per call at
decode sizes). `dense_wgs` splits K across a CTA's warpgroups instead: one kernel, the partials meet in shared
memory. It needs enough 64-row tiles of N to fill the SMs, so the api takes it where the stored table's
`dense_mosaic_wgs` entry says (N / 64 >= 0.75 x the SMs). `BlockConfig.cluster` makes a tile's K splits one
cluster that adds its partials in the first CTA's shared memory. On the H200 the cluster kernel ran 1-7 us slower
than the plain one (session 10), so no stored entry uses it. `mosaic_gpu_streamk` (stream-K over every SM, the
partials summed across CTAs through semaphores) lost at every decode size too (session 11), call against call:
13.2-13.8 against `dense_wgs`'s 12.0-12.7 us at K = N = 7168, 7.7-8.0 against the split-K call's 6.4-7.3 at 4096.

Measured on the H200 (device time, RESULTS.md "FP4 matmul, session 10"; planar weights with scales <= 2, the
stored table, through the public api):
- grouped prefill (64 experts, top-6 of 8192 tokens, K=4096, N=2048): 1.94 ms, 1.41x tokamax's bf16 ragged_dot
  (2.73 ms);
- grouped decode (64 / 8 tokens, window tiles): 99 / 60 us, 2.8x / 3.7x tokamax, 86% / 75% of copy bandwidth on
  the touched experts' packed bytes;
- dense decode at K = N = 7168 (`dense_wgs`, one kernel): M = 1 / 8 / 16 at 12.1 / 12.0 / 12.8 us, 2.29x /
  2.41x / 2.37x XLA bf16, 67% / 67% / 63% of copy bandwidth;
- dense decode at K = N = 4096 (split-K and the XLA sum): 6.5 / 6.7 / 7.3 us, 1.71x / 1.68x / 1.62x, 41% / 39%
  / 36% (the kernel alone 49% / 48% / 46%).

What bounds the dense decode (session 12, `experiments/benchmarks/fp4_decode_bounds.py`, M = 8): the same
pipeline moving only the bytes, with no decode and no wgmma, takes at best 3.78 us at K = N = 4096 (69.9% of copy
bandwidth) and 8.41 us at 7168 (96%). With the loads and wgmmas but no decode it takes 4.56 / 9.48 us. The decode
adds the rest: 2.4 us of `dense_wgs`'s 12.0 at 7168.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, UInt8

from v4jax.kernels.fp4_matmul import common, planar
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig
from v4jax.kernels.fp4_matmul.planar import CHUNK as PLANAR_CHUNK
from v4jax.kernels.fp4_matmul.planar import HALF as PLANAR_HALF

PLANES = 2  # nibbles per packed byte: the number of column planes
BN = 64  # weight rows per CTA: the wgmma M tile of one warpgroup
CHUNK = 128  # packed bytes per row decoded at once (256 K elements, 8 scale blocks): bounds live registers
BYTES_PER_SCALE = common.BYTES_PER_SCALE  # 16 packed bytes share one E8M0 scale
SWIZZLE = 128  # bytes per swizzled shared-memory row
TRANSFORMS8 = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))  # uint8 tiles
TRANSFORMS16 = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))  # bf16 tiles
PACKED_ROWS_PER_GROUP = 8  # grouped: packed tiles (tile_table) up to this many rows per expert on average
ROW_ALIGN = 8  # TMA row offsets of x tiles (grouped: each group starts on such a row of a padded copy)
SMEM_BUDGET = 200 * 1024  # bytes of shared memory a CTA may use (the H200 allows 227 KiB)
MAX_CLUSTER = 8  # CTAs per cluster (the portable limit)
PLANAR_MAX_BK = 512  # planar weights: K per step, so that a values box [wn, bk/2] (no swizzle) stays <= 256 wide
# planar weights: a decode chunk of CHUNK bytes is exactly one layout chunk, its planes the chunk's halves
# (the kernel's x slices and `_decode_tile_ptx`'s offsets rely on it); imported by name: `_kernel`'s `planar` flag
# shadows the module
assert PLANAR_CHUNK == PLANES * CHUNK and PLANAR_HALF == CHUNK
# ... and a storage tile is one warpgroup's 64 weight rows, its scale box the chunk's 8 blocks (`tile_load_offsets`)
assert planar.TILE_ROWS == BN and planar.SCALE_BOX == CHUNK // BYTES_PER_SCALE


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch's tiling: rows of x per CTA (wgmma N), K per pipeline step, K splits, pipeline depth."""

    bm: int
    bk: int
    split: int
    stages: int
    decode: str = "jnp"  # "jnp" (runs in the interpreter), "asm", "asm_lean" or "asm_fused" (PTX, GPU only)
    wn: int = BN  # weight rows per CTA: 64, or 128 (two accumulators share each x tile: half the x traffic)
    overlap: bool = False  # a K step's wgmmas stay in flight under the next step's decode (see `_kernel`)
    cluster: bool = False  # the K splits of a tile are one cluster, summed in its first CTA (see `_kernel`)


def smem_bytes(bm: int, bk: int, stages: int, a_in_registers: bool, wn: int = BN, terms: int = 3) -> int:
    """Shared memory of one CTA: `stages` pipeline buffers (x planes bf16, half-words, scales), the decoded
    A tile when it is staged in shared memory, and the output tile (`terms` bf16 terms, see `out_terms`)."""
    per_stage = bm * bk * 2 + wn * (bk // PLANES) + (bk // common.SCALE_BLOCK) * wn
    a_buf = 0 if a_in_registers else BN * CHUNK * 2
    return stages * per_stage + a_buf + wn * bm * 2 * terms


def tiles(cfg: BlockConfig, m: int, k: int, a_in_registers: bool, n: int = BN, terms: int = 3,
          max_bk: int | None = None) -> Tiles:
    """Fit `cfg` to the shape: bm = M rounded up to 8 (at most block_m, at most 256), bk a power of two
    >= 256 dividing K, at most `max_bk`, and fitting `stages` pipeline buffers in shared memory, split | K/bk."""
    bm = min(common.round_up(max(m, 1), 8), max(8, common.round_up(cfg.block_m, 8)), 256)
    stages = max(1, cfg.num_stages)
    wn = 2 * BN if cfg.block_n >= 2 * BN and n % (2 * BN) == 0 else BN
    smem = lambda bk, st: smem_bytes(bm, bk, st, a_in_registers, wn, terms)
    bk, top = 256, min(cfg.block_k, max_bk or cfg.block_k)
    while bk * 2 <= top and k % (bk * 2) == 0 and smem(bk * 2, stages) <= SMEM_BUDGET:
        bk *= 2
    while stages > 1 and smem(bk, stages) > SMEM_BUDGET:
        stages -= 1
    if smem(bk, stages) > SMEM_BUDGET:
        raise ValueError(f"fp4_matmul mosaic_gpu: one pipeline stage of bm={bm}, bk={bk}, {wn} weight rows needs "
                         f"{smem(bk, stages)} bytes of shared memory (budget {SMEM_BUDGET}): lower block_m")
    steps = k // bk
    split = max(d for d in range(1, max(1, cfg.split_k) + 1) if steps % d == 0)
    stages = min(stages, steps // split)
    return Tiles(bm=bm, bk=bk, split=split, stages=stages, decode=cfg.decode, wn=wn,
                 overlap=cfg.overlap and stages > 1, cluster=cfg.cluster and 1 < split <= MAX_CLUSTER)


def x_planes2(x: jax.Array) -> jax.Array:
    """Activations [M, K] -> column planes [2, M, K/2]: plane 0 the even columns, plane 1 the odd ones."""
    m, k = x.shape
    return jnp.transpose(x.reshape(m, k // PLANES, PLANES), (2, 0, 1))  # [2, M, K/2]


def split_f32(x: jax.Array) -> jax.Array:
    """float32 x [M, K] -> bf16 terms [3M, K] (hi, mid, lo stacked along M) whose sum is x to 24 bits."""
    hi = x.astype(jnp.bfloat16)
    r = x - hi.astype(jnp.float32)
    mid = r.astype(jnp.bfloat16)
    lo = (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.concatenate([hi, mid, lo], axis=0)  # [3M, K]


def _shift(v: jax.Array, s: int) -> jax.Array:
    return v << s if s >= 0 else v >> -s


def decode_plane16(h: jax.Array, p: int, scale: jax.Array) -> jax.Array:
    """Nibble p (0..3) of uint16 `h` (packed bytes zero-extended: p in {0, 1}) times float32 `scale` -> bf16.

    E2M1 sign|exponent(2)|mantissa(1) placed at float16 bits 15 | 11..10 | 9 reads as the E2M1 value times
    2**-14, exactly (the E2M1 subnormal lands on a float16 subnormal); float16 -> float32 keeps it, then two
    exact products by 2**14 and the E8M0 scale (one product would overflow for scales above 2**113).
    """
    mag = _shift(h, 9 - 4 * p) & jnp.uint16(0x0E00)
    sign = _shift(h, 12 - 4 * p) & jnp.uint16(0x8000)
    v = jax.lax.bitcast_convert_type(mag | sign, jnp.float16).astype(jnp.float32)
    return ((v * 16384.0) * scale).astype(jnp.bfloat16)


def _decode_ptx(byte: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """QArray layout: packed bytes uint8 [64, C] and their bf16 scales [64, C] (both in the WGMMA register
    layout) -> the two nibble planes bf16 [64, C] in the same layout, by inline PTX on the registers (GPU only:
    the interpreter cannot run it; `decode_plane16` is the same arithmetic in jnp). Each register of the layout
    holds two adjacent columns, i.e. two packed bytes: one 32-bit asm per plane decodes both."""
    from jax.experimental.mosaic.gpu import (
        fragmented_array as fa,  # lazy: Mosaic GPU internals
    )
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    out_type = plgpu.ShapeDtypeStruct(byte.shape, jnp.bfloat16, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA), return_type=(out_type, out_type))
    def decode(_, b, s):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        out = []
        for p in range(PLANES):
            # bytes b, b+1 of the zero-extended pair to bits 7..0 and 23..16 (selector 7: a zero byte)
            asm = common.ptx_nibble_pair("$1, $1", 0x7170, high_nibble=p == 1, scale="$2")
            regs = np.empty(b.registers.shape, dtype=object)
            for idx, reg in np.ndenumerate(b.registers):
                word = arith.extui(i32, mgpu_utils.bitcast(reg, i16))  # bytes b, b+1 in bits 0..15
                sc = mgpu_utils.bitcast(s.registers[idx], i32)
                pair_bits = llvm.inline_asm(i32, [word, sc], asm, "=r,r,r")
                regs[idx] = mgpu_utils.bitcast(pair_bits, pair)
            out.append(fa.FragmentedArray(_registers=regs, _layout=b.layout, _is_signed=None))
        return tuple(out)

    return tuple(decode(byte, scale))


def word_decode_ptx(rotations, fused: bool = False) -> str:
    """Inline PTX for one bf16x2 register R(p, h) of the planar layout (`planar.ROTATIONS`): the rotations of
    the 32-bit word $1 that put the register's bits on bf16 bits 15 | 8 7 | 6 (both halves), masked and
    merged (ptxas makes each rotation one SHF and each mask-and-merge one LOP3), then the two exact bf16x2
    FMAs of `common.ptx_nibble_pair`: by 2**126 (the bits read as E2M1 * 2**-126) and by the scale $2; with
    `fused` ("asm_fused") one FMA by $2 = 2**126 * scale (`scale_ptx("asm_fused", ...)`), as exact."""
    lines = ["{", ".reg .b32 r, u, nz;", "mov.b32 nz, 0x80008000;"]
    if not fused:
        lines[1:1] = [".reg .b32 c126;", "mov.b32 c126, 0x7E807E80;"]
    for i, (rot, bits) in enumerate(rotations):
        mask = sum(1 << (planar.TARGET_BITS[b] + 16 * e) for b in bits for e in (0, 1))
        src = "$1"
        if rot:
            lines.append(f"shf.l.wrap.b32 r, $1, $1, {rot};")
            src = "r"
        lines.append(f"and.b32 {'u' if i == 0 else 'r'}, {src}, {mask:#010x};")
        if i:
            lines.append("or.b32 u, u, r;")
    if fused:
        lines += ["fma.rn.bf16x2 $0, u, $2, nz;", "}"]
    else:
        lines += ["fma.rn.bf16x2 u, u, c126, nz;", "fma.rn.bf16x2 $0, u, $2, nz;", "}"]
    return "\n".join(lines)


def scale_ptx(how: str, byte: int) -> str:
    """Inline PTX: byte `byte` of the 32-bit register $1 (four E8M0 scales) -> the bf16x2 pair (both halves) a
    word decoder multiplies by: "asm_fused" 2**(b - 1) = (b + 126) << 7 (exact for b <= 128), else ("asm_lean",
    also for "asm") max(b << 7, 0x0040). prmt puts the byte in both halves (zeros above it), so the shift and add
    stay inside each half."""
    sel = byte | 4 << 4 | byte << 8 | 4 << 12  # result bytes: b, 0, b, 0 (selector 4: byte 0 of the zero operand)
    lines = ["{", ".reg .b32 t;", f"prmt.b32 t, $1, 0, {sel:#06x};", "shl.b32 t, t, 7;"]
    if how == "asm_fused":
        lines.append("add.u32 $0, t, 0x3F003F00;")
    else:
        lines += [".reg .b32 lo;", "mov.b32 lo, 0x00400040;", "max.u16x2 $0, t, lo;"]
    return "\n".join(lines + ["}"])


# integer ops on Python ints or numpy arrays: `tile_load_offsets` as the tests evaluate it
INT_OPS = types.SimpleNamespace(add=operator.add, mul=operator.mul, div=operator.floordiv, rem=operator.mod)


def tile_load_offsets(t, h: int, c: int, kb: int, wn: int, ops=INT_OPS):
    """Byte offsets of thread t's four 16-byte value segments (j = 0..3) in a step's values tile [wn, kb] and of
    its 16-byte scale group in the step's scales tile [8 * chunks, wn], for tile h (64 weight rows) and chunk c:
    segment j is box byte 2048j + 16t = box row 16j + t // 8, column 16 (t % 8); the scales are box byte 16 (t // 4)
    = box row t // 16, column 16 ((t // 4) % 4) (`planar`'s thread order). `ops`: the integer ops (Python/numpy
    here, MLIR arith in the kernel), so that a test runs the kernel's exact arithmetic."""
    v_base = ops.add(ops.mul(ops.div(t, 8), kb), ops.mul(ops.rem(t, 8), 16))
    values = [ops.add(v_base, (BN * h + 16 * j) * kb + CHUNK * c) for j in range(4)]
    s_base = ops.add(ops.mul(ops.div(t, 16), wn), ops.mul(ops.rem(ops.div(t, 4), 4), 16))
    return values, ops.add(s_base, planar.SCALE_BOX * c * wn + BN * h)


def tile_registers(segs, sregs, scale, decode) -> dict:
    """A thread's decoded A registers from its loads: `segs` [4 segments][4 words] and `sregs` (4 registers of 4
    scale bytes: register 2hr + p holds plane p's 4 blocks of row half hr) -> {(plane p, column group g, row half
    hr): register}, word (hr, s) = segs[2hr + s // 4][s % 4] giving groups 2s + h of both planes, with
    `scale(register, byte)` and `decode(word, scale, rotations)` the kernel's asm (or a test's interpreter)."""
    scl = {(hr, p, b): scale(sregs[2 * hr + p], b) for hr in range(2) for p in range(PLANES) for b in range(4)}
    out = {}
    for hr in range(2):
        for st in range(8):  # k-step st: word st % 4 of segment 2hr + st // 4; a scale block spans two k-steps
            word = segs[2 * hr + st // 4][st % 4]
            for (p, hh), rots in planar.ROTATIONS.items():
                out[p, 2 * st + hh, hr] = decode(word, scl[hr, p, st // 2], rots)
    return out


def _decode_tile_ptx(v_smem, s_smem, h: int, c: int, how: str) -> tuple[jax.Array, jax.Array]:
    """Planar weights, GPU: tile h (64 weight rows) and chunk c of a pipeline step's shared-memory buffers,
    values [wn, kb] and scales [8 * chunks, wn] in the layout's thread order (`planar`) ->
    the chunk's two planes bf16 [64, 128] in the WGMMA register layout (wgmma's A operand).

    Each thread reads its 16 words with four 16-byte loads and its 16 scales with one (`tile_load_offsets`: a
    quarter warp reads 128 contiguous bytes, no bank conflict), turns each scale byte into a bf16x2 pair
    (`scale_ptx`) and each word into four registers (`word_decode_ptx`, placed by `tile_registers`).
    `decode_words_jnp` is the same numbers in jnp (what the interpreter runs). `how="raw"` is for measurements
    only (`experiments/benchmarks/fp4_decode_bounds.py`): the loaded words go to wgmma as they are, with no
    arithmetic, so a kernel built on it costs what the decode costs less."""
    from jax.experimental.mosaic.gpu import (
        fragmented_array as fa,  # lazy: Mosaic GPU internals
    )
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm, vector

    out_type = plgpu.ShapeDtypeStruct((BN, CHUNK), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()), return_type=(out_type, out_type))
    def decode(_, v_ref, s_ref):
        i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
        v4 = ir.VectorType.get((4,), i32)
        pair = ir.VectorType.get((2,), ir.BF16Type.get())
        kb = ir.MemRefType(v_ref.type).get_strides_and_offset()[0][0]  # bytes per row of the step's tile
        wn = ir.MemRefType(s_ref.type).get_strides_and_offset()[0][0]  # weight rows of the scale tile
        as_value = lambda v: v if isinstance(v, ir.Value) else arith.constant(i32, v)
        op = lambda f: lambda a, b: f(as_value(a), as_value(b))
        ops = types.SimpleNamespace(add=op(arith.addi), mul=op(arith.muli), div=op(arith.divui), rem=op(arith.remui))

        def load4(ref, offset):  # 16 bytes at `offset` of `ref` -> 4 x i32
            ptr = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref), [offset], i8)
            vec = llvm.load(v4, ptr, alignment=16)
            return [vector.extract(vec, [], [i]) for i in range(4)]

        t = ops.rem(mgpu_utils.thread_idx(), 128)  # thread of the warpgroup
        v_offsets, s_offset = tile_load_offsets(t, h, c, kb, wn, ops)
        if how == "raw":  # measurement only: no scale loads, no arithmetic
            regs = tile_registers([load4(v_ref, o) for o in v_offsets], [None] * 4, lambda reg, b: reg,
                                  lambda word, sc, rots: mgpu_utils.bitcast(word, pair))
        else:
            regs = tile_registers(
                [load4(v_ref, o) for o in v_offsets], load4(s_ref, s_offset),
                lambda reg, b: llvm.inline_asm(i32, [reg], scale_ptx(how, b), "=r,r"),
                lambda word, sc, rots: mgpu_utils.bitcast(
                    llvm.inline_asm(i32, [word, sc], word_decode_ptx(rots, how == "asm_fused"), "=r,r,r"), pair))
        shape = fa.WGMMA_LAYOUT.registers_shape((BN, CHUNK))  # [1, 16 column groups, 1, 1, 2 row halves, ...]
        out = [np.empty(shape, dtype=object) for _ in range(PLANES)]
        for (p, g, hr), reg in regs.items():
            out[p][(0, g, 0, 0, hr, *(0,) * (len(shape) - 5))] = reg
        return tuple(fa.FragmentedArray(_registers=r, _layout=fa.WGMMA_LAYOUT, _is_signed=None) for r in out)

    return tuple(decode(v_smem, s_smem))


def _decode_tile_jnp(v_smem, s_smem, h: int, c: int) -> tuple[jax.Array, jax.Array]:
    """`_decode_tile_ptx` in jnp, for the interpreter: the tile's [64, 128] bytes and [8, 64] scales as loaded
    (a [64, 256] weight in the planar layout) -> its two planes bf16 [64, 128]."""
    byte = v_smem[pl.ds(BN * h, BN), pl.ds(CHUNK * c, CHUNK)]  # [64, 128] uint8
    box = s_smem[pl.ds(planar.SCALE_BOX * c, planar.SCALE_BOX), pl.ds(BN * h, BN)]  # [8, 64] uint8
    sc = common.e8m0_to_f32(planar.load_scales(box))  # [64, 8]: rows, the chunk's blocks
    scales = tuple(jnp.repeat(sc[:, 4 * p : 4 * p + 4], 2 * BYTES_PER_SCALE, axis=1) for p in range(PLANES))
    return decode_words_jnp(byte, scales)  # two [64, 128] bf16


def decode_words_jnp(byte: jax.Array, scales: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Planar bytes of a [64, 256] tile [64, 128] -> codes [64, 256] in K order (`planar.planar_codes`) -> each
    plane's E2M1 values times its float32 scales [64, 128], in bf16."""
    codes = planar.planar_codes(byte)  # [64, 256]
    planes = (codes[:, p * PLANAR_HALF : (p + 1) * PLANAR_HALF] for p in range(PLANES))  # [64, 128] each
    return tuple((common.e2m1_to_f32(c) * s).astype(jnp.bfloat16) for c, s in zip(planes, scales))


def _e8m0_to_bf16(byte: jax.Array, how: str = "asm") -> jax.Array:
    """QArray weights: E8M0 bytes -> the bf16 scale the PTX decoder `how` multiplies by (planar weights convert
    in PTX, `scale_ptx`). "asm": 2**(b-127) from the bit pattern: b << 7 (a normal bf16), 0 -> 2**-127 (the bf16
    subnormal 0x0040), 255 -> NaN; exact, and no float32 subnormal on the way. "asm_lean": max(b << 7, 0x0040),
    two ops instead of five, exact but for the NaN byte 255, which reads as +inf."""
    b = byte.astype(jnp.uint16)
    if how == "asm_lean":
        return jax.lax.bitcast_convert_type(jnp.maximum(b << 7, jnp.uint16(0x0040)), jnp.bfloat16)
    bits = jnp.where(b == 0, jnp.uint16(0x0040), b << 7)
    bits = jnp.where(b == 255, jnp.uint16(0x7FC0), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def _tile_scales(s_smem, g0: int, groups: int, r0: int, how: str) -> jax.Array:
    """QArray layout: scale blocks g0 .. g0 + groups of the step's tile [groups, wn] uint8 (transposed: one scale
    block per row), rows r0 .. r0 + 64 -> the decoder `how`'s scales (float32 for "jnp", else `_e8m0_to_bf16`'s
    bf16) [64, 16 * groups] in the WGMMA layout: each block's scale over its 16 byte columns (2 register tiles;
    a byte's two elements share a block)."""
    cols = []
    for g in range(g0, g0 + groups):
        row = plgpu.load(s_smem.at[g, pl.ds(r0, BN)], layout=plgpu.Layout.WGMMA.reduce(1))  # [64] uint8 per row
        sc = common.e8m0_to_f32(row) if how == "jnp" else _e8m0_to_bf16(row, how)  # [64]
        cols.append(jnp.broadcast_to(sc[:, None], (BN, BYTES_PER_SCALE)))  # [64, 16]
    return jnp.concatenate(cols, axis=1)  # [64, 16 * groups]


def out_terms(split: int, out_dtype) -> int:
    """bf16 terms per output element. A float32 transposed store does not lower (jax 0.11.2), so the kernel
    stores its float32 sums as bf16 terms (hi, then the remainders): 1 for a bf16 result; 2 for split-K
    partial sums of a bf16 result (each partial kept to about 2**-17 of itself, so the sum is off the float32
    one by more than a bf16 ulp only where partials cancel by 2**8 or more); 3 for a float32 result (24
    bits: float32's significand). A partial sum beyond bf16's range would come back as inf/NaN."""
    if out_dtype == jnp.float32:
        return 3
    return 2 if split > 1 else 1


class TileTable(NamedTuple):
    """The launch's work list, one column per tile (int32 [5, T] in the kernel): expert `group` (== G: a tile
    of rows that belong to no group, written as zeros), the first row of its x tile `x_row0` (a multiple of
    ROW_ALIGN in the x the kernel reads), and the `rows` output rows [out_row0, out_row0 + rows) it owns,
    which are rows [lead, lead + rows) of its tile. Tiles past the real count have rows == 0."""

    table: jax.Array  # int32 [5, T]: group, x_row0, out_row0, lead, rows
    x_source: jax.Array | None  # int32 [P]: row of x for each row of the padded copy the kernel reads; None: x


def tile_table(group_sizes: jax.Array, m: int, bm: int, packed: bool, window: bool = False) -> TileTable:
    """Grid tiles (`packed` False, for many rows per expert): row blocks of x as it is, one tile per (block,
    group) pair that overlaps (`common.tile_schedule`), so a block that spans two groups is computed twice
    and each tile stores only its own rows. Packed tiles (few rows per expert, decode): each group starts a
    tile on a ROW_ALIGN row of a padded copy of x, so a group of <= bm rows is one tile and its expert's
    weights stream once. Window tiles (`packed` and `window`): the same, but each group's tiles read x as it
    is, from the aligned row at or below the group's start (its rows then start `lead` rows into the tile),
    so there is no padded copy to build; a group of up to bm - ROW_ALIGN + 1 rows is one tile. Rows past
    sum(group_sizes) form a last pseudo-group G (zeros)."""
    g = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    total = jnp.minimum(jnp.sum(sizes), m)
    ext = jnp.concatenate([sizes, (m - total)[None]])  # [G + 1]
    if not packed:
        sch = common.tile_schedule(ext, m, bm)
        rows = sch.hi - sch.lo
        x_row0 = sch.block * bm
        table = jnp.stack([sch.group, x_row0, sch.lo, sch.lo - x_row0, rows])
        return TileTable(table.astype(jnp.int32), None)
    starts, ends = common.group_bounds(ext, m)
    if window:
        return _window_table(starts, ends, m, bm, g)
    pad = common.padded_rows(ext, m, ROW_ALIGN)
    p_rows = pad.source.shape[0]
    count = (pad.sizes + bm - 1) // bm  # tiles per group
    cum = common.prefix_sum(count)
    t = jnp.arange(-(-p_rows // bm) + g + 1, dtype=jnp.int32)  # static bound: sum ceil(psize / bm)
    grp = jnp.minimum(jnp.searchsorted(cum, t, side="right", method=common.SEARCH), g).astype(jnp.int32)
    i = t - (cum[grp] - count[grp])
    valid = t < cum[-1]
    x_row0 = jnp.where(valid, pad.starts[grp] + i * bm, 0)
    out_row0 = jnp.where(valid, starts[grp] + i * bm, 0)
    rows = jnp.where(valid, jnp.clip(ends[grp] - out_row0, 0, bm), 0)
    table = jnp.stack([jnp.where(valid, grp, g), x_row0, out_row0, jnp.zeros_like(t), rows])
    return TileTable(table.astype(jnp.int32), pad.source)


def window_rows(m: int, bm: int) -> int:
    """Rows of x that window tiles read: M rounded up to ROW_ALIGN, at least one tile (x is padded to it only
    where M falls short)."""
    return max(common.round_up(m, ROW_ALIGN), bm)


def _window_table(starts: jax.Array, ends: jax.Array, m: int, bm: int, g: int) -> TileTable:
    """Window tiles (`tile_table`) of the G + 1 row ranges [starts, ends): tile i of a group covers the bm
    rows from its aligned row floor(start / ROW_ALIGN) * ROW_ALIGN + i * bm, moved down (staying aligned) so
    that it ends inside the `window_rows` rows x is read with; its output rows are the group's rows inside."""
    base = starts - starts % ROW_ALIGN  # [G + 1]: each group's first aligned row
    count = jnp.where(ends > starts, (ends - base + bm - 1) // bm, 0)  # tiles per group
    cum = common.prefix_sum(count)
    # static bound: sum over groups of (size + ROW_ALIGN - 1 + bm - 1) // bm, plus one (floor of the sum)
    t = jnp.arange((m + (g + 1) * (ROW_ALIGN + bm - 2)) // bm + 1, dtype=jnp.int32)
    grp = jnp.minimum(jnp.searchsorted(cum, t, side="right", method=common.SEARCH), g).astype(jnp.int32)
    i = t - (cum[grp] - count[grp])
    valid = t < cum[-1]
    u = base[grp] + i * bm  # the tile's rows before the move: [u, u + bm)
    out_row0 = jnp.maximum(starts[grp], u)
    rows = jnp.clip(jnp.minimum(ends[grp], u + bm) - out_row0, 0, bm)
    x_row0 = jnp.minimum(u, window_rows(m, bm) - bm)  # a multiple of ROW_ALIGN: bm and window_rows are
    table = jnp.stack([jnp.where(valid, grp, g), jnp.where(valid, x_row0, 0), jnp.where(valid, out_row0, 0),
                       jnp.where(valid, out_row0 - x_row0, 0), jnp.where(valid, rows, 0)])
    return TileTable(table.astype(jnp.int32), None)


def _kernel(tab_gmem, x_gmem, v_gmem, s_gmem, o_gmem, o_smem, *scratch, t: Tiles, k: int, num_groups: int,
            dense_rows: int | None, planar: bool):
    """One CTA: weight rows [n*wn, n*wn + wn) of expert `group` x the tile's bm rows of x, K split `s`; stores
    its `rows` output rows (a ladder of power-of-two TMA stores: a store's row count must be static).
    Dense (`dense_rows` = M): tile m is rows [m*bm, m*bm + bm), known without reading the table.
    `planar` (weights in `planar.PlanarMXFP4`'s layout): x [M, K] as it is, and each plane's own scales;
    else x comes as its two column planes [2, M, K/2] and both planes of a byte share a scale.
    `t.cluster` (dense): the tile's K splits are one cluster; splits 1.. send their float32 sums into the
    shared memory of split 0 (`plgpu.async_store_smem`, the Hopper's distributed shared memory), which adds
    them and stores the tile: one kernel per call, where split-K partials otherwise meet in an XLA sum
    (1.1-1.8 us on the H200 at decode sizes)."""
    red_smem, red_bar, *a_smem = scratch if t.cluster else (None, None, *scratch)
    bm, bk = t.bm, t.bk
    kb = bk // PLANES  # packed bytes per row per K step
    groups = bk // common.SCALE_BLOCK
    steps = k // bk // t.split
    ni, mi, si = (jax.lax.axis_index(a) for a in ("n", "m", "s"))
    k0 = si * steps  # this split's first K step
    if dense_rows is None:
        g, x_row0, out_row0, lead, rows = (tab_gmem[c, mi] for c in range(5))
    else:  # no dependent loads before the first TMA copy (they cost microseconds at decode sizes)
        g, lead = 0, 0
        x_row0 = out_row0 = mi * bm
        rows = jnp.minimum(bm, dense_rows - mi * bm)
    x_row0 = pl.multiple_of(x_row0, ROW_ALIGN)  # tile_table's guarantee: TMA tiles start on aligned rows
    gw = jnp.minimum(g, num_groups - 1)  # the zero pseudo-group reads no weights (its pipeline never runs)
    x_tile = x_gmem.at[pl.ds(x_row0, bm), :] if planar else x_gmem.at[:, pl.ds(x_row0, bm), :]
    # `overlap`: wgmma reads its x tile (B) from shared memory asynchronously, so with a step's wgmmas left in
    # flight under the next step's decode, the x buffer is released one step late (delay_release)
    delay = 1 if t.overlap else 0
    x_spec = (plgpu.BlockSpec((bm, bk), lambda kk: (0, k0 + kk), transforms=TRANSFORMS16, delay_release=delay)
              if planar else plgpu.BlockSpec((PLANES, bm, kb), lambda kk: (0, 0, k0 + kk), transforms=TRANSFORMS16,
                                             delay_release=delay))

    wn = t.wn
    halves = wn // BN
    # the decoder: "asm_fused" needs the planar layout's word decoder (QArray weights take "asm_lean"'s two FMAs)
    how = "asm_lean" if t.decode == "asm_fused" and not planar else t.decode
    asm = how != "jnp"

    def scope(*accs):
        def body(_, x_smem, v_smem, s_smem):
            for c in range(kb // CHUNK):  # K chunks of 128 bytes: bounds the registers a decoded chunk needs
                cols = pl.ds(c * CHUNK, CHUNK)
                g0, ng = c * CHUNK // BYTES_PER_SCALE, CHUNK // BYTES_PER_SCALE
                for h, acc_ref in enumerate(accs):  # 64 weight rows each; both read the same x tile
                    wrows = pl.ds(h * BN, BN)
                    if planar:  # the tile's words and scales in thread order: 16-byte loads, both planes
                        planes = _decode_tile_ptx(v_smem, s_smem, h, c, how) if asm else _decode_tile_jnp(
                            v_smem, s_smem, h, c)
                    else:  # one scale per byte, both planes at once: 2 x [64, 128] bf16
                        byte = plgpu.load(v_smem.at[wrows, cols], layout=plgpu.Layout.WGMMA)  # [64, 128] uint8
                        scale = _tile_scales(s_smem, g0, ng, h * BN, how)
                        planes = _decode_ptx(byte, scale) if asm else None
                    byte16 = None if asm or planar else byte.astype(jnp.uint16)
                    for p in range(PLANES):
                        if planar:
                            a = planes[p]  # [64, 128] bf16: W[rows, chunk columns p*128 + j]
                            # [128, bm]: x columns c*256 + p*128 + j, the ones plane p multiplies, transposed
                            b = x_smem.at[:, pl.ds(c * PLANAR_CHUNK + p * PLANAR_HALF, PLANAR_HALF)].transpose((1, 0))
                        else:
                            # [64, 128] bf16: W[rows, K columns 2b + p]
                            a = planes[p] if asm else decode_plane16(byte16, p, scale)
                            b = x_smem.at[p, :, cols].transpose((1, 0))  # [128, bm]: x plane p, transposed view
                        if a_smem:  # interpret mode: the interpreter runs wgmma with A in shared memory only
                            a_smem[0][...] = a
                            plgpu.commit_smem()
                            plgpu.wgmma(acc_ref, a_smem[0], b)  # acc [64, bm] += W_p [64, 128] @ x_p.T
                            plgpu.wgmma_wait(0)  # the A buffer is rewritten next
                        else:
                            plgpu.wgmma(acc_ref, a, b)  # acc [64, bm] += W_p [64, 128] @ x_p.T, A in registers
            # each wgmma is one commit group: `overlap` waits only for the previous step's (this step's x buffer
            # stays until the next step ends); else for all
            plgpu.wgmma_wait(kb // CHUNK * len(accs) * PLANES if t.overlap else 0)

        plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=[
                x_spec,
                # planar: the layout's thread order replaces the swizzle (a quarter warp reads 128 contiguous bytes)
                plgpu.BlockSpec((wn, kb), lambda kk: (ni, k0 + kk), transforms=() if planar else TRANSFORMS8),
                plgpu.BlockSpec((groups, wn), lambda kk: (k0 + kk, ni)),
            ],
            max_concurrent_steps=t.stages,
        )(x_tile, v_gmem.at[gw], s_gmem.at[gw])
        if t.overlap:
            plgpu.wgmma_wait(0)  # the last step's wgmmas, before the accumulators are read
        sums = [acc_ref[...] for acc_ref in accs]  # [64, bm] float32 each

        def store_terms(sums):
            for h, rest in enumerate(sums):
                for term in range(o_smem.shape[0]):  # bf16 terms of the float32 sums (see `out_terms`)
                    part = rest.astype(jnp.bfloat16)
                    o_smem.at[term, :, pl.ds(h * BN, BN)].transpose((1, 0))[...] = part  # [bm, 64] <- [64, bm]
                    if term + 1 < o_smem.shape[0]:
                        rest = rest - part.astype(jnp.float32)

        if not t.cluster:
            store_terms(sums)
            return

        @pl.when(si != 0)
        def _():  # this split's sums -> slot (s - 1, h) of split 0's shared memory; completes split 0's barrier
            for h, part in enumerate(sums):
                plgpu.async_store_smem(part, red_smem.at[(si - 1) * halves + h], red_bar, cluster_idx=0,
                                       cluster_dim="s")

        @pl.when(si == 0)
        def _():
            plgpu.barrier_wait(red_bar)  # every other split's sums have landed
            store_terms([sums[h] + sum(plgpu.load(red_smem.at[j * halves + h], layout=plgpu.Layout.WGMMA)
                                       for j in range(t.split - 1)) for h in range(halves)])

    @pl.when(rows > 0)
    def _():
        @pl.when(g < num_groups)
        def _():
            pl.run_scoped(scope, *[plgpu.ACC((BN, bm), jnp.float32) for _ in range(halves)])

        @pl.when(g >= num_groups)
        def _():
            o_smem[...] = jnp.zeros(o_smem.shape, o_smem.dtype)

        def store():
            plgpu.commit_smem()
            o_split = 0 if t.cluster else si  # clustered: one output, the tile's sum
            _store_rows(o_smem, lambda term: o_gmem.at[o_split, term, :, pl.ds(ni * wn, wn)], lead, out_row0, rows,
                        bm)

        if t.cluster:  # split 0 stores the tile's sum
            pl.when(si == 0)(store)
        else:
            store()


def _store_rows(o_smem, o_rows, lead, out_row0, rows, bm: int) -> None:
    """Rows [lead, lead + rows) of each bf16 term's tile o_smem [terms, bm, n] -> rows [out_row0, out_row0 + rows)
    of `o_rows(term)` (a [M, n] view of the output), with a ladder of power-of-two TMA row stores (a TMA copy's
    size is static, the row count is not: one store per set bit of `rows`); waits for them."""
    start, size = lead, 1 << (bm.bit_length() - 1)
    while size >= 1:
        @pl.when(rows & size != 0)
        def _(start=start, size=size):
            for term in range(o_smem.shape[0]):
                plgpu.copy_smem_to_gmem(o_smem.at[term, pl.ds(start, size)],
                                        o_rows(term).at[pl.ds(out_row0 + start - lead, size)])

        start = start + (rows & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0)


def warpgroup_slot_bytes(bm: int) -> int:
    """Shared memory of one pipeline slot of `warpgroup_pipelines`: a planar chunk's x, values and scales."""
    return bm * PLANAR_CHUNK * 2 + BN * CHUNK + planar.SCALE_BOX * BN


def warpgroup_pipelines(wgs: int, stages: int, bm: int) -> list:
    """Scratch of `wgs` warpgroups' own `stages`-deep TMA pipelines of planar chunks (`warpgroup_step`): x,
    values and scales slots, and a barrier per slot."""
    return [
        plgpu.SMEM((wgs, stages, bm, PLANAR_CHUNK), jnp.bfloat16, transforms=TRANSFORMS16),  # x
        plgpu.SMEM((wgs, stages, BN, CHUNK), jnp.uint8),  # values, thread order (no swizzle)
        plgpu.SMEM((wgs, stages, planar.SCALE_BOX, BN), jnp.uint8),  # scales
        plgpu.Barrier(num_arrivals=3, num_barriers=wgs * stages),  # a slot's three copies landed
    ]


def warpgroup_step(i, steps, fetch, acc_ref, x_smem, v_smem, s_smem, bars, a_smem, wg, stages: int,
                   how: str) -> None:
    """Step i (of `steps`) of warpgroup `wg`'s own pipeline of planar K chunks (`dense_wgs`,
    `mosaic_gpu_streamk`): waits for its slot to land, decodes the [64, 256] weight tile, adds both planes'
    products to acc [64, bm], then refills the slot with step i + stages (`fetch(step, slot)`) if there is one."""
    slot = jax.lax.rem(i, stages)
    plgpu.barrier_wait(bars.at[wg * stages + slot])
    v, sc = v_smem.at[wg, slot], s_smem.at[wg, slot]
    planes = _decode_tile_ptx(v, sc, 0, 0, how) if how != "jnp" else _decode_tile_jnp(v, sc, 0, 0)
    for p in range(PLANES):
        b = x_smem.at[wg, slot, :, pl.ds(p * PLANAR_HALF, PLANAR_HALF)].transpose((1, 0))  # [128, bm]
        if a_smem:  # interpret mode: the interpreter runs wgmma with A in shared memory only
            a_smem[0].at[wg][...] = planes[p]
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, a_smem[0].at[wg], b)
            plgpu.wgmma_wait(0)
        else:
            plgpu.wgmma(acc_ref, planes[p], b)  # acc [64, bm] += W_p [64, 128] @ x_p.T
    plgpu.wgmma_wait(0)  # the slot's x is read
    plgpu.commit_smem()  # every thread of the warpgroup is done with the slot before the refill

    @pl.when(i + stages < steps)
    def _():
        fetch(i + stages, slot)


def _dense_wgs_kernel(x_gmem, v_gmem, s_gmem, o_gmem, x_smem, v_smem, s_smem, bars, o_smem, red_smem, red_bar,
                      *a_smem, bm: int, wgs: int, stages: int, k: int, m: int, how: str):
    """Dense planar decode with K split across the CTA's warpgroups instead of across CTAs: one CTA per 64 weight
    rows and bm rows of x runs `wgs` warpgroups, warpgroup w streams its own contiguous K range (K / wgs) through
    its own `stages`-deep TMA pipeline (its own shared-memory slots and barriers) into its own accumulator; at the
    end the accumulators meet in shared memory and warpgroup 0 stores their sum as bf16. No split-K partials
    leave the kernel, so a call is this one kernel (the split-K kernel's call adds an XLA sum of its partials:
    1.1-1.8 us on the H200).

    Why not `plgpu.emit_pipeline_warp_specialized` (session 9's version): its compute warpgroups raise their
    registers with setmaxnreg to (512 - memory registers) / wgs each, which for 4 compute warpgroups asks for more
    than the 640 threads' launch allocation (at most 96 per thread) holds; setmaxnreg.inc then waits forever,
    and the H200 run hung twice (eba8829, a2d45b2). Here there is no producer warpgroup and no setmaxnreg: every
    warpgroup issues its own copies, with 65536 / (128 * wgs) registers each."""
    ni, mi, wg = (jax.lax.axis_index(a) for a in ("n", "m", "wg"))
    steps = k // (wgs * PLANAR_CHUNK)  # K chunks per warpgroup
    rows = pl.ds(mi * bm, bm)

    def fetch(i, slot):  # warpgroup wg's chunk i (of its range) -> its slot `slot`
        chunk = wg * steps + i
        bar = bars.at[wg * stages + slot]
        plgpu.copy_gmem_to_smem(x_gmem.at[rows, pl.ds(chunk * PLANAR_CHUNK, PLANAR_CHUNK)], x_smem.at[wg, slot], bar)
        plgpu.copy_gmem_to_smem(v_gmem.at[pl.ds(ni * BN, BN), pl.ds(chunk * CHUNK, CHUNK)], v_smem.at[wg, slot], bar)
        plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(chunk * planar.SCALE_BOX, planar.SCALE_BOX), pl.ds(ni * BN, BN)],
                                s_smem.at[wg, slot], bar)

    for i in range(min(stages, steps)):  # the prologue: the first `stages` chunks in flight
        fetch(i, i)

    def scope(acc_ref):
        def step(i, _):
            warpgroup_step(i, steps, fetch, acc_ref, x_smem, v_smem, s_smem, bars, a_smem, wg, stages, how)

        jax.lax.fori_loop(0, steps, step, None)

        def store(total):
            o_smem.at[0].transpose((1, 0))[...] = total.astype(jnp.bfloat16)  # [bm, 64] <- [64, bm]
            plgpu.commit_smem()
            _store_rows(o_smem, lambda term: o_gmem.at[:, pl.ds(ni * BN, BN)], 0, mi * bm,
                        jnp.minimum(bm, m - mi * bm), bm)

        sum_warpgroups(acc_ref, red_smem, red_bar, wg, wgs, store)

    pl.run_scoped(scope, plgpu.ACC((BN, bm), jnp.float32))


def sum_warpgroups(acc_ref, red_smem, red_bar, wg, wgs: int, finish) -> None:
    """The CTA's warpgroup accumulators acc [64, bm] float32 (one K range each) summed in shared memory:
    warpgroups 1.. leave theirs in red_smem [wgs, 64, bm] and arrive on red_bar; warpgroup 0 waits, adds them to
    its own and calls finish(total)."""

    @pl.when(wg != 0)
    def _():
        red_smem.at[wg][...] = acc_ref[...]
        plgpu.barrier_arrive(red_bar)

    @pl.when(wg == 0)
    def _():
        total = acc_ref[...]
        if wgs > 1:
            plgpu.barrier_wait(red_bar)
        for w in range(1, wgs):
            total = total + plgpu.load(red_smem.at[w], layout=plgpu.Layout.WGMMA)
        finish(total)


def dense_wgs_smem_bytes(wgs: int, stages: int, bm: int) -> int:
    """Shared memory of `dense_wgs_scratch` on the GPU (the interpreter's extra A tiles do not count: it has no
    such limit)."""
    return wgs * stages * warpgroup_slot_bytes(bm) + wgs * BN * bm * 4 + bm * BN * 2


def dense_wgs_scratch(wgs: int, stages: int, bm: int, interpret: bool) -> list:
    """Scratch of a `_dense_wgs_kernel`-shaped kernel (also `experiments/benchmarks/fp4_decode_bounds.py`): the
    warpgroups' pipelines, the output tile, the accumulators `sum_warpgroups` meets in and their barrier, and in
    interpret mode a shared-memory A tile per warpgroup."""
    return [
        *warpgroup_pipelines(wgs, stages, bm),
        plgpu.SMEM((1, bm, BN), jnp.bfloat16),  # the output tile
        plgpu.SMEM((wgs, BN, bm), jnp.float32),  # the accumulators of warpgroups 1..wgs-1
        plgpu.Barrier(num_arrivals=max(wgs - 1, 1)),  # ... are in shared memory
        *([plgpu.SMEM((wgs, BN, CHUNK), jnp.bfloat16, transforms=TRANSFORMS16)] if interpret else []),
    ]


@functools.partial(jax.jit, static_argnames=("wgs", "bm", "stages", "decode", "interpret"))
def dense_wgs(
    x: Float[Array, "m k"],
    values: UInt8[Array, "n kh"],
    scales: UInt8[Array, "kb n"],
    wgs: int = 4,
    bm: int = 16,
    stages: int = 2,
    decode: str = "asm_fused",
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """y = x @ W.T for bf16 x [M, K] and planar W (`planar.PlanarMXFP4`'s values [N, K/2], scales [K/32, N]), K
    split across `wgs` warpgroups of each CTA (`_dense_wgs_kernel`): one kernel, no split-K partials. Needs
    N % 64 == 0 and K % (256 * wgs) == 0; bm is the rows of x per CTA (a multiple of 8, at most 64); `stages` the
    TMA pipeline depth of each warpgroup; `decode` a PTX decoder ("asm_fused" only for scale bytes <= 128,
    `planar.fused_scales_ok`); `interpret` runs the jnp decoder in the Mosaic GPU interpreter."""
    m, k = x.shape
    n = values.shape[0]
    _check_shapes(x, values[None], scales[None], "fp4_matmul (warpgroup split)", True)
    if decode not in ("asm", "asm_lean", "asm_fused"):  # the GPU's word decoders (the interpreter runs jnp)
        raise ValueError(f"dense_wgs: decode must be asm, asm_lean or asm_fused, got {decode!r}")
    if x.dtype != jnp.bfloat16 or k % (PLANAR_CHUNK * wgs) or bm % 8 or not 8 <= bm <= 64 or stages < 1:
        raise ValueError(f"dense_wgs: needs bf16 x, K % {PLANAR_CHUNK * wgs} == 0, bm in 8..64 (a multiple of 8) "
                         f"and stages >= 1, got {jnp.dtype(x.dtype).name}, K={k}, bm={bm}, stages={stages}")
    # the GPU's shared memory (the interpreter's extra A tiles do not count: it has no such limit)
    smem = dense_wgs_smem_bytes(wgs, stages, bm)
    if smem > SMEM_BUDGET:
        raise ValueError(f"dense_wgs: wgs={wgs}, bm={bm}, {stages} stages need {smem} bytes of shared memory "
                         f"(budget {SMEM_BUDGET}): lower bm or stages")
    how = "jnp" if interpret else decode
    body = functools.partial(_dense_wgs_kernel, bm=bm, wgs=wgs, stages=stages, k=k, m=m, how=how)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
        grid=(n // BN, -(-m // bm)),
        grid_names=("n", "m"),
        num_threads=wgs,
        thread_name="wg",
        scratch_types=dense_wgs_scratch(wgs, stages, bm, interpret),
        interpret=_interpret_params(False) if interpret else None,
        kernel_name="fp4_matmul_mosaic_gpu_wgs",
    )
    return call(_tma_rows(x), values, scales)


def _tma_rows(x: jax.Array) -> jax.Array:
    """x [M, K] as a dense kernel's TMA copies may read it: as it is when M < 8 or M % 8 == 0 (a TMA tile of 8
    rows needs one of the two), else padded to a multiple of 8 rows. The copy of the last x tile fills the rows
    past the array with zeros, output row j reads only x row j, and the kernel stores rows < M, so M = 1 needs
    no pad (on the H200 the pad was a 0.7 us XLA kernel, a tenth of the call at K = N = 4096)."""
    m = x.shape[0]
    return jnp.pad(x, ((0, common.round_up(m, ROW_ALIGN) - m), (0, 0))) if m > ROW_ALIGN and m % ROW_ALIGN else x


def _interpret_params(detect_races: bool):
    return plgpu.InterpretGPUParams(uninitialized_memory="nan", detect_races=detect_races)


def _check_shapes(x, values, scales, name: str, planar: bool) -> None:
    """One-line ValueErrors for x's dtype, the tile constraints and the packed fields' shapes in the layout."""
    if x.dtype not in (jnp.bfloat16, jnp.float32):  # wgmma multiplies bf16 terms: a float16 x would lose bits
        raise ValueError(f"{name} mosaic_gpu: x must be bfloat16 or float32, got {jnp.dtype(x.dtype).name}")
    *lead, n, _ = values.shape
    k = x.shape[1]
    if n % BN or k % 256:
        raise ValueError(f"{name} mosaic_gpu: needs N % {BN} == 0 and K % 256 == 0, got N={n}, K={k}")
    blocks = k // common.SCALE_BLOCK
    common.check_packed_fields(values, scales, (*lead, n, k // 2), (*lead, *((blocks, n) if planar else (n, blocks))),
                               f"{name} mosaic_gpu ({'planar' if planar else 'QArray'} layout)")


def _run(x, values, scales, group_sizes, cfg, interpret, a_in_registers, detect_races, packed=None,
         out_dtype=None, dense_rows=None, planar=False, window=False):
    """The kernel on bf16 x [M, K] and experts values [G, N, K/2], scales [G, N, K/32] (`planar`: the
    `planar.PlanarMXFP4` layout, scales [G, K/32, N]) -> [M, N] in `out_dtype` (default x's)."""
    out_dtype = out_dtype or x.dtype
    m, k = x.shape
    g, n = values.shape[:2]
    if a_in_registers is None:
        a_in_registers = not interpret
    if interpret and a_in_registers:
        raise ValueError("fp4_matmul mosaic_gpu: the interpreter runs wgmma with A in shared memory only")
    if interpret and cfg.decode.startswith("asm"):  # the interpreter cannot run PTX: same numbers through jnp
        cfg = dataclasses.replace(cfg, decode="jnp")
    t = tiles(cfg, m, k, a_in_registers, n, out_terms(cfg.split_k, out_dtype),  # shared memory for the most
              PLANAR_MAX_BK if planar else None)
    red_bytes = (t.split - 1) * t.wn * t.bm * 4  # clustered: split 0's slots for the others' float32 sums
    if t.cluster and (interpret or dense_rows is None or not planar  # the interpreter has no cluster stores
                      or smem_bytes(t.bm, t.bk, t.stages, a_in_registers, t.wn, out_terms(1, out_dtype))
                      + red_bytes > SMEM_BUDGET):
        t = dataclasses.replace(t, cluster=False)
    terms = out_terms(1 if t.cluster else t.split, out_dtype)  # the config may need more; the split as fitted decides
    if packed is None:
        packed = m <= PACKED_ROWS_PER_GROUP * g  # few rows per expert: don't stream an expert's weights twice
    body = functools.partial(_kernel, t=t, k=k, num_groups=g, dense_rows=dense_rows, planar=planar)
    if dense_rows is None:
        tt = tile_table(group_sizes, m, t.bm, packed, window)
        table = (tt.table,)
    else:  # the kernel derives dense tiles from the grid: no table operand at all (a placeholder array cost a
        # 0.63 us XLA broadcast kernel per call on the H200, session 8)
        tt, table = TileTable(None, None), ()
        body = functools.partial(body, None)
    num = tt.table.shape[1] if dense_rows is None else -(-m // t.bm)
    scratch = [plgpu.SMEM((terms, t.bm, t.wn), jnp.bfloat16)]
    if t.cluster:  # split 0's slots for the other splits' float32 sums (async stores need tiled, swizzled smem)
        swizzle = min(128, t.bm * 4)
        scratch += [plgpu.SMEM(((t.split - 1) * (t.wn // BN), BN, t.bm), jnp.float32,
                               transforms=(plgpu.TilingTransform((8, swizzle // 4)), plgpu.SwizzleTransform(swizzle))),
                    plgpu.Barrier(num_arrivals=(t.split - 1) * (t.wn // BN))]
    if not a_in_registers:
        scratch.append(plgpu.SMEM((BN, CHUNK), jnp.bfloat16, transforms=TRANSFORMS16))
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((1 if t.cluster else t.split, terms, m, n), jnp.bfloat16),
        # clustered: the grid counts clusters, each the tile's `split` CTAs along "s"
        grid=(n // t.wn, num, 1 if t.cluster else t.split),
        grid_names=("n", "m", "sc" if t.cluster else "s"),
        cluster=(t.split,) if t.cluster else (),
        cluster_names=("s",) if t.cluster else (),
        scratch_types=scratch,
        interpret=_interpret_params(detect_races) if interpret else None,
        kernel_name="fp4_matmul_mosaic_gpu" if g == 1 else "fp4_grouped_mosaic_gpu",
    )
    xb = x.astype(jnp.bfloat16)
    if tt.x_source is not None:  # the padded copy: each group from an aligned row; a tile may overrun by < bm
        src = jnp.concatenate([tt.x_source, jnp.full((t.bm,), m, jnp.int32)])  # row m: out of range, a zero row
        xb = jnp.take(xb, src, axis=0, mode="fill", fill_value=0)
    elif dense_rows is not None and planar:  # dense planar: x as it is where TMA takes it (see `_tma_rows`)
        xb = _tma_rows(xb)
    else:  # grid tiles: whole row blocks; window tiles: whole windows
        rows_p = window_rows(m, t.bm) if packed and window else common.round_up(m, t.bm)
        xb = jnp.pad(xb, ((0, rows_p - m), (0, 0))) if rows_p != m else xb
    if planar:  # the load-time layout: x as it is, scales already [G, K/32, N]
        y = call(*table, xb, values, scales)  # [split, terms, M, N]
    else:  # per call: x's two column planes [2, M, K/2], scales transposed to [G, K/32, N]
        y = call(*table, x_planes2(xb), values, jnp.swapaxes(scales, 1, 2))  # [split, terms, M, N]
    if terms == 1:
        return y[0, 0].astype(out_dtype)
    return jnp.sum(y.astype(jnp.float32), axis=(0, 1)).astype(out_dtype)  # [M, N]


def _split_terms(run, x):
    """float32 x (grouped): wgmma multiplies bf16, so run its three bf16 terms (hi, mid, lo), one launch each
    (stacking them along M would break the rows' group order), and add in float32."""
    m = x.shape[0]
    terms = split_f32(x)  # [3M, K]
    return run(terms[:m]) + run(terms[m : 2 * m]) + run(terms[2 * m :])


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "a_in_registers", "detect_races", "planar"))
def dense(
    x: Float[Array, "m k"],
    values: UInt8[Array, "n kh"],
    scales: UInt8[Array, "s0 s1"],  # [N, K/32], or [K/32, N] planar
    cfg: BlockConfig,
    interpret: bool = False,
    a_in_registers: bool | None = None,
    detect_races: bool = False,
    planar: bool = False,
) -> Float[Array, "m n"]:
    """y = x @ W.T for x [M, K] (bf16 or f32), W given as packed `values` [N, K/2] and E8M0 `scales` [N, K/32]
    (a QArray's fields), or with `planar` as a `planar.PlanarMXFP4`'s fields (scales [K/32, N]).

    Needs N % 64 == 0 and K % 256 == 0. `a_in_registers` (default: True unless `interpret`) feeds the decoded
    weights to wgmma from registers; False stages them through shared memory (what the interpreter runs).
    Interpret mode fills the output buffer with NaN first (an unwritten element shows), and `detect_races`
    asks the interpreter to check the pipeline's barriers for shared-memory races.
    """
    m = x.shape[0]
    _check_shapes(x, values, scales, "fp4_matmul", planar)
    xb = split_f32(x) if x.dtype == jnp.float32 else x  # f32: its 3 bf16 terms stacked along M, one launch
    rows = xb.shape[0]
    y = _run(xb.astype(jnp.bfloat16), values[None], scales[None], jnp.full((1,), rows, jnp.int32), cfg,
             interpret, a_in_registers, detect_races, packed=False, out_dtype=x.dtype, dense_rows=rows,
             planar=planar)
    return y[:m] + y[m : 2 * m] + y[2 * m :] if x.dtype == jnp.float32 else y  # [M, N]


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "a_in_registers", "detect_races", "packed",
                                             "planar", "window"))
def grouped(
    x: Float[Array, "m k"],
    values: UInt8[Array, "g n kh"],
    scales: UInt8[Array, "g s0 s1"],  # [G, N, K/32], or [G, K/32, N] planar
    group_sizes: jax.Array,
    cfg: BlockConfig,
    interpret: bool = False,
    a_in_registers: bool | None = None,
    detect_races: bool = False,
    packed: bool | None = None,
    planar: bool = False,
    window: bool | None = None,
) -> Float[Array, "m n"]:
    """y[rows of g] = x[rows] @ W[g].T; x [M, K] sorted by group, W [G, N, K] as packed `values` [G, N, K/2]
    and E8M0 `scales` [G, N, K/32] (`planar`: [G, K/32, N], see `dense`); rows past sum(group_sizes) are zero.

    Tiles from `tile_table` (`packed`: None picks packed tiles when M <= 8 rows per expert; `window`: packed
    tiles that read x as it is, with no padded copy, default `cfg.window`); each tile stores only its own rows,
    straight into y.
    Same constraints and options as `dense`; an f32 x runs as its three bf16 terms, one launch each.
    """
    _check_shapes(x, values, scales, "fp4_grouped_matmul", planar)
    run = lambda xb: _run(xb, values, scales, group_sizes, cfg, interpret, a_in_registers, detect_races, packed,
                          out_dtype=x.dtype, planar=planar, window=cfg.window if window is None else window)
    return _split_terms(run, x) if x.dtype == jnp.float32 else run(x)
