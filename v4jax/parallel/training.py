"""Training on a mesh: where the TrainState and the batches live, and the sharded jit of a step.

The loop (`v4jax.train.loop`) asks for three things:
- `MeshPlan.create(config.mesh, model, tokens)`: the mesh, the rules, the parameter specs and the MoE
  dispatch mode (`config.mesh.moe_dispatch`, see `v4jax.parallel.dispatch`);
- `plan.init_state(create_fn)`: the TrainState built directly in its shardings (jit with out_shardings,
  so a model larger than one device is never materialised whole);
- `plan.jit_step(step_fn)`: the step jitted with the state donated and its output constrained to the
  same shardings, run under `jax.set_mesh(mesh)` and `moe_dispatch(plan.dispatch)` so the MoE layers
  dispatch expert-parallel in the configured mode;
- `plan.put_batch(batch)`: a host batch split over the batch axes. Multi-process, two ways: either every
  process passes the same global batch and each device takes its rows, or (`process_local=True`) each
  process passes only its own rows, `global_rows // process_count` of them, as the data pipeline's
  `process_index` / `process_count` give them (`v4jax.data.process_slice`); both go through
  `jax.make_array_from_process_local_data` with the global shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from v4jax.parallel import shardings as sh
from v4jax.parallel.dispatch import check_dispatch, moe_dispatch
from v4jax.parallel.distributed import compile_in_step
from v4jax.parallel.mesh import make_mesh
from v4jax.parallel.rules import ShardingRules


@dataclasses.dataclass
class MeshPlan:
    mesh: Mesh
    rules: ShardingRules
    variable_specs: dict  # {'params': specs, 'buffers': specs}
    dispatch: str = "auto"  # MoE dispatch mode (v4jax.parallel.dispatch.DISPATCH_MODES)

    @classmethod
    def create(cls, mesh_cfg: Mapping[str, Any] | Any, model: Any, sample_tokens: jax.Array,
               rules: ShardingRules | None = None, devices=None, dispatch: str | None = None) -> MeshPlan:
        """`dispatch` overrides `mesh_cfg.moe_dispatch` (default "auto")."""
        mesh = mesh_cfg if isinstance(mesh_cfg, Mesh) else make_mesh(mesh_cfg, devices)
        if dispatch is None:
            dispatch = mesh_cfg.get("moe_dispatch", "auto") if hasattr(mesh_cfg, "get") else "auto"
        check_dispatch(dispatch)
        rules = rules or ShardingRules()
        return cls(mesh, rules, sh.model_param_specs(model, sample_tokens, rules, mesh), dispatch)

    def state_shardings(self, abstract_state: Any) -> Any:
        """NamedShardings of a TrainState (params by rule, optimizer state mirroring them, rest replicated)."""
        return sh.named(sh.state_specs(abstract_state, self.variable_specs["params"]), self.mesh)

    def init_state(self, create_fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(state, its shardings): `create_fn()` (no arguments) run under jit straight into its shardings."""
        abstract = jax.eval_shape(create_fn)
        shardings = self.state_shardings(abstract)
        return compile_in_step(jax.jit(create_fn, out_shardings=shardings), "init_state")(), shardings

    def place(self, tree: Any, shardings: Any) -> Any:
        """Moves an existing (e.g. restored or single-device) tree onto the mesh."""
        return jax.device_put(tree, shardings)

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict:
        global_rows = np.shape(next(iter(batch.values())))[0]
        return {k: NamedSharding(self.mesh, sh.batch_spec(self.rules, self.mesh, np.ndim(v), global_rows))
                for k, v in batch.items()}

    def put_batch(self, batch: Mapping[str, Any], process_local: bool = False) -> dict:
        """Host batch -> global arrays split over the batch axes.

        `process_local=False`: `batch` is the whole global batch, the same on every process. True: it is
        this process's block of `global_rows // process_count` rows (block `process_index`, as the data
        pipeline's `process_rows` gives it); the block must be exactly the rows this process's devices
        hold, else a one-line error (put `data`/`fsdp` across hosts and `expert`/`tensor` within one).
        """
        count, index = jax.process_count(), jax.process_index()
        local_rows = np.shape(next(iter(batch.values())))[0]
        global_rows = local_rows * count if process_local else local_rows
        shardings = {k: NamedSharding(self.mesh, sh.batch_spec(self.rules, self.mesh, np.ndim(v), global_rows))
                     for k, v in batch.items()}
        if count == 1:
            return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        out = {}
        for k, v in batch.items():
            shape = (global_rows, *np.shape(v)[1:])
            if process_local:
                rows = process_row_range(shardings[k].addressable_devices_indices_map(shape).values(), global_rows)
                if rows != (index * local_rows, (index + 1) * local_rows):
                    raise ValueError(f"put_batch: process {index} holds rows {rows[0]}:{rows[1]} of the global batch "
                                     f"on this mesh, not block {index} of {count} (the data pipeline's rows)")
            out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v), shape)
        return out

    def jit_step(self, step_fn: Callable, state_shardings: Any, donate: bool = True,
                 name: str = "train_step") -> Callable:
        """`step_fn(state, *args) -> (state, metrics)` jitted for the mesh (state donated, layout kept);
        in a multi-process run each new signature compiles, then waits for all processes (`compile_in_step`)."""

        def constrained(state, *args):
            new_state, metrics = step_fn(state, *args)
            return jax.lax.with_sharding_constraint(new_state, state_shardings), metrics

        jitted = jax.jit(constrained, donate_argnums=0 if donate else ())
        return self.under_mesh(compile_in_step(jitted, name))

    def under_mesh(self, fn: Callable) -> Callable:
        """`fn` called (and so traced) with this mesh and dispatch mode set: the MoE layers then run
        expert-parallel (both are part of jit's cache key, so changing either re-traces)."""

        @functools.wraps(fn)
        def call(*args, **kwargs):
            with jax.set_mesh(self.mesh), moe_dispatch(self.dispatch):
                return fn(*args, **kwargs)

        return call


def process_row_range(device_indices: Any, global_rows: int) -> tuple[int, int]:
    """(start, stop) of the batch rows that one process's devices hold, from their index tuples
    (`sharding.addressable_devices_indices_map(shape).values()`); one-line error if not one block."""
    covered = set()
    for index in device_indices:
        covered.update(range(*index[0].indices(global_rows)))
    start, stop = min(covered), max(covered) + 1
    if len(covered) != stop - start:
        raise ValueError(f"put_batch: this process's devices hold rows {sorted(covered)} of the batch, not one "
                         "contiguous block; order the mesh so the batch axes vary slowest across hosts")
    return start, stop
