"""`grouped_matmul(x, w, group_sizes)`: rows of `x` sorted by group, each group multiplied by its own matrix.

The MoE layer's expert GEMMs all go through this function. Backends for a float `w` [G, K, N]:
- "xla": `jax.lax.ragged_dot` (the reference; fine on CPU, but it lowers to a dense masked GEMM on GPU);
- "tokamax": tokamax's Pallas `ragged_dot` (GPU/TPU), a well-kept library we use rather than writing a bf16
  grouped GEMM of our own. It is an optional dependency (the `cuda`/`tpu` extras) imported lazily.
`implementation=None` picks tokamax on GPU/TPU for 16-bit inputs when it imports, else XLA: float32 inputs stay
on XLA, whose ragged_dot keeps float32 precision (the parity tests' dtype), where tokamax's kernel targets
bf16 and compiles a kernel per shape. `default_implementation("xla")` overrides the choice for
everything traced inside it (benchmarks compare backends with it).

Packed MXFP4 weights (a `quant.QArray`) go to our FP4 kernels (`v4jax.kernels.fp4_matmul`), which
compute y = x @ dequantize(w) per group. Two storage layouts are accepted, told apart by the QArray's axis:
- [G, N, K] quantized along K (axis 2): the checkpoint layout and what the kernels read; preferred;
- [G, K, N] quantized along K (axis 1, `quant.quantize(w, "mxfp4", axis=1)` of the MoE's "x @ w"
  weights): transposed to [G, N, K] on every call (a pass over the packed bytes); convert once at load
  time with `fp4_matmul.transpose_kn_to_nk` to avoid it.
A `fp4_matmul.PlanarMXFP4` (the [G, N, K] weights in the Hopper kernel's load-time layout) goes through as is.
For a QArray, `implementation` is one of fp4_matmul.IMPLEMENTATIONS ("xla" dequantizes then ragged_dots;
None picks the platform's FP4 kernel). Gradients flow to x only (packed weights are frozen).

To use tokamax on the (offline) H200 image, bring its wheels (see ../shared/gpu/README.md):
`../shared/gpu/fetch_wheels.sh tokamax==0.0.17 qwix==0.1.8 einshape immutabledict pydantic pydantic-core
annotated-types typing-inspection tensorboardx typing-extensions`, install them with `pip --no-deps
--target /tmp/site`, and add a stand-in `xprof/cli/tools.py` defining `get_kernel_stats_tool = None` there
(tokamax 0.0.17 imports xprof at import time; its kernels do not need it).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.kernels.fp4_matmul.planar import PlanarMXFP4
from v4jax.quant.qarray import QArray

IMPLEMENTATIONS = ("xla", "tokamax")
# the backend `implementation=None` means; None: by platform and dtype. A jax user context, so that it is part
# of jit's cache key like the MoE dispatch mode (v4jax.parallel.dispatch)
_DEFAULT = jax.make_user_context(None)


@contextlib.contextmanager
def default_implementation(implementation: str | None):
    """Makes `implementation=None` mean `implementation` for float weights traced inside (None: the automatic choice)."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"grouped_matmul: unknown implementation {implementation!r} (known: {IMPLEMENTATIONS})")
    with _DEFAULT(implementation):
        yield


@functools.cache
def _tokamax_ragged_dot():
    try:
        import tokamax  # optional, heavy: imported only when used
    except Exception:  # noqa: BLE001  (any import failure means "not available")
        return None
    return tokamax.ragged_dot


def auto_implementation(x_dtype, w_dtype, backend: str, have_tokamax: bool) -> str:
    """What `implementation=None` picks: tokamax for 16-bit operands on GPU/TPU when installed, else XLA."""
    sixteen_bit = jnp.dtype(x_dtype).itemsize == 2 and jnp.dtype(w_dtype).itemsize == 2
    return "tokamax" if sixteen_bit and backend in ("gpu", "tpu") and have_tokamax else "xla"


def resolved_implementation(x_dtype, w_dtype) -> str:
    """The backend `implementation=None` runs for float operands of these dtypes, here and now: the
    `default_implementation` override if one is active, else `auto_implementation` on this platform."""
    if _DEFAULT.value is not None:
        return _DEFAULT.value
    return auto_implementation(x_dtype, w_dtype, jax.default_backend(), _tokamax_ragged_dot() is not None)


def grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g k n"] | QArray | PlanarMXFP4,
                   group_sizes: Int[Array, " g"], implementation: str | None = None,
                   interpret: bool = False) -> Float[Array, "m n"]:
    """`y[rows of group i] = x[rows of group i] @ w[i]`; rows beyond sum(group_sizes) give zeros.

    `interpret` runs a Pallas FP4 backend in interpret mode (packed FP4 weights only; CPU tests)."""
    if is_packed_fp4(w):
        return _fp4_grouped(x, w, group_sizes, implementation, interpret)
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"grouped_matmul: unknown implementation {implementation!r} (known: {IMPLEMENTATIONS})")
    if implementation is None:
        implementation = resolved_implementation(x.dtype, w.dtype)
    if implementation == "tokamax":
        fn = _tokamax_ragged_dot()
        if fn is None:
            raise ValueError("grouped_matmul: implementation='tokamax' but tokamax is not installed (pip install '.[cuda]')")
        return fn(x, w, group_sizes.astype("int32"))
    return jax.lax.ragged_dot(x, w, group_sizes.astype("int32"))


def is_packed_fp4(w) -> bool:
    """Whether `w` is packed FP4 (a `QArray`, or a `fp4_matmul.PlanarMXFP4`) rather than a float array."""
    return isinstance(w, (QArray, PlanarMXFP4))


def _fp4_grouped(x, w, group_sizes, implementation, interpret):
    from v4jax.kernels import fp4_matmul  # lazy: fp4_matmul's VJP imports this module

    if isinstance(w, PlanarMXFP4):  # [G, N, K] in mosaic_gpu's load-time layout
        return fp4_matmul.fp4_grouped_matmul(x, w, group_sizes, implementation=implementation, interpret=interpret)
    if w.ndim != 3 or w.axis not in (1, 2):
        raise ValueError(f"grouped_matmul: a QArray w must be [G, N, K] (axis 2) or [G, K, N] (axis 1), got axis {w.axis}")
    if w.axis == 1:
        w = fp4_matmul.transpose_kn_to_nk(w)  # [G, N, K]
    return fp4_matmul.fp4_grouped_matmul(x, w, group_sizes, implementation=implementation, interpret=interpret)
