"""Expert-parallel routed experts under `jax.shard_map` (scaling-book's "manual" mode), dropless.

Layout inside the shard_map: tokens [T, d] are split over the batch axes (data, fsdp, expert); the stacked
expert weights [E, d, I] over `expert` on E and over `tensor` on I (the `fsdp` split of d is gathered by
XLA on entry: FSDP). Dispatch and combine:

1. all-gather the tokens, their expert ids and combine weights over the `expert` axis, so every expert
   shard sees every token of its data group;
2. each shard keeps the token-expert pairs routed to ITS experts, sorts them by local expert (pairs of
   other shards sort last, into no group) and runs the grouped GEMMs (`kernels.grouped_matmul`);
3. the partial outputs are scatter-added per token and `psum_scatter`ed back over `expert` (each shard
   gets its own tokens with the contributions of all experts) and `psum`med over `tensor`.

Nothing is dropped and no capacity factor exists, at the price of moving all tokens of the expert group
to every shard. Beside it, `dispatch.py` holds the all-to-all dispatch and combine (dense
`all_to_all`, which runs on XLA:CPU, and `ragged_all_to_all` for GPU/TPU, which XLA:CPU does not
implement, jax #34755); the mode comes from `config.mesh.moe_dispatch` through `dispatch.moe_dispatch`
(entered by `MeshPlan.under_mesh`) or the `dispatch=` argument, "auto" picking per platform.

The model calls `routed_experts_parallel` when a mesh with more than one device is active
(`jax.set_mesh(mesh)` around the jitted step: the mesh is part of jit's cache key, so the
single-device and the sharded traces never mix).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.parallel import dispatch as dp
from v4jax.parallel.rules import ShardingRules

DEFAULT_RULES = ShardingRules()


def active_mesh():
    """The mesh set by `jax.set_mesh` while tracing, or None when none (or a one-device one) is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size <= 1:
        return None
    return mesh


def expert_parallel_active() -> bool:
    return active_mesh() is not None


def local_expert_ffn(x: Float[Array, "t d"], idx: Int[Array, "t k"], weights: Float[Array, "t k"],
                     w1: Float[Array, "e d i"], w3: Float[Array, "e d i"], w2: Float[Array, "e i d"],
                     first_expert: Int[Array, ""] | int, activation: Callable) -> Float[Array, "t d"]:
    """Sum over the pairs (t, k) routed to experts [first_expert, first_expert + e) of
    weights[t, k] * w2[e] activation(x[t] w1[e], x[t] w3[e]), as float32 [T, d]; other pairs contribute 0."""
    E_loc, K = w1.shape[0], idx.shape[-1]
    local = idx.reshape(-1) - first_expert  # [T*K]
    mine = (local >= 0) & (local < E_loc)
    key = jnp.where(mine, local, E_loc)  # other shards' pairs sort after every local group
    order = jnp.argsort(key, stable=True)
    token_of = order // K
    group_sizes = jnp.bincount(key, length=E_loc + 1)[:E_loc]
    xs = x[token_of]  # [T*K, d] sorted by local expert
    gate = grouped_matmul(xs, w1, group_sizes)  # [T*K, I]
    up = grouped_matmul(xs, w3, group_sizes)  # [T*K, I]
    keep = (weights.reshape(-1) * mine)[order][:, None]  # [T*K, 1]: 0 for other shards' pairs
    h = activation(gate, up) * keep.astype(xs.dtype)
    ys = grouped_matmul(h, w2, group_sizes)  # [T*K, d]
    return jnp.zeros(x.shape, jnp.float32).at[token_of].add(ys.astype(jnp.float32))


def _present(axes, mesh) -> tuple[str, ...]:
    return tuple(a for a in axes if a in mesh.axis_names)


def _one(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def routed_experts_parallel(x: Float[Array, "t d"], idx: Int[Array, "t k"], weights: Float[Array, "t k"],
                            w1: Float[Array, "e d i"], w3: Float[Array, "e d i"], w2: Float[Array, "e i d"],
                            activation: Callable, rules: ShardingRules = DEFAULT_RULES,
                            mesh=None, dispatch: str | None = None,
                            _ragged_collective: dp.RaggedCollective | None = None) -> Float[Array, "t d"]:
    """The routed experts' output [T, d] (float32) on the active (or given) mesh; see the module docstring.

    `dispatch`: one of `dispatch.DISPATCH_MODES`; None takes the mode set by `dispatch.moe_dispatch`
    ("auto" unless set). `_ragged_collective` replaces `jax.lax.ragged_all_to_all` (tests on CPU pass
    `dispatch.emulated_ragged_all_to_all` to check the ragged path's metadata; it skips the CPU refusal).
    """
    mesh = mesh if mesh is not None else active_mesh()
    if mesh is None:
        raise ValueError("routed_experts_parallel: no mesh given and none active (use jax.set_mesh(mesh))")
    sizes = dict(mesh.shape)
    batch_axes = _present(rules.mesh_axes("batch"), mesh)
    expert_axes = _present(rules.mesh_axes("experts"), mesh)
    mlp_axes = _present(rules.mesh_axes("mlp"), mesh)
    if len(expert_axes) > 1:
        raise ValueError(f"routed_experts_parallel: the 'experts' rule must name one mesh axis, got {expert_axes}")
    expert_axis = expert_axes[0] if expert_axes else None
    if expert_axis is not None and expert_axis not in batch_axes:
        raise ValueError(f"routed_experts_parallel: the 'batch' rule {batch_axes} must include {expert_axis!r}")
    n_batch = math.prod(sizes[a] for a in batch_axes)
    n_expert = sizes[expert_axis] if expert_axis else 1
    n_mlp = math.prod(sizes[a] for a in mlp_axes)
    E, I = w1.shape[0], w1.shape[2]
    if x.shape[0] % n_batch:
        raise ValueError(f"routed_experts_parallel: {x.shape[0]} tokens do not split over batch axes "
                         f"{batch_axes} of size {n_batch}")
    if E % n_expert:
        raise ValueError(f"routed_experts_parallel: {E} experts do not split over mesh axis {expert_axis!r} "
                         f"of size {n_expert}")
    if I % n_mlp:
        raise ValueError(f"routed_experts_parallel: moe_intermediate_size {I} does not split over {mlp_axes}")
    mode = dp.check_dispatch(dp.current_dispatch() if dispatch is None else dispatch, "moe_dispatch")
    platform = "emulated" if _ragged_collective is not None else _platform(mesh)
    mode = dp.resolve_dispatch(mode, platform, n_expert, idx.shape[-1],
                               spans_processes=expert_axis is not None and _spans_processes(mesh, expert_axis))
    if expert_axis is None:
        mode = "all_gather"  # no expert axis: every shard holds all experts, nothing to exchange
    collective = _ragged_collective or jax.lax.ragged_all_to_all

    def a2a_body(x, idx, weights, w1, w3, w2):
        out = dp.a2a_expert_ffn(x, idx, weights, w1, w3, w2, activation, expert_axis, mode, collective)  # [T_local, d]
        return jax.lax.psum(out, mlp_axes) if mlp_axes else out

    def body(x, idx, weights, w1, w3, w2):
        if expert_axis is not None:
            x = jax.lax.all_gather(x, expert_axis, axis=0, tiled=True)  # [T_group, d]
            idx = jax.lax.all_gather(idx, expert_axis, axis=0, tiled=True)  # [T_group, K]
            weights = jax.lax.all_gather(weights, expert_axis, axis=0, tiled=True)  # [T_group, K]
            first = jax.lax.axis_index(expert_axis) * w1.shape[0]
        else:
            first = 0
        out = local_expert_ffn(x, idx, weights, w1, w3, w2, first, activation)  # [T_group, d] partial
        if expert_axis is not None:
            out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)  # [T_local, d]
        if mlp_axes:
            out = jax.lax.psum(out, mlp_axes)
        return out

    tok = P(_one(batch_axes), None)
    w_in = P(_one(expert_axes), None, _one(mlp_axes))  # [E, d, I]
    w_out = P(_one(expert_axes), _one(mlp_axes), None)  # [E, I, d]
    fn = body if mode == "all_gather" else a2a_body
    return jax.shard_map(fn, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok)(
        x, idx, weights, w1, w3, w2)


def _spans_processes(mesh, axis: str) -> bool:
    """Whether some group of devices along mesh axis `axis` (an expert group) holds devices of several processes
    (False for an abstract mesh: no devices to tell)."""
    try:
        procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    except (AttributeError, ValueError):
        return False
    procs = np.moveaxis(procs, mesh.axis_names.index(axis), -1)
    return bool((procs != procs[..., :1]).any())


def _platform(mesh) -> str:
    """The mesh's device platform ("cpu", "gpu", "tpu"); the default backend for an abstract mesh."""
    try:
        return mesh.devices.flat[0].platform
    except (AttributeError, ValueError):  # AbstractMesh has no devices
        return jax.default_backend()
