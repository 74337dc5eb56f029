"""Training on a mesh: where the TrainState and the batches live, and the sharded jit of a step.

The loop (`v4jax.train.loop`) asks for three things:
- `MeshPlan.create(config.mesh, model, tokens)`: the mesh, the rules and the parameter specs;
- `plan.init_state(create_fn)`: the TrainState built directly in its shardings (jit with out_shardings,
  so a model larger than one device is never materialised whole);
- `plan.jit_step(step_fn)`: the step jitted with the state donated and its output constrained to the
  same shardings, run under `jax.set_mesh(mesh)` so the MoE layers dispatch expert-parallel;
- `plan.put_batch(batch)`: a host batch split over the batch axes. Multi-process: every process builds
  the same global batch (the data pipeline is seeded identically) and each device takes its rows
  (`jax.make_array_from_process_local_data` with the global shape).
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
from v4jax.parallel.mesh import make_mesh
from v4jax.parallel.rules import ShardingRules


@dataclasses.dataclass
class MeshPlan:
    mesh: Mesh
    rules: ShardingRules
    variable_specs: dict  # {'params': specs, 'buffers': specs}

    @classmethod
    def create(cls, mesh_cfg: Mapping[str, Any] | Any, model: Any, sample_tokens: jax.Array,
               rules: ShardingRules | None = None, devices=None) -> MeshPlan:
        mesh = mesh_cfg if isinstance(mesh_cfg, Mesh) else make_mesh(mesh_cfg, devices)
        rules = rules or ShardingRules()
        return cls(mesh, rules, sh.model_param_specs(model, sample_tokens, rules, mesh))

    def state_shardings(self, abstract_state: Any) -> Any:
        """NamedShardings of a TrainState (params by rule, optimizer state mirroring them, rest replicated)."""
        return sh.named(sh.state_specs(abstract_state, self.variable_specs["params"]), self.mesh)

    def init_state(self, create_fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(state, its shardings): `create_fn()` (no arguments) run under jit straight into its shardings."""
        abstract = jax.eval_shape(create_fn)
        shardings = self.state_shardings(abstract)
        return jax.jit(create_fn, out_shardings=shardings)(), shardings

    def place(self, tree: Any, shardings: Any) -> Any:
        """Moves an existing (e.g. restored or single-device) tree onto the mesh."""
        return jax.device_put(tree, shardings)

    def batch_shardings(self, batch: Mapping[str, Any]) -> dict:
        global_rows = np.shape(next(iter(batch.values())))[0]
        return {k: NamedSharding(self.mesh, sh.batch_spec(self.rules, self.mesh, np.ndim(v), global_rows))
                for k, v in batch.items()}

    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """Host batch (the whole global batch, the same on every process) -> arrays split over the batch axes."""
        shardings = self.batch_shardings(batch)
        if jax.process_count() == 1:
            return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), np.shape(v))
                for k, v in batch.items()}

    def jit_step(self, step_fn: Callable, state_shardings: Any, donate: bool = True) -> Callable:
        """`step_fn(state, *args) -> (state, metrics)` jitted for the mesh (state donated, layout kept)."""

        def constrained(state, *args):
            new_state, metrics = step_fn(state, *args)
            return jax.lax.with_sharding_constraint(new_state, state_shardings), metrics

        jitted = jax.jit(constrained, donate_argnums=0 if donate else ())
        return self.under_mesh(jitted)

    def under_mesh(self, fn: Callable) -> Callable:
        """`fn` called (and so traced) with this mesh set: the MoE layers then run expert-parallel."""

        @functools.wraps(fn)
        def call(*args, **kwargs):
            with jax.set_mesh(self.mesh):
                return fn(*args, **kwargs)

        return call
