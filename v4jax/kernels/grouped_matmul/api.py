"""`grouped_matmul(x, w, group_sizes)`: rows of `x` sorted by group, each group multiplied by its own matrix.

The MoE layer's expert GEMMs all go through this function. Backends:
- "xla": `jax.lax.ragged_dot` (the reference; fine on CPU, but it lowers to a dense masked GEMM on GPU);
- "tokamax": tokamax's Pallas `ragged_dot` (GPU/TPU), a well-kept library we use rather than writing a bf16
  grouped GEMM of our own. It is an optional dependency (the `cuda`/`tpu` extras) imported lazily.
`implementation=None` picks tokamax on GPU/TPU when it imports, else XLA.
"""

from __future__ import annotations

import functools

import jax
from jaxtyping import Array, Float, Int

IMPLEMENTATIONS = ("xla", "tokamax")


@functools.cache
def _tokamax_ragged_dot():
    try:
        import tokamax  # noqa: PLC0415  (optional, heavy: imported only when used)
    except Exception:  # pragma: no cover - depends on the machine
        return None
    return tokamax.ragged_dot


def grouped_matmul(x: Float[Array, "m k"], w: Float[Array, "g k n"], group_sizes: Int[Array, "g"],
                   implementation: str | None = None) -> Float[Array, "m n"]:
    """`y[rows of group i] = x[rows of group i] @ w[i]`; rows beyond sum(group_sizes) give zeros."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"grouped_matmul: unknown implementation {implementation!r} (known: {IMPLEMENTATIONS})")
    if implementation is None:
        implementation = "tokamax" if jax.default_backend() in ("gpu", "tpu") and _tokamax_ragged_dot() else "xla"
    if implementation == "tokamax":
        fn = _tokamax_ragged_dot()
        if fn is None:
            raise ValueError("grouped_matmul: implementation='tokamax' but tokamax is not installed (pip install '.[cuda]')")
        return fn(x, w, group_sizes.astype("int32"))
    return jax.lax.ragged_dot(x, w, group_sizes.astype("int32"))
