"""Stream-K dense FP4 decode for Mosaic GPU (Hopper): every warpgroup of a persistent grid streams an equal
share of all (weight tile, K chunk) steps, so all SMs stay busy whatever N / 64 is.

Why: the other dense decode kernels give each CTA whole 64-row weight tiles (`mosaic_gpu.dense_wgs`) or whole
K splits of one (`mosaic_gpu.dense`). At K = N = 7168 the first runs 112 CTAs on the H200's 132 SMs (20 idle);
at 4096 the second fills the SMs with 8 K splits per tile, whose partial sums cost an XLA reduction (1.0-1.5 us,
a sixth of the call). Here the S = tiles x chunks steps, in tile-major order, are cut into `ctas` x `wgs`
contiguous ranges of S / (ctas x wgs) steps, one per warpgroup; a CTA's range is at most one tile long, so it
touches at most two tiles (`plan`).

The partial sums of a tile meet inside the kernel:
- in a CTA, the warpgroups' accumulators meet in shared memory (as in `dense_wgs`);
- across CTAs, the CTA that holds a tile's last chunk finishes the tile (the finisher). Each other CTA that
  touches the tile (at most one partial per CTA: the tile it starts or ends in and does not finish) stores
  its float32 sums to a workspace slot of its own by TMA and signals the tile's semaphore; the finisher adds
  its own sums, waits for the count of CTAs before it on that tile, reads their slots and stores bf16.
  Finishers wait only on CTAs of lower index. CUDA starts a grid's CTAs in index order (an assumption the
  usual stream-K kernels share; not a documented guarantee), and a grid that fits on the SMs at once is
  co-resident anyway, so no finisher waits for a CTA that cannot start: no deadlock.
- Ordering: a partial is written by the async (TMA) proxy and signalled by a release; the finisher acquires,
  then reads by TMA. A `fence.proxy.async.global` on each side orders the two proxies (PTX memory model).

The semaphores are `pl.get_global` (the pallas call zeroes them; a wait decrements its count, so they also end
at zero). The Mosaic GPU interpreter has no semaphores and runs the grid's CTAs one after the other in index
order, so in interpret mode the waits, signals and fences are left out: every partial a finisher reads was
written by a CTA that ran before it. Everything else (the plan, pipelines, workspace, sums) runs there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, UInt8

from v4jax.kernels.fp4_matmul import planar
from v4jax.kernels.fp4_matmul.mosaic_gpu import (
    BN,
    CHUNK,
    PLANAR_CHUNK,
    SMEM_BUDGET,
    TRANSFORMS16,
    _check_shapes,
    _interpret_params,
    _store_rows,
    _tma_rows,
    warpgroup_pipelines,
    warpgroup_slot_bytes,
    warpgroup_step,
)

MAX_ROWS = 64  # rows of x: one tile of x per CTA (wgmma's N), the decode sizes this kernel is for


class Plan(NamedTuple):
    """One CTA's share (`plan`): its warpgroup's steps [lo, mid) of tile `tile` and [mid, hi) of `tile + 1`;
    whether the CTA finishes `tile` (holds its last chunk) and how many CTAs before it hold partials of it;
    whether it sends a partial, and of which tile."""
    lo: jax.Array
    mid: jax.Array
    hi: jax.Array
    tile: jax.Array
    finishes: jax.Array
    waits_for: jax.Array
    sends: jax.Array
    send_tile: jax.Array


def plan(cta, wg, *, tiles: int, chunks: int, ctas: int, wgs: int) -> Plan:
    """The stream-K split of `tiles` x `chunks` steps over `ctas` CTAs of `wgs` warpgroups, for CTA `cta` and
    warpgroup `wg` (ints or int32 arrays: the kernel calls it on its axis indices, the tests on every pair).
    Needs every warpgroup to get at least one step and every CTA at most `chunks` (`check_plan`)."""
    steps, w = tiles * chunks, ctas * wgs
    g = cta * wgs + wg
    lo, hi = g * steps // w, (g + 1) * steps // w  # this warpgroup's steps
    first, last = cta * steps // ctas, (cta + 1) * steps // ctas  # this CTA's steps
    tile = first // chunks
    boundary = (tile + 1) * chunks  # the step where the CTA's second tile (if any) starts
    mid = jnp.minimum(jnp.maximum(boundary, lo), hi)
    finishes = boundary <= last
    cta_of_first = ((tile * chunks + 1) * ctas + steps - 1) // steps - 1  # the CTA holding `tile`'s first step
    sends = jnp.logical_or(jnp.logical_not(finishes), last > boundary)
    return Plan(lo, mid, hi, tile, finishes, cta - cta_of_first, sends, jnp.where(finishes, tile + 1, tile))


def check_plan(tiles: int, chunks: int, ctas: int, wgs: int) -> None:
    """Raises unless `plan` holds for these sizes: at least one step per warpgroup, at most `chunks` per CTA."""
    steps = tiles * chunks
    lo, hi = -(-steps // chunks), steps // wgs  # the ctas this split allows
    if lo > hi:
        raise ValueError(f"dense_streamk: {tiles} tiles x {chunks} K chunks cannot give each of {wgs} warpgroups "
                         f"per CTA a step with at most {chunks} per CTA: lower wgs")
    if not lo <= ctas <= hi:
        raise ValueError(f"dense_streamk: {tiles} tiles x {chunks} K chunks over {ctas} CTAs x {wgs} warpgroups: "
                         f"needs 1 step per warpgroup and at most {chunks} per CTA, i.e. ctas in {lo}..{hi}")


def max_waits(tiles: int, chunks: int, ctas: int, wgs: int) -> int:
    """The most partials one finisher reads (static: the kernel's shared-memory slots for them)."""
    p = plan(np.arange(ctas), 0, tiles=tiles, chunks=chunks, ctas=ctas, wgs=wgs)
    return int(np.max(np.where(p.finishes, p.waits_for, 0)))


def _fence_proxy_async_global() -> None:
    """Orders this thread's generic-proxy synchronization with async-proxy (TMA) global memory accesses."""
    @plgpu.inline_mgpu()
    def fence(ctx):
        mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

    fence()


def _kernel(x_gmem, v_gmem, s_gmem, o_gmem, ws_gmem, x_smem, v_smem, s_smem, bars, o_smem, red_smem, red_bar,
            part_smem, in_smem, in_bars, *a_smem, tiles: int, chunks: int, ctas: int, wgs: int, stages: int,
            waits: int, bm: int, m: int, how: str, interpret: bool):
    """One CTA of the stream-K grid (module docstring): warpgroup `wg` streams its steps through its own TMA
    pipeline (as in `dense_wgs`) into one accumulator per tile it touches; warpgroup 0 sums the CTA's
    accumulators per tile, sends the partial it does not finish and finishes the tile it does."""
    c, wg = jax.lax.axis_index("c"), jax.lax.axis_index("wg")
    p = plan(c, wg, tiles=tiles, chunks=chunks, ctas=ctas, wgs=wgs)
    count = p.hi - p.lo
    sems = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR((tiles,)))

    def fetch(i, slot):  # this warpgroup's i-th step -> its slot `slot`
        step = p.lo + i
        tile, chunk = step // chunks, jax.lax.rem(step, chunks)
        bar = bars.at[wg * stages + slot]
        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(0, bm), pl.ds(chunk * PLANAR_CHUNK, PLANAR_CHUNK)],
                                x_smem.at[wg, slot], bar)
        plgpu.copy_gmem_to_smem(v_gmem.at[pl.ds(tile * BN, BN), pl.ds(chunk * CHUNK, CHUNK)], v_smem.at[wg, slot],
                                bar)
        plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(chunk * planar.SCALE_BOX, planar.SCALE_BOX), pl.ds(tile * BN, BN)],
                                s_smem.at[wg, slot], bar)

    for i in range(stages):  # the prologue: the first `stages` steps in flight
        @pl.when(i < count)
        def _(i=i):
            fetch(i, i)

    def segment(start, stop):  # steps [start, stop) of this warpgroup's range, into a fresh accumulator
        def scope(acc_ref):
            def step(i, _):
                warpgroup_step(i, count, fetch, acc_ref, x_smem, v_smem, s_smem, bars, a_smem, wg, stages, how)

            jax.lax.fori_loop(start, stop, step, None)
            return acc_ref[...]
        return pl.run_scoped(scope, plgpu.ACC((BN, bm), jnp.float32))

    sums = segment(0, p.mid - p.lo), segment(p.mid - p.lo, count)  # [64, bm] float32 for tile, tile + 1

    @pl.when(wg != 0)
    def _():
        for t in range(2):
            red_smem.at[t, wg][...] = sums[t]
        plgpu.barrier_arrive(red_bar)

    @pl.when(wg == 0)
    def _():
        if wgs > 1:
            plgpu.barrier_wait(red_bar)
        total = [sums[t] + sum(plgpu.load(red_smem.at[t, w], layout=plgpu.Layout.WGMMA)
                               for w in range(1, wgs)) for t in range(2)]

        def send(partial, tile):  # this CTA's partial of `tile` -> its workspace slot, then the tile's semaphore
            part_smem[...] = partial
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(part_smem, ws_gmem.at[c])
            plgpu.wait_smem_to_gmem(0)
            if not interpret:
                _fence_proxy_async_global()
                plgpu.semaphore_signal(sems.at[tile], 1, memory_scope="gpu")

        for t, when in ((0, jnp.logical_not(p.finishes)), (1, jnp.logical_and(p.finishes, p.sends))):
            pl.when(when)(functools.partial(send, total[t], p.send_tile))

        @pl.when(p.finishes)
        def _():
            if not interpret:
                @pl.when(p.waits_for > 0)
                def _():
                    plgpu.semaphore_wait(sems.at[p.tile], p.waits_for, memory_scope="gpu")
                _fence_proxy_async_global()
            out = total[0]
            for j in range(waits):  # the partials of the CTAs before this one on the tile, all in flight at once
                @pl.when(j < p.waits_for)
                def _(j=j):
                    plgpu.copy_gmem_to_smem(ws_gmem.at[c - 1 - j], in_smem.at[j], in_bars.at[j])

                @pl.when(j >= p.waits_for)
                def _(j=j):  # an unused slot adds zeros (each thread reads back what it wrote: no barrier)
                    in_smem.at[j][...] = plgpu.layout_cast(jnp.zeros((BN, bm), jnp.float32), plgpu.Layout.WGMMA)
            for j in range(waits):
                @pl.when(j < p.waits_for)
                def _(j=j):
                    plgpu.barrier_wait(in_bars.at[j])
                out = out + plgpu.load(in_smem.at[j], layout=plgpu.Layout.WGMMA)
            o_smem.at[0].transpose((1, 0))[...] = out.astype(jnp.bfloat16)  # [bm, 64] <- [64, bm]
            plgpu.commit_smem()
            _store_rows(o_smem, lambda term: o_gmem.at[:, pl.ds(p.tile * BN, BN)], 0, 0, jnp.int32(m), bm)


@functools.partial(jax.jit, static_argnames=("ctas", "wgs", "stages", "decode", "interpret"))
def dense_streamk(
    x: Float[Array, "m k"],
    values: UInt8[Array, "n kh"],
    scales: UInt8[Array, "kb n"],
    ctas: int,
    wgs: int = 4,
    stages: int = 2,
    decode: str = "asm_fused",
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """y = x @ W.T for bf16 x [M <= 64, K] and planar W (`planar.PlanarMXFP4`'s values [N, K/2], scales
    [K/32, N]) in one stream-K kernel of `ctas` CTAs x `wgs` warpgroups (module docstring; the H200 run used
    1 and 2 CTAs per SM: finishers wait only for CTAs of lower index). Needs N % 64 == 0, K % 256 == 0,
    and between one step and one tile's K per warpgroup / CTA (`check_plan`); `stages` is each warpgroup's TMA
    pipeline depth, `decode` a PTX decoder ("asm_fused" only for scale bytes <= 128); `interpret` runs the jnp
    decoder in the Mosaic GPU interpreter, without semaphores (module docstring)."""
    m, k = x.shape
    n = values.shape[0]
    _check_shapes(x, values[None], scales[None], "fp4_matmul (stream-K)", True)
    if decode not in ("asm", "asm_lean", "asm_fused"):
        raise ValueError(f"dense_streamk: decode must be asm, asm_lean or asm_fused, got {decode!r}")
    if x.dtype != jnp.bfloat16 or m > MAX_ROWS or k % PLANAR_CHUNK or stages < 1 or wgs < 1:
        raise ValueError(f"dense_streamk: needs bf16 x with at most {MAX_ROWS} rows, K % {PLANAR_CHUNK} == 0, stages "
                         f">= 1 and wgs >= 1, got {jnp.dtype(x.dtype).name} [{m}, {k}], stages={stages}, wgs={wgs}")
    tiles, chunks = n // BN, k // PLANAR_CHUNK
    check_plan(tiles, chunks, ctas, wgs)
    waits = max_waits(tiles, chunks, ctas, wgs)
    bm = max(8, -(-m // 8) * 8)  # rows of x per tile (wgmma N: a multiple of 8)
    smem = (wgs * stages * warpgroup_slot_bytes(bm) + 2 * wgs * BN * bm * 4 + (1 + max(waits, 1)) * BN * bm * 4
            + bm * BN * 2)  # pipelines, warpgroup sums, sent and received partials, output tile
    if smem > SMEM_BUDGET:
        raise ValueError(f"dense_streamk: wgs={wgs}, {bm} rows, {stages} stages need {smem} bytes of shared memory "
                         f"(budget {SMEM_BUDGET}): lower wgs or stages")
    how = "jnp" if interpret else decode
    body = functools.partial(_kernel, tiles=tiles, chunks=chunks, ctas=ctas, wgs=wgs, stages=stages, waits=waits,
                             bm=bm, m=m, how=how, interpret=interpret)
    call = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
                  jax.ShapeDtypeStruct((ctas, BN, bm), jnp.float32)),  # the workspace: one partial per CTA
        grid=(ctas,),
        grid_names=("c",),
        num_threads=wgs,
        thread_name="wg",
        scratch_types=[
            *warpgroup_pipelines(wgs, stages, bm),
            plgpu.SMEM((1, bm, BN), jnp.bfloat16),  # the output tile
            plgpu.SMEM((2, wgs, BN, bm), jnp.float32),  # warpgroups 1..wgs-1's sums of the CTA's two tiles
            plgpu.Barrier(num_arrivals=max(wgs - 1, 1)),  # ... are in shared memory
            plgpu.SMEM((BN, bm), jnp.float32),  # the partial this CTA sends
            plgpu.SMEM((max(waits, 1), BN, bm), jnp.float32),  # the partials a finisher reads
            plgpu.Barrier(num_arrivals=1, num_barriers=max(waits, 1)),  # ... landed
            *([plgpu.SMEM((wgs, BN, CHUNK), jnp.bfloat16, transforms=TRANSFORMS16)] if interpret else []),
        ],
        interpret=_interpret_params(False) if interpret else None,
        kernel_name="fp4_matmul_mosaic_gpu_streamk",
    )
    y, _ = call(_tma_rows(x), values, scales)
    return y
