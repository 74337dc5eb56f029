"""The "xla" backend and test oracle: dequantize the MXFP4 weight to the activation dtype, then one XLA dot.

For prefill-sized M this is also a sound production path on GPU: the dequantize is one elementwise pass
(N*K/2 bytes in, N*K*2 out) and the dot runs on cuBLAS at full bf16 rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from v4jax.quant.qarray import QArray
from v4jax.quant.quantize import dequantize


def fp4_matmul_reference(x: Float[Array, "m k"], w: QArray) -> Float[Array, "m n"]:
    """y = x @ dequantize(w).T with float32 accumulation, in x's dtype. w: mxfp4 QArray of W [N, K]."""
    wd = dequantize(w).astype(x.dtype)  # [N, K]
    return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(
        x.dtype
    )  # [M, N]


def fp4_grouped_matmul_reference(
    x: Float[Array, "m k"], w: QArray, group_sizes: Int[Array, " g"]
) -> Float[Array, "m n"]:
    """y[rows of group g] = x[rows] @ dequantize(w)[g].T; rows past sum(group_sizes) are zero. w: W [G, N, K]."""
    wd = jnp.swapaxes(dequantize(w).astype(x.dtype), 1, 2)  # [G, K, N]
    y = jax.lax.ragged_dot(
        x, wd, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )  # [M, N]
    return y.astype(x.dtype)
