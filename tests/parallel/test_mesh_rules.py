"""Mesh sizes from config, the rules table and the logical -> physical translation (no compiles)."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from v4jax.model.config import ConfigError
from v4jax.parallel import (
    ShardingRules,
    abstract_mesh,
    logical_to_physical,
    make_mesh,
    mesh_shape,
)
from v4jax.parallel import shardings as sh


def test_minus_one_takes_the_rest():
    assert mesh_shape({"data": 2, "expert": -1}, 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert mesh_shape({"data": -1}, 8)["data"] == 8
    assert mesh_shape({"fsdp": 2, "expert": 2, "tensor": 2}, 8) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}


@pytest.mark.parametrize("cfg, n, field", [
    ({"data": 2, "expert": 8}, 8, "config.mesh: "),
    ({"data": 3, "expert": -1}, 8, "config.mesh.expert: "),
    ({"data": -1, "expert": -1}, 8, "config.mesh: at most one"),
    ({"data": 0}, 8, "config.mesh.data: "),
    ({"pipeline": 2}, 8, "config.mesh.pipeline: "),
])
def test_bad_mesh_is_a_one_line_error(cfg, n, field):
    with pytest.raises(ConfigError) as err:
        mesh_shape(cfg, n)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_make_mesh_uses_the_devices():
    mesh = make_mesh({"data": 2, "expert": 4})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert mesh.devices.size == len(jax.devices()) == 8
    sub = make_mesh({"expert": -1}, jax.devices()[:4])
    assert dict(sub.shape)["expert"] == 4
    # fewer devices than there are (the default config is all 1: one device)
    assert make_mesh({}).devices.size == 1
    assert mesh_shape({"data": 2}, 8)["data"] == 2


def test_logical_to_physical_and_collisions():
    rules = ShardingRules()
    sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert logical_to_physical(("layers", "experts", "embed", "mlp"), rules, sizes, (3, 8, 16, 32)) == \
        P(None, "expert", "fsdp", None)  # tensor has size 1: nothing to split
    # a mesh axis that does not divide the dimension is dropped for that dimension
    assert logical_to_physical(("experts", "embed"), rules, sizes, (3, 16)) == P(None, "fsdp")
    assert logical_to_physical(("batch", None), rules, sizes, (8, 5)) == P(("data", "fsdp", "expert"), None)
    assert logical_to_physical(("batch", None), rules, sizes, (2, 5)) == P("data", None)
    with pytest.raises(ValueError, match="colliding"):
        logical_to_physical(("embed", "embed"), rules, sizes, (4, 4))
    with pytest.raises(ValueError, match="no rule for logical axis 'nonsense'"):
        logical_to_physical(("nonsense",), rules)
    with pytest.raises(ValueError, match="more than one rule"):
        ShardingRules((("embed", ()), ("embed", ("fsdp",))))
    swapped = rules.replace(embed=(), mlp=("fsdp",))
    assert logical_to_physical(("embed", "mlp"), swapped, sizes, (4, 4)) == P(None, "fsdp")


def test_optimizer_state_mirrors_params():
    import jax.numpy as jnp
    import optax

    params = {"a": {"kernel": jnp.zeros((4, 8))}, "b": jnp.zeros((3,))}
    specs = {"a": {"kernel": P("fsdp", None)}, "b": P()}
    opt = optax.adamw(1e-3).init(params)
    mirrored = sh.mirror_param_specs(opt, params, specs)
    adam = mirrored[0]
    assert adam.mu["a"]["kernel"] == P("fsdp", None) and adam.nu["a"]["kernel"] == P("fsdp", None)
    assert adam.count == P()


def test_per_device_bytes():
    mesh = abstract_mesh(data=2, expert=4)
    tree = {"w": jax.ShapeDtypeStruct((8, 16), jnp_float32()), "b": jax.ShapeDtypeStruct((5,), jnp_float32())}
    specs = {"w": P("expert", None), "b": P()}
    assert sh.per_device_bytes(tree, specs, mesh) == (2 * 16 + 5) * 4


def jnp_float32():
    import jax.numpy as jnp

    return jnp.float32
