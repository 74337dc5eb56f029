"""Shardings for parameters, buffers, optimizer state, the whole TrainState and activations.

Parameters get the PartitionSpec their logical names translate to (`rules.py`). Optimizer-state leaves
that mirror a parameter (Adam moments, Muon momentum: same key path suffix, same shape) get that
parameter's spec, so the optimizer state is split exactly like the weights (FSDP of the state too);
every other leaf (counts, scalars, factored statistics) is replicated. Model buffers (router biases,
hash tables) are small and replicated. Batches are split on their leading axis over the `batch` rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax.parallel.rules import ShardingRules, logical_to_physical

AnyMesh = Mesh | AbstractMesh


def mesh_sizes(mesh: AnyMesh) -> dict[str, int]:
    return dict(mesh.shape)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(path) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def abstract_variables(model: nn.Module, tokens: jax.Array) -> tuple[dict, dict]:
    """(unboxed ShapeDtypeStruct variables, logical PartitionSpec tree) of a flax model, from abstract init."""
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def specs_from_logical(abstract: Any, logical: Any, rules: ShardingRules, mesh: AnyMesh) -> Any:
    """PartitionSpec tree of mesh axes for a tree of arrays and its tree of logical PartitionSpecs."""
    sizes = mesh_sizes(mesh)

    def one(leaf, spec):
        names = tuple(spec) if spec is not None else ()
        if len(names) < leaf.ndim:  # unannotated (P()) leaves are replicated
            names = names + (None,) * (leaf.ndim - len(names))
        return logical_to_physical(names, rules, sizes, leaf.shape)

    return jax.tree.map(one, abstract, logical, is_leaf=lambda x: isinstance(x, P))


def model_param_specs(model: nn.Module, tokens: jax.Array, rules: ShardingRules, mesh: AnyMesh) -> dict:
    """{'params': specs, 'buffers': specs} for a v4jax model on `mesh` (abstract: nothing is allocated)."""
    abstract, logical = abstract_variables(model, tokens)
    return {k: specs_from_logical(abstract[k], logical[k], rules, mesh) for k in abstract}


def mirror_param_specs(tree: Any, params: Any, param_specs: Any) -> Any:
    """Specs for `tree` (e.g. an optimizer state): a leaf whose key path ends with a parameter's key path
    and has that parameter's shape gets its spec; anything else is replicated."""
    index = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))):
        index[_path(path)] = (tuple(leaf.shape), spec)

    def one(path, leaf):
        keys = _path(path)
        for start in range(len(keys)):
            hit = index.get(keys[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(one, tree)


def state_specs(abstract_state: Any, param_specs: Any) -> Any:
    """PartitionSpecs of a `TrainState` (params / buffers / opt_state / step / rng)."""
    replicated = lambda t: jax.tree.map(lambda _: P(), t)
    return abstract_state.replace(
        step=P(), rng=P(), params=param_specs,
        buffers=replicated(abstract_state.buffers),
        opt_state=mirror_param_specs(abstract_state.opt_state, abstract_state.params, param_specs))


def named(specs: Any, mesh: AnyMesh) -> Any:
    """PartitionSpec tree -> NamedSharding tree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(rules: ShardingRules, mesh: AnyMesh, ndim: int = 2, batch_size: int | None = None) -> P:
    """Spec of a [B, ...] activation: B over the `batch` rule's mesh axes (those that divide B)."""
    names = ("batch",) + (None,) * (ndim - 1)
    shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
    return logical_to_physical(names, rules, mesh_sizes(mesh), shape)


def batch_shardings(batch: Mapping[str, Any], rules: ShardingRules, mesh: AnyMesh) -> dict:
    """NamedShardings for a dict of [B, ...] arrays."""
    return {k: NamedSharding(mesh, batch_spec(rules, mesh, np.ndim(v), np.shape(v)[0])) for k, v in batch.items()}


def per_device_bytes(abstract: Any, specs: Any, mesh: AnyMesh) -> int:
    """Bytes one device holds of `abstract` laid out by `specs` (each dim divided by its mesh axes' sizes)."""
    sizes = mesh_sizes(mesh)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        n = 1
        for i, dim in enumerate(leaf.shape):
            entry = spec[i] if i < len(spec) else None
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            n *= -(-dim // math.prod(sizes[a] for a in axes))
        total += n * jnp.dtype(leaf.dtype).itemsize
    return total
