"""`QArray`: a quantized array as a pytree (values, scales, optional per-tensor scale) plus static metadata.

Children (arrays, so jit / vmap / device_put / orbax see them):
  * `values`: FP4 -> uint8 with two nibbles per byte packed along `axis` (element 2i in the low nibble),
    shape = the logical shape with `shape[axis]` halved; FP8 -> `float8_e4m3fn`, the logical shape.
  * `scales`: one per block, shape = the logical shape with each blocked axis divided by its block size.
    dtype uint8 (E8M0 biased exponents), `float8_e4m3fn` (NVFP4) or float32.
  * `global_scale`: NVFP4's float32 per-tensor scale (a scalar), else None.
Static aux data (hashable, part of the treedef): `fmt` (a `QuantFormat`), logical `shape`, logical
`dtype` (what `dequantize` returns) and the normalized `axis`.

Because values and scales keep the logical axis order, a sharding of the logical array along a
non-quantized axis (e.g. rows N of an [N, K] weight quantized along K) is the same PartitionSpec for
both; `shardings_like` builds that tree (scalars replicated).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.quant.formats import QuantFormat


@flax.struct.dataclass
class QArray:
    """A block-quantized array; see the module docstring for the layout of each field."""

    values: jax.Array
    scales: jax.Array
    global_scale: jax.Array | None
    fmt: QuantFormat = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: np.dtype = flax.struct.field(pytree_node=False)
    axis: int = flax.struct.field(pytree_node=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def shardings_like(self, mesh: jax.sharding.Mesh, spec: PartitionSpec) -> QArray:
        """A QArray-shaped tree of NamedShardings: `spec` (of the logical array) for values and scales,
        replicated for the scalar per-tensor scale. Use with `jax.device_put` or `out_shardings`."""
        sharded = NamedSharding(mesh, spec)
        replicated = NamedSharding(mesh, PartitionSpec())
        return self.replace(
            values=sharded,
            scales=sharded,
            global_scale=None if self.global_scale is None else replicated,
        )


def abstract_like(q: QArray) -> Any:
    """The QArray's tree with every array replaced by a `jax.ShapeDtypeStruct` (e.g. an orbax restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), q)
