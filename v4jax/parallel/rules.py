"""Logical-axis rules as data: which mesh axes each logical name (from the model's parameter
declarations) is split over, and the translation to `PartitionSpec`s with a collision check.

The table is a plain tuple of `(logical name, mesh axes)` pairs so a researcher can read, print, diff
and replace it (`ShardingRules(table=...)`), as jax-llm-examples' `ShardingRules` does. Every logical
name the model uses must appear (a missing name is an error, not a silent replication), and one
parameter may not use a mesh axis twice. A mesh axis that does not divide its dimension is dropped for
that dimension (the dimension is replicated over it) rather than failing: tiny test models have
dimensions smaller than production meshes.

Defaults (scaling-book's recipe for MoE): experts over `expert`; the hidden (`embed`) axis of every
dense and expert weight over `fsdp` (ZeRO-3 style: gathered just before use); heads and MLP width over
`tensor`; activations' batch over (`data`, `fsdp`, `expert`). The scanned `layers` axis is never split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec as P

MeshAxes = tuple[str, ...]

DEFAULT_TABLE: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    # parameters
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("embed_out", ()),
    ("experts", ("expert",)),
    ("experts_router", ()),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("heads_flat", ("tensor",)),
    ("heads_flat_group", ("tensor",)),
    ("o_groups", ()),
    ("o_lora", ()),
    ("o_lora_flat", ()),
    ("q_lora", ()),
    ("kv", ()),
    ("compress", ()),
    ("window", ()),
    ("index_heads", ()),
    ("index_heads_flat", ()),
    ("norm", ()),
    ("hc_mix", ()),
    ("hc_head_mix", ()),
    ("hc_embed", ()),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> tuple of mesh axes (empty: replicated). `table` is the data; lookups go by name."""

    table: tuple[tuple[str, MeshAxes], ...] = DEFAULT_TABLE

    def __post_init__(self):
        names = [name for name, _ in self.table]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ShardingRules: logical axis {dup[0]!r} has more than one rule")

    def mesh_axes(self, logical: str) -> MeshAxes:
        for name, axes in self.table:
            if name == logical:
                return tuple(axes)
        raise ValueError(f"ShardingRules: no rule for logical axis {logical!r} (add it to the table)")

    def replace(self, **overrides: Sequence[str]) -> ShardingRules:
        """A copy with some names remapped, e.g. `rules.replace(embed=(), mlp=("fsdp",))`."""
        table = tuple((n, tuple(overrides.pop(n)) if n in overrides else a) for n, a in self.table)
        table += tuple((n, tuple(a)) for n, a in overrides.items())
        return ShardingRules(table)


def logical_to_physical(logical: Sequence[str | None], rules: ShardingRules,
                        mesh_sizes: Mapping[str, int] | None = None,
                        shape: Sequence[int] | None = None) -> P:
    """Translates a spec of logical names to a PartitionSpec of mesh axes.

    With `mesh_sizes` (and `shape`), mesh axes absent from the mesh or of size 1 are dropped, and so are
    axes that would not divide the dimension. Raises ValueError when two dimensions use the same mesh axis.
    """
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"logical spec {tuple(logical)} has {len(logical)} names for shape {tuple(shape)}")
    out = []
    for i, name in enumerate(logical):
        axes = () if name is None else rules.mesh_axes(name)
        if mesh_sizes is not None:
            axes = tuple(a for a in axes if mesh_sizes.get(a, 1) > 1)  # size-1 axes split nothing
            if shape is not None:
                kept = []
                for a in axes:  # keep a prefix of axes whose product divides the dimension
                    if shape[i] % (math.prod(mesh_sizes[k] for k in kept) * mesh_sizes[a]) == 0:
                        kept.append(a)
                axes = tuple(kept)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    flat = [a for entry in out if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
    if len(set(flat)) != len(flat):
        raise ValueError(f"colliding mesh axes: logical spec {tuple(logical)} -> {tuple(out)} uses an axis twice")
    return P(*out)
