"""`fp4_matmul` and `fp4_grouped_matmul`: bf16 activations times packed MXFP4 weights, backend by platform.

    from v4jax.kernels import fp4_matmul
    y = fp4_matmul.fp4_matmul(x, w)                           # x [M, K]; w = quant.quantize(W, "mxfp4"), W [N, K]
    y = fp4_matmul.fp4_grouped_matmul(x, w, group_sizes)      # x [M, K] sorted by group; W [G, N, K]

Both compute x @ dequantize(w).T (per group) with float32 accumulation, returned in x's dtype.
Implementations: "xla" (reference.py: dequantize, then one dot), "triton" (triton.py, GPU), "mosaic_tpu"
(mosaic_tpu.py, TPU; no TPU was available, so it is tested in interpret mode only), "mosaic_gpu"
(mosaic_gpu.py, Hopper: TMA + in-register PTX decode + wgmma, dense and grouped; measured on the H200).
`None` picks, on GPU, "mosaic_gpu" where its shapes fit (N % 64, K % 256; the fastest there for dense
decode, M <= 16, and for every grouped size measured), with large-M dense calls going to our dequantize kernel +
cuBLAS (the stored table's `dense_dequant_min_m`) and other shapes to "triton"; "mosaic_tpu" on TPU;
else "xla". Within "mosaic_gpu", a dense decode on planar weights with N wide enough to fill the SMs takes
`mosaic_gpu.dense_wgs` (the table's `dense_mosaic_wgs`: one kernel, no split-K sum). `interpret=True` runs a
Pallas backend on CPU.

Weights: an mxfp4 `QArray`, or the same numbers in mosaic_gpu's load-time layout (`to_planar` ->
`PlanarMXFP4`: nibbles ordered so that the kernel reads x as it is and scales stored [K/32, N]), which saves
the per-call split of x into column planes and the scale transpose. Backends other than mosaic_gpu convert a
`PlanarMXFP4` back to a QArray on each call.

Gradients: a `jax.custom_vjp` w.r.t. x only, dx = dy @ dequantize(W) computed by XLA (the grouped one via
`grouped_matmul`'s bf16 path). Packed weights are frozen at inference, so w gets no gradient (zeros);
training uses bf16/fp32 master weights through `grouped_matmul` instead.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.fp4_matmul import block_sizes, common, planar, reference
from v4jax.kernels.fp4_matmul.planar import PlanarMXFP4, as_qarray
from v4jax.quant.qarray import QArray
from v4jax.quant.quantize import dequantize

IMPLEMENTATIONS = ("xla", "triton", "mosaic_gpu", "mosaic_tpu")
MOSAIC_DENSE_MAX_M = 16  # GPU default: dense calls up to this M take mosaic_gpu (measured at M = 16 on the H200)


def _check_x(x: jax.Array, k: int, name: str) -> None:
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: x must be [M, K={k}], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}: x must be floating, got {x.dtype}")


def _check_weight(w, ndim: int, name: str) -> None:
    """One-line ValueError unless `w` is an mxfp4 QArray (or `PlanarMXFP4`) of rank `ndim` along its last axis."""
    if isinstance(w, PlanarMXFP4):
        if w.ndim != ndim:
            raise ValueError(f"{name}: w must have rank {ndim}, got a PlanarMXFP4 of shape {w.shape}")
        *lead, n, k = w.shape
        if k % planar.CHUNK:
            raise ValueError(f"{name}: a PlanarMXFP4 needs K % {planar.CHUNK} == 0, got K={k}")
        common.check_packed_fields(w.values, w.scales, (*lead, n, k // 2), (*lead, k // common.SCALE_BLOCK, n), name)
        return
    common.check_mxfp4_weight(w, ndim, name)


def _pick(implementation: str | None, name: str) -> str:
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"{name}: unknown implementation {implementation!r} (known: {IMPLEMENTATIONS})"
        )
    if implementation is not None:
        return implementation
    backend = jax.default_backend()
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(backend, "xla")


def _is_hopper() -> bool:
    """The Mosaic GPU kernels issue wgmma and TMA: sm_90 (Hopper) only."""
    return getattr(jax.devices()[0], "compute_capability", None) in ("9.0", "9.0a")


def _mosaic_gpu_fits(x: jax.Array, n: int, k: int) -> bool:
    """Whether the GPU default may take mosaic_gpu: a Hopper device, bf16 or float32 x (the kernel multiplies
    bf16 terms: a float16 x would lose bits), and its tile shapes."""
    return x.dtype in (jnp.bfloat16, jnp.float32) and _kernel_friendly(n, k, "mosaic_gpu") and _is_hopper()


def _kernel_friendly(n: int, k: int, impl: str = "triton") -> bool:
    """The Pallas backends need N a multiple of 16 and K of 64 (bf16 MMA tiles, whole scale blocks per tile);
    mosaic_gpu needs N % 64 (one warpgroup's wgmma rows) and K % 256 (128-byte swizzled half-word rows)."""
    if impl == "mosaic_gpu":
        return n % 64 == 0 and k % 256 == 0
    return n % 16 == 0 and k % 64 == 0


def fp4_matmul(
    x: Float[Array, "m k"],
    w: QArray | PlanarMXFP4,
    implementation: str | None = None,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """y = x @ dequantize(w).T, [M, N]. x [M, K] (bf16 or fp32); w: mxfp4 QArray of W [N, K] along K, or the
    same as a `PlanarMXFP4` (mosaic_gpu's load-time layout; other backends convert it back on each call)."""
    _check_weight(w, 2, "fp4_matmul")
    n, k = w.shape
    _check_x(x, k, "fp4_matmul")
    impl = _pick(implementation, "fp4_matmul")
    if impl != "xla" and not _kernel_friendly(n, k, impl):
        if implementation is not None:
            need = "N % 64 == 0 and K % 256 == 0" if impl == "mosaic_gpu" else "N % 16 == 0 and K % 64 == 0"
            raise ValueError(f"fp4_matmul: {impl} needs {need}, got N={n}, K={k}")
        impl = "xla"
    dequant_route = implementation is None and impl == "triton" and _prefers_dequantize("dense", x.shape[0])
    if (implementation is None and impl == "triton" and not dequant_route and x.shape[0] <= MOSAIC_DENSE_MAX_M
            and _mosaic_gpu_fits(x, n, k)):
        impl = "mosaic_gpu"
    if impl != "mosaic_gpu":
        w = as_qarray(w)
    if impl == "xla":
        return reference.fp4_matmul_reference(x, w)
    if dequant_route:
        return _dequantize_then_dot(x, w, interpret)
    return _dense_vjp(x, w, impl, interpret)


def _prefers_dequantize(op: str, m: int) -> bool:
    """The stored table's `<op>_dequant_min_m`: from this M on, our dequantize kernel then the bf16 GEMM
    (cuBLAS; tokamax for grouped) beat the fused kernel, measured on the chip."""
    if jax.default_backend() != "gpu":
        return False
    table = block_sizes.load_table(block_sizes.chip_name(jax.devices()[0].device_kind))
    min_m = table.get(f"{op}_dequant_min_m")
    return min_m is not None and m >= min_m


def _dequantize_then_dot(x, w: QArray, interpret: bool):
    """Prefill route: W to x's dtype with the Triton dequantize kernel (memory speed), then one XLA dot.
    The kernel's input is integer, so autodiff w.r.t. x sees a plain dot."""
    from v4jax.kernels.fp4_matmul import triton  # lazy: GPU-only imports

    cfg = block_sizes.select("dequantize", w.shape[0], chip="interpret" if interpret else None)
    wd = triton.dequantize(w.values, w.scales, cfg=cfg, dtype=x.dtype, interpret=interpret)  # [N, K]
    return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(x.dtype)  # [M, N]


def _layout_kwargs(w) -> dict:
    """The mosaic_gpu kernels' `planar` flag for planar weights (only mosaic_gpu receives them)."""
    return {"planar": True} if isinstance(w, PlanarMXFP4) else {}


def _decoder_for(cfg: block_sizes.BlockConfig, w) -> block_sizes.BlockConfig:
    """`cfg`, with "asm_fused" (one FMA per register, exact only for scales <= 2) replaced by "asm_lean" unless
    `w` is planar and its scales are known to allow it (`planar.fused_scales_ok`)."""
    if cfg.decode == "asm_fused" and not planar.fused_scales_ok(w):
        return dataclasses.replace(cfg, decode="asm_lean")
    return cfg


def _warpgroup_split(x, w, impl: str, interpret: bool) -> dict | None:
    """The stored table's `dense_mosaic_wgs` entry when it covers this call, else None: planar weights, bf16 x
    of at most `max_m` rows, K a multiple of 256 x `warpgroups`, and at least `min_tiles_per_sm` 64-row tiles of
    N per SM (fewer tiles leave SMs idle, and the split-K kernel wins: H200, K = N = 4096)."""
    if impl != "mosaic_gpu" or interpret or not isinstance(w, PlanarMXFP4) or x.dtype != jnp.bfloat16:
        return None
    device = jax.devices()[0]
    entry = block_sizes.load_table(block_sizes.chip_name(device.device_kind)).get("dense_mosaic_wgs")
    n, k = w.shape
    sms = getattr(device, "core_count", None)  # streaming multiprocessors (None: unknown, keep split-K)
    if (entry is None or not sms or x.shape[0] > entry["max_m"] or k % (256 * entry["warpgroups"])
            or n // 64 < entry["min_tiles_per_sm"] * sms):
        return None
    return entry


def _dense_forward(x, w: QArray | PlanarMXFP4, impl: str, interpret: bool):
    op = "dense_mosaic" if impl == "mosaic_gpu" else "dense"  # the Mosaic kernel tiles differently
    cfg = _decoder_for(block_sizes.select(op, x.shape[0], chip=None if not interpret else "interpret"), w)
    backend = _backend_module(impl)
    if entry := _warpgroup_split(x, w, impl, interpret):  # decode on wide N: one kernel, no split-K sum
        bm = min(64, common.round_up(x.shape[0], 8))  # rows of x per CTA (wgmma N): M up to 64, else tiles of 64
        return backend.dense_wgs(x, w.values, w.scales, wgs=entry["warpgroups"], bm=bm, stages=entry["num_stages"],
                                 decode=cfg.decode)
    return backend.dense(x, w.values, w.scales, cfg=cfg, interpret=interpret, **_layout_kwargs(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_vjp(x, w, impl, interpret):
    return _dense_forward(x, w, impl, interpret)


def _dense_fwd(x, w, impl, interpret):
    return _dense_forward(x, w, impl, interpret), w


def _dense_bwd(impl, interpret, w, dy):
    del impl, interpret
    wd = dequantize(as_qarray(w)).astype(dy.dtype)  # [N, K]
    dx = jnp.einsum("mn,nk->mk", dy, wd, preferred_element_type=jnp.float32).astype(
        dy.dtype
    )  # [M, K]
    return dx, None


_dense_vjp.defvjp(_dense_fwd, _dense_bwd)


def fp4_grouped_matmul(
    x: Float[Array, "m k"],
    w: QArray | PlanarMXFP4,
    group_sizes: Int[Array, " g"],
    implementation: str | None = None,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """y[rows of group g] = x[rows] @ dequantize(w)[g].T, [M, N]; rows past sum(group_sizes) are zero.

    x [M, K] with rows sorted by group; w: mxfp4 QArray of W [G, N, K] quantized along K, or the same as a
    `PlanarMXFP4` (mosaic_gpu's load-time layout; other backends convert it back on each call); group_sizes [G].
    """
    _check_weight(w, 3, "fp4_grouped_matmul")
    g, n, k = w.shape
    _check_x(x, k, "fp4_grouped_matmul")
    if group_sizes.shape != (g,):
        raise ValueError(
            f"fp4_grouped_matmul: group_sizes must be [G={g}], got shape {group_sizes.shape}"
        )
    impl = _pick(implementation, "fp4_grouped_matmul")
    if implementation is None and impl == "triton" and _mosaic_gpu_fits(x, n, k):
        impl = "mosaic_gpu"  # H200: ahead of Triton and of dequantize + tokamax at 8, 64 and 8192 tokens x top-6
    if impl != "xla" and not _kernel_friendly(n, k, impl):
        if implementation is not None:
            need = "N % 64 == 0 and K % 256 == 0" if impl == "mosaic_gpu" else "N % 16 == 0 and K % 64 == 0"
            raise ValueError(f"fp4_grouped_matmul: {impl} needs {need}, got N={n}, K={k}")
        impl = "xla"
    if impl != "mosaic_gpu":
        w = as_qarray(w)
    if impl == "xla":
        return reference.fp4_grouped_matmul_reference(x, w, group_sizes)
    if (implementation is None and impl == "triton" and _prefers_dequantize("grouped", x.shape[0])
            and _float_grouped_is_tokamax(x.dtype)):  # else the float grouped GEMM is XLA's dense masked one
        return _dequantize_then_grouped(x, w, group_sizes, interpret)
    return _grouped_vjp(x, w, group_sizes, impl, interpret)


def _float_grouped_is_tokamax(dtype) -> bool:
    """Whether `grouped_matmul` would run tokamax for x and dequantized weights of this dtype."""
    from v4jax.kernels.grouped_matmul.api import (
        resolved_implementation,  # lazy: that api imports this one
    )

    return resolved_implementation(dtype, dtype) == "tokamax"


def _dequantize_then_grouped(x, w: QArray, group_sizes, interpret: bool):
    """Grouped prefill route: every expert to x's dtype in the "x @ w" layout [G, K, N] with the Triton
    dequantize kernel, then the bf16 grouped GEMM (`grouped_matmul`: tokamax on GPU)."""
    from v4jax.kernels.fp4_matmul import triton  # lazy: GPU-only imports
    from v4jax.kernels.grouped_matmul.api import (
        grouped_matmul,  # lazy: that api imports this one
    )

    cfg = block_sizes.select("dequantize", w.shape[1], chip="interpret" if interpret else None)
    wd = triton.dequantize(w.values, w.scales, cfg=cfg, dtype=x.dtype, transpose=True,
                           interpret=interpret)  # [G, K, N]
    return grouped_matmul(x, wd, group_sizes)


def _grouped_forward(x, w: QArray | PlanarMXFP4, group_sizes, impl: str, interpret: bool):
    op = "grouped_mosaic" if impl == "mosaic_gpu" else "grouped"  # the Mosaic kernel tiles differently
    cfg = _decoder_for(block_sizes.select(op, x.shape[0], chip=None if not interpret else "interpret"), w)
    return _backend_module(impl).grouped(
        x, w.values, w.scales, group_sizes, cfg=cfg, interpret=interpret, **_layout_kwargs(w)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_vjp(x, w, group_sizes, impl, interpret):
    return _grouped_forward(x, w, group_sizes, impl, interpret)


def _grouped_fwd(x, w, group_sizes, impl, interpret):
    return _grouped_forward(x, w, group_sizes, impl, interpret), (w, group_sizes)


def _grouped_bwd(impl, interpret, res, dy):
    del impl, interpret
    # lazy: that api imports this one
    from v4jax.kernels.grouped_matmul.api import grouped_matmul

    w, group_sizes = res
    wd = dequantize(as_qarray(w)).astype(dy.dtype)  # [G, N, K]: the "x @ w" layout for dy [M, N] -> dx [M, K]
    dx = grouped_matmul(
        dy, wd, group_sizes
    )  # [M, K]; rows past sum(group_sizes) are zero
    return dx, None, None


_grouped_vjp.defvjp(_grouped_fwd, _grouped_bwd)


def _backend_module(impl: str):
    if impl == "triton":
        from v4jax.kernels.fp4_matmul import triton  # lazy: GPU-only imports

        return triton
    if impl == "mosaic_tpu":
        from v4jax.kernels.fp4_matmul import mosaic_tpu  # lazy: TPU-only imports

        return mosaic_tpu
    if impl == "mosaic_gpu":
        from v4jax.kernels.fp4_matmul import mosaic_gpu  # lazy: GPU-only imports

        return mosaic_gpu
    raise ValueError(f"fp4_matmul: no Pallas backend {impl!r}")


def transpose_kn_to_nk(w: QArray) -> QArray:
    """An mxfp4 QArray of a [..., K, N] weight quantized along K (axis -2, the MoE "x @ w" layout) ->
    the same numbers as W [..., N, K] quantized along its last axis, the layout the kernels read.

    Only bytes move (values [..., K/2, N] -> [..., N, K/2], scales [..., K/32, N] -> [..., N, K/32]); the
    packing (element 2i in the low nibble along K) is unchanged. Do it once when loading weights: per
    call it costs a pass over the packed bytes.
    """
    if not isinstance(w, QArray) or w.ndim < 2 or w.axis != w.ndim - 2:
        raise ValueError(
            "transpose_kn_to_nk: needs a QArray [..., K, N] quantized along axis -2 (K)"
        )
    return QArray(
        values=jnp.swapaxes(w.values, -1, -2),
        scales=jnp.swapaxes(w.scales, -1, -2),
        global_scale=w.global_scale,
        fmt=w.fmt,
        shape=(*w.shape[:-2], w.shape[-1], w.shape[-2]),
        dtype=w.dtype,
        axis=w.ndim - 1,
    )
