"""v4jax.parallel: device meshes, logical-axis rules (as data), shardings, expert-parallel MoE dispatch.

- `mesh`: `make_mesh(config.mesh)` / `abstract_mesh(data=8, expert=32)`; sizes checked against the devices.
- `rules`: `ShardingRules` (logical name -> mesh axes) and `logical_to_physical` with a collision check.
- `shardings`: specs for params, optimizer state, TrainState and batches; per-device byte counts.
- `expert`: the routed experts under `jax.shard_map` (all-gather dispatch, psum_scatter combine, dropless).
- `dispatch`: the all-to-all dispatch and combine (dense `all_to_all`, CPU too; `ragged_all_to_all`, GPU/TPU),
  selected by `config.mesh.moe_dispatch`.
- `training`: placing a TrainState and batches (whole, or per-process blocks) on a mesh, and the sharded jit
  of the train step.
"""

from v4jax.parallel.mesh import MESH_AXES, abstract_mesh, make_mesh, mesh_shape
from v4jax.parallel.rules import DEFAULT_TABLE, ShardingRules, logical_to_physical

__all__ = [
           "DEFAULT_TABLE",
           "MESH_AXES",
           "ShardingRules",
           "abstract_mesh",
           "logical_to_physical",
           "make_mesh",
           "mesh_shape",
]
