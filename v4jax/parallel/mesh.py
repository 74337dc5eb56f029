"""Device meshes from `config.mesh`: four named axes (data, fsdp, expert, tensor), one of them may be -1.

`mesh_shape` resolves the sizes against a device count and raises a one-line `ConfigError` when they do
not multiply out; `make_mesh` builds the `jax.sharding.Mesh` (Auto axes: XLA inserts the collectives for
dense layers, the MoE dispatch runs under `jax.shard_map`); `abstract_mesh` is the device-free twin used
to plan shardings for meshes larger than the machine (golden specs, memory estimates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from v4jax.model.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
MESH_OPTIONS = ("moe_dispatch",)  # non-axis fields of config.mesh (read by MeshPlan, not by the mesh)


def _sizes_of(mesh_cfg: Mapping[str, Any] | Any) -> dict[str, int]:
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d: getattr(mesh_cfg, k, d)
    unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES) - set(MESH_OPTIONS)) if hasattr(mesh_cfg, "keys") else []
    if unknown:
        raise ConfigError(f"config.mesh.{unknown[0]}: unknown mesh axis (known: {', '.join(MESH_AXES)})")
    sizes = {axis: get(axis, 1) for axis in MESH_AXES}
    for axis, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or not (v >= 1 or v == -1):
            raise ConfigError(f"config.mesh.{axis}: must be a positive integer or -1, got {v!r}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    return sizes


def mesh_shape(mesh_cfg: Mapping[str, Any] | Any, num_devices: int) -> dict[str, int]:
    """{axis: size} for `num_devices` devices, the -1 axis (if any) taking what the others leave.

    Without a -1 the mesh may use fewer devices than there are (the default, all sizes 1, is one device;
    `make_mesh` takes the first ones). Raises a one-line ConfigError when it needs more than there are.
    """
    sizes = _sizes_of(mesh_cfg)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"config.mesh.{fill[0]}: -1 cannot fill {num_devices} devices: the other axes "
                              f"multiply to {fixed}, which does not divide {num_devices}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed > num_devices:
        shown = " x ".join(f"{a}={v}" for a, v in sizes.items() if v != 1) or "all 1"
        raise ConfigError(f"config.mesh: {shown} needs {fixed} devices but {num_devices} are available "
                          "(set one axis to -1 to use all of them)")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, Any] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh of `config.mesh` over (the first of) `devices` (default `jax.devices()`), Auto axes."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = devices[:math.prod(shape)]
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    # A sub-set of the devices (tests, cross-mesh restore): a plain row-major layout.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def abstract_mesh(**sizes: int) -> AbstractMesh:
    """A device-free mesh over the four axes (unnamed axes get size 1), e.g. `abstract_mesh(data=8, expert=32)`."""
    resolved = mesh_shape(sizes, math.prod(v for v in sizes.values()))
    return AbstractMesh(tuple(resolved[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))
