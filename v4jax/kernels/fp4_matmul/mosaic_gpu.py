"""Pallas Mosaic GPU (Hopper) MXFP4 x bf16 dense matmul: TMA pipeline, in-register decode, wgmma.

Hopper has no FP4 tensor cores, so each CTA (one warpgroup) streams its packed weight tiles through shared
memory with TMA copies (`plgpu.emit_pipeline`, `num_stages` deep), decodes them in registers to bf16 and
feeds `wgmma` with float32 accumulators. Swap-AB: the decoded weights are wgmma's A operand (64 rows of N,
the wgmma M tile) and the activations its B operand, so a decode-sized M (1..64 rows, padded to a multiple
of 8, wgmma's smallest N) costs no padding to 64 rows: the bytes, not the FLOPs, bound it.

Layout (why bytes): the packed uint8 tile goes to shared memory by TMA as it is stored (no per-call XLA
bitcast or copy of the weights: the kernel's only weight traffic is one read of values + scales). Loaded in
the WGMMA register layout, each register tile covers 8 consecutive bytes of a row = 16 K elements, half an
E8M0 scale block, so each row's scale is constant over a register tile: a [64] row vector broadcast over 16
columns (`_tile_scales`), with no gather. Byte b holds K elements 2b (low nibble, plane 0) and 2b+1 (high,
plane 1); a plane decodes with shifts and masks through the float16 bit pattern (as
`common.decode_plane`: exact, E2M1 subnormal included), and the activations come split into the same 2
column planes, so y.T = W_0 @ x_0.T + W_1 @ x_1.T keeps the K order. Each pipeline step decodes its tile in
chunks of 128 bytes per row (8 scale blocks) to bound the live registers. The scales are read transposed
([K/32, N], a small XLA transpose: 1/16 of the packed bytes) so that one scale block of a tile is one
contiguous row.

A operand: in registers on the GPU (`a_in_registers`, the fast path: no shared-memory round trip). The
Mosaic GPU interpreter (jax 0.11.2) only runs wgmma with A in shared memory, so interpret mode stores the
decoded tile to shared memory first; everything else (TMA pipeline, decode, scales, B operand, epilogue)
is the same code. Both variants lower for CUDA without a GPU (tests/kernels/test_fp4_matmul_mosaic_gpu.py).

Float32 x: wgmma multiplies bf16 (or tf32) operands, so an f32 x is split into three bf16 terms
(x = hi + mid + lo: 3 x 8 significand bits, float32's 24) stacked along M; the decoded weights are exact in bf16
(2-bit significands, power-of-two scales), so the f32 result matches the reference to float32 rounding.
At decode sizes this triples only the (tiny) activation bytes, not the weight bytes.

Not yet measured on a GPU (no device time in the session that wrote it): speed, and the register-A wgmma
path numerically (`experiments/benchmarks/fp4_matmul.py --sections decode --mosaic` times and checks both
A variants beside the Triton rows). Only the "dense" op; grouped stays on Triton. Leads for that session,
unmeasured: the jnp decode costs about 10 scalar ops per element (20 per packed byte), which at one op per
lane per cycle caps the kernel near 1.6 TB/s of packed bytes on 132 SMs (less where integer ops run at
half rate), so the next step is likely a bf16x2 decoder in inline PTX (`plgpu.inline_mgpu`, as Mosaic's
own int4 -> bf16 upcast does; GPU-only, the interpreter cannot run it); the XLA ops around the call (x planes, scales.T, the split-K sum and the
output transpose) are small but each is a launch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, UInt8

from v4jax.kernels.fp4_matmul import common
from v4jax.kernels.fp4_matmul.block_sizes import BlockConfig

PLANES = 2  # nibbles per packed byte: the number of column planes
BN = 64  # weight rows per CTA: the wgmma M tile of one warpgroup
CHUNK = 128  # packed bytes per row decoded at once (256 K elements, 8 scale blocks): bounds live registers
BYTES_PER_SCALE = common.BYTES_PER_SCALE  # 16 packed bytes share one E8M0 scale
SWIZZLE = 128  # bytes per swizzled shared-memory row
TRANSFORMS8 = (plgpu.TilingTransform((8, SWIZZLE)), plgpu.SwizzleTransform(SWIZZLE))  # uint8 tiles
TRANSFORMS16 = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))  # bf16 tiles
SMEM_BUDGET = 200 * 1024  # bytes of shared memory a CTA may use (the H200 allows 227 KiB)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch's tiling: rows of x per CTA (wgmma N), K per pipeline step, K splits, pipeline depth."""

    bm: int
    bk: int
    split: int
    stages: int


def smem_bytes(bm: int, bk: int, stages: int, a_in_registers: bool) -> int:
    """Shared memory of one CTA: `stages` pipeline buffers (x planes bf16, half-words, scales), the decoded
    A tile when it is staged in shared memory, and the float32 output tile."""
    per_stage = bm * bk * 2 + BN * (bk // PLANES) + (bk // common.SCALE_BLOCK) * BN
    a_buf = 0 if a_in_registers else BN * CHUNK * 2
    return stages * per_stage + a_buf + BN * bm * 4


def tiles(cfg: BlockConfig, m: int, k: int, a_in_registers: bool) -> Tiles:
    """Fit `cfg` to the shape: bm = M rounded up to 8 (at most block_m, at most 256), bk a power of two
    >= 256 dividing K and fitting `stages` pipeline buffers in shared memory, split | K/bk."""
    bm = min(common.round_up(max(m, 1), 8), max(8, common.round_up(cfg.block_m, 8)), 256)
    stages = max(1, cfg.num_stages)
    smem = lambda bk, st: smem_bytes(bm, bk, st, a_in_registers)
    bk = 256
    while bk * 2 <= cfg.block_k and k % (bk * 2) == 0 and smem(bk * 2, stages) <= SMEM_BUDGET:
        bk *= 2
    while stages > 1 and smem(bk, stages) > SMEM_BUDGET:
        stages -= 1
    steps = k // bk
    split = max(d for d in range(1, max(1, cfg.split_k) + 1) if steps % d == 0)
    return Tiles(bm=bm, bk=bk, split=split, stages=min(stages, steps // split))


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


def _tile_scales(s_smem, g0: int, groups: int) -> jax.Array:
    """Scale blocks g0 .. g0 + groups of the tile [G, 64] uint8 (transposed: one scale block per row) ->
    float32 [64, 16 * groups] in the WGMMA layout: block g repeated over its 16 byte columns (2 register tiles)."""
    cols = []
    for g in range(g0, g0 + groups):
        row = plgpu.load(s_smem.at[g], layout=plgpu.Layout.WGMMA.reduce(1))  # [64] uint8, one per weight row
        sc = common.e8m0_to_f32(row)  # [64] float32
        cols.append(jnp.broadcast_to(sc[:, None], (BN, BYTES_PER_SCALE)))  # [64, 16]
    return jnp.concatenate(cols, axis=1)  # [64, 16 * groups]


def _kernel(x_gmem, v_gmem, s_gmem, o_gmem, o_smem, *a_smem, t: Tiles, k: int):
    """One CTA: weight rows [n*64, n*64 + 64) x activation rows [m*bm, m*bm + bm), K split `s`."""
    bm, bk = t.bm, t.bk
    kb = bk // PLANES  # packed bytes per row per K step
    groups = bk // common.SCALE_BLOCK
    steps = k // bk // t.split
    ni, mi, si = (jax.lax.axis_index(a) for a in ("n", "m", "s"))

    def scope(acc_ref):
        def body(_, x_smem, v_smem, s_smem):
            for c in range(kb // CHUNK):  # K chunks of 128 bytes: bounds the registers a decoded chunk needs
                cols = pl.ds(c * CHUNK, CHUNK)
                byte = plgpu.load(v_smem.at[:, cols], layout=plgpu.Layout.WGMMA)  # [64, 128] uint8
                byte = byte.astype(jnp.uint16)
                scale = _tile_scales(s_smem, c * CHUNK // BYTES_PER_SCALE, CHUNK // BYTES_PER_SCALE)  # [64, 128]
                for p in range(PLANES):
                    a = decode_plane16(byte, p, scale)  # [64, 128] bf16: W[n rows, K columns 2b + p]
                    b = x_smem.at[p, :, cols].transpose((1, 0))  # [128, bm]: x plane p, transposed view
                    if a_smem:  # interpret mode: the interpreter runs wgmma with A in shared memory only
                        a_smem[0][...] = a
                        plgpu.commit_smem()
                        plgpu.wgmma(acc_ref, a_smem[0], b)  # acc [64, bm] += W_p [64, 128] @ x_p.T
                        plgpu.wgmma_wait(0)  # the A buffer is rewritten next
                    else:
                        plgpu.wgmma(acc_ref, a, b)  # acc [64, bm] += W_p [64, 128] @ x_p.T, A in registers
            plgpu.wgmma_wait(0)

        k0 = si * steps
        plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((PLANES, bm, kb), lambda kk: (0, mi, k0 + kk), transforms=TRANSFORMS16),
                plgpu.BlockSpec((BN, kb), lambda kk: (ni, k0 + kk), transforms=TRANSFORMS8),
                plgpu.BlockSpec((groups, BN), lambda kk: (k0 + kk, ni)),
            ],
            max_concurrent_steps=t.stages,
        )(x_gmem, v_gmem, s_gmem)
        o_smem[...] = acc_ref[...]  # [64, bm] float32

    pl.run_scoped(scope, plgpu.ACC((BN, bm), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * BN, BN), pl.ds(mi * bm, bm)])
    plgpu.wait_smem_to_gmem(0)


def _interpret_params(detect_races: bool):
    return plgpu.InterpretGPUParams(uninitialized_memory="nan", detect_races=detect_races)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret", "a_in_registers", "detect_races"))
def dense(
    x: Float[Array, "m k"],
    values: UInt8[Array, "n kh"],
    scales: UInt8[Array, "n kb"],
    cfg: BlockConfig,
    interpret: bool = False,
    a_in_registers: bool | None = None,
    detect_races: bool = False,
) -> Float[Array, "m n"]:
    """y = x @ W.T for x [M, K] (bf16 or f32), W given as packed `values` [N, K/2] and E8M0 `scales` [N, K/32].

    Needs N % 64 == 0 and K % 256 == 0. `a_in_registers` (default: True unless `interpret`) feeds the decoded
    weights to wgmma from registers; False stages them through shared memory (what the interpreter runs).
    Interpret mode fills the output buffer with NaN first (an unwritten element shows), and `detect_races`
    asks the interpreter to check the pipeline's barriers for shared-memory races.
    """
    m, k = x.shape
    n = values.shape[0]
    if n % BN or k % 256:
        raise ValueError(f"fp4_matmul mosaic_gpu: needs N % {BN} == 0 and K % 256 == 0, got N={n}, K={k}")
    if a_in_registers is None:
        a_in_registers = not interpret
    if interpret and a_in_registers:
        raise ValueError("fp4_matmul mosaic_gpu: the interpreter runs wgmma with A in shared memory only")
    xb = split_f32(x) if x.dtype == jnp.float32 else x.astype(jnp.bfloat16)  # [T*M, K], T terms
    rows = xb.shape[0]
    t = tiles(cfg, rows, k, a_in_registers)
    mp = common.round_up(rows, t.bm)
    xb = jnp.pad(xb, ((0, mp - rows), (0, 0))) if mp != rows else xb
    scratch = [plgpu.SMEM((BN, t.bm), jnp.float32)]
    if not a_in_registers:
        scratch.append(plgpu.SMEM((BN, CHUNK), jnp.bfloat16, transforms=TRANSFORMS16))
    call = plgpu.kernel(
        functools.partial(_kernel, t=t, k=k),
        out_type=jax.ShapeDtypeStruct((t.split, n, mp), jnp.float32),
        grid=(n // BN, mp // t.bm, t.split),
        grid_names=("n", "m", "s"),
        scratch_types=scratch,
        interpret=_interpret_params(detect_races) if interpret else None,
        kernel_name="fp4_matmul_mosaic_gpu",
    )
    yt = call(x_planes2(xb), values, scales.T)  # [split, N, Mp] float32 partial sums
    y = jnp.sum(yt, axis=0).T[:rows]  # [T*M, N]
    if x.dtype == jnp.float32:
        y = y[:m] + y[m : 2 * m] + y[2 * m :]  # the three bf16 terms of x
    return y.astype(x.dtype)
