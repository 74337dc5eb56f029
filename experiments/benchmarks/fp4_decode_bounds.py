"""What bounds the dense FP4 decode (issue 6: M <= 16, K = N = 4096 / 7168) on the H200: the same TMA pipeline
as `mosaic_gpu.dense_wgs`, with the work per step taken away piece by piece.

`bounds_kernel(x, values, scales, mode=..., split=..., wgs=..., stages=...)` runs one CTA per 64 weight rows and
K split `split` ways across CTAs; each CTA's `wgs` warpgroups stream their own K ranges through their own
`stages`-deep pipelines of planar chunks ([64, 256] weights, their scales, x's [bm, 256] slice: the bytes of
`dense_wgs`'s steps). Per step, by `mode`:
  "stream":   wait for the slot, refill it: the copies alone (no shared-memory reads, no wgmma);
  "nodecode": the thread's 16-byte loads of the values and the wgmmas, fed the loaded words as they are
              (`_decode_tile_ptx(how="raw")`: no scale loads, no decode arithmetic);
  "full":     `mosaic_gpu.warpgroup_step` with the one-FMA decoder: `dense_wgs`'s work (exact for scale bytes
              <= 128; "jnp" in the interpreter).
Each CTA stores its warpgroups' sum as bf16 into out [split, bm, N], so "full" summed over split is x @ W.T
(the test checks it); the other modes store garbage or zeros, read by nobody. The kernel time of "stream" is the
best any kernel of that shape can do on these bytes; "full" - "nodecode" is the decode's share.

Not part of the package: a measurement, driven by `fp4_mosaic_probe.py --parts bounds`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, UInt8

from v4jax.kernels.fp4_matmul import mosaic_gpu as mg
from v4jax.kernels.fp4_matmul import planar

MODES = ("stream", "nodecode", "full")


def _bounds_kernel(x_gmem, v_gmem, s_gmem, o_gmem, x_smem, v_smem, s_smem, bars, o_smem, red_smem, red_bar,
                   *a_smem, bm: int, wgs: int, stages: int, k: int, split: int, mode: str, how: str):
    ni, si, wg = (jax.lax.axis_index(a) for a in ("n", "s", "wg"))
    steps = k // (split * wgs * mg.PLANAR_CHUNK)  # K chunks per warpgroup

    def fetch(i, slot):  # chunk i of warpgroup wg's range in split si -> its slot `slot` (as in dense_wgs)
        chunk = (si * wgs + wg) * steps + i
        bar = bars.at[wg * stages + slot]
        plgpu.copy_gmem_to_smem(x_gmem.at[:, pl.ds(chunk * mg.PLANAR_CHUNK, mg.PLANAR_CHUNK)], x_smem.at[wg, slot],
                                bar)
        plgpu.copy_gmem_to_smem(v_gmem.at[pl.ds(ni * mg.BN, mg.BN), pl.ds(chunk * mg.CHUNK, mg.CHUNK)],
                                v_smem.at[wg, slot], bar)
        plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(chunk * planar.SCALE_BOX, planar.SCALE_BOX),
                                          pl.ds(ni * mg.BN, mg.BN)], s_smem.at[wg, slot], bar)

    for i in range(min(stages, steps)):
        fetch(i, i)

    def store(total):  # [64, bm] float32 -> out[si, :, this CTA's 64 columns] as bf16
        o_smem.at[0].transpose((1, 0))[...] = total.astype(jnp.bfloat16)  # [bm, 64] <- [64, bm]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[0], o_gmem.at[si, :, pl.ds(ni * mg.BN, mg.BN)])
        plgpu.wait_smem_to_gmem(0)

    if mode == "stream":
        def stream_step(i, _):
            slot = jax.lax.rem(i, stages)
            plgpu.barrier_wait(bars.at[wg * stages + slot])

            @pl.when(i + stages < steps)
            def _():
                fetch(i + stages, slot)

        jax.lax.fori_loop(0, steps, stream_step, None)

        @pl.when(wg == 0)
        def _():
            store(plgpu.layout_cast(jnp.zeros((mg.BN, bm), jnp.float32), plgpu.Layout.WGMMA))
        return

    def scope(acc_ref):
        def step(i, _):
            mg.warpgroup_step(i, steps, fetch, acc_ref, x_smem, v_smem, s_smem, bars, a_smem, wg, stages, how)

        jax.lax.fori_loop(0, steps, step, None)
        mg.sum_warpgroups(acc_ref, red_smem, red_bar, wg, wgs, store)

    pl.run_scoped(scope, plgpu.ACC((mg.BN, bm), jnp.float32))


@functools.partial(jax.jit, static_argnames=("mode", "split", "wgs", "stages", "interpret"))
def bounds_kernel(x: Float[Array, "bm k"], values: UInt8[Array, "n kh"], scales: UInt8[Array, "kb n"],
                  mode: str = "full", split: int = 1, wgs: int = 4, stages: int = 2,
                  interpret: bool = False) -> Float[Array, "split bm n"]:
    """x bf16 [bm, K] (bm a multiple of 8, at most 64: pad x first), planar W (values [N, K/2], scales [K/32, N])
    -> out bf16 [split, bm, N], per-split partial products for "full" (see the module docstring)."""
    bm, k = x.shape
    n = values.shape[0]
    if mode not in MODES:
        raise ValueError(f"bounds_kernel: mode must be one of {MODES}, got {mode!r}")
    if x.dtype != jnp.bfloat16 or bm % 8 or not 8 <= bm <= 64 or n % mg.BN or k % (split * wgs * mg.PLANAR_CHUNK):
        raise ValueError(f"bounds_kernel: needs bf16 x with bm in 8..64 (a multiple of 8), N % 64 == 0 and "
                         f"K % (256 * split * wgs) == 0, got {jnp.dtype(x.dtype).name} x [{bm}, {k}], N={n}, "
                         f"split={split}, wgs={wgs}")
    if values.shape != (n, k // 2) or scales.shape != (k // 32, n):
        raise ValueError(f"bounds_kernel: planar values [N, K/2] and scales [K/32, N] expected, got "
                         f"{values.shape} and {scales.shape}")
    if (smem := mg.dense_wgs_smem_bytes(wgs, stages, bm)) > mg.SMEM_BUDGET:
        raise ValueError(f"bounds_kernel: wgs={wgs}, {stages} stages need {smem} bytes of shared memory "
                         f"(budget {mg.SMEM_BUDGET})")
    if interpret and mode == "nodecode":
        raise ValueError("bounds_kernel: 'nodecode' feeds wgmma raw words through PTX loads: GPU only")
    how = "jnp" if interpret else {"full": "asm_fused", "nodecode": "raw", "stream": None}[mode]  # stream: no decode
    body = functools.partial(_bounds_kernel, bm=bm, wgs=wgs, stages=stages, k=k, split=split, mode=mode, how=how)
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((split, bm, n), jnp.bfloat16),
        grid=(n // mg.BN, split),
        grid_names=("n", "s"),
        num_threads=wgs,
        thread_name="wg",
        scratch_types=mg.dense_wgs_scratch(wgs, stages, bm, interpret),
        interpret=mg._interpret_params(False) if interpret else None,
        kernel_name=f"fp4_matmul_mosaic_gpu_bounds_{mode}",
    )
    return call(x, values, scales)
