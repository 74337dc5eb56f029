"""Checkpoints saved on one mesh restore onto another: 8 -> 4 -> 1 devices, params and optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from v4jax.parallel import ShardingRules, make_mesh
from v4jax.parallel import shardings as sh
from v4jax.train.checkpoint import Checkpointer
from v4jax.train.state import TrainState

ROUTING = {"indices": np.zeros((1, 2), np.int32)}
LOGICAL = {"experts": {"w1": ("layers", "experts", "embed", "mlp")}, "head": {"kernel": ("embed", "vocab")},
           "norm": {"scale": ("norm",)}}


def make_state(seed: int) -> TrainState:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"experts": {"w1": jax.random.normal(k1, (2, 8, 16, 32))},
              "head": {"kernel": jax.random.normal(k2, (16, 64))}, "norm": {"scale": jax.random.normal(k3, (16,))}}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p), params)  # one update so the moments are not zeros
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(step=jnp.asarray(1, jnp.int32), params=params, buffers={"bias": jnp.arange(8.0)},
                      opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)))


def on_mesh(state: TrainState, mesh) -> TrainState:
    specs = sh.specs_from_logical(state.params, jax.tree.map(lambda t: jax.sharding.PartitionSpec(*t), LOGICAL,
                                                             is_leaf=lambda t: isinstance(t, tuple)),
                                  ShardingRules(), mesh)
    return jax.device_put(state, sh.named(sh.state_specs(state, specs), mesh))


def test_restore_across_meshes(tmp_path):
    reference = make_state(0)
    mesh8 = make_mesh({"fsdp": 2, "expert": 4})
    saved = on_mesh(reference, mesh8)
    assert saved.params["experts"]["w1"].sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    assert saved.opt_state[0].mu["experts"]["w1"].sharding.spec == saved.params["experts"]["w1"].sharding.spec
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=3, use_async=False)
    ckpt.save(1, saved, {"model_fingerprint": "x"}, ROUTING)
    ckpt.wait()

    # 8 -> 4 devices, another layout; then save there and restore on 1 device
    mesh4 = make_mesh({"data": 2, "expert": 2}, jax.devices()[4:])
    template4 = on_mesh(make_state(1), mesh4)  # other values: the restore must overwrite them
    step, restored4, _, _ = ckpt.restore_latest(template4)
    assert step == 1
    for got, want, tmpl in zip(jax.tree.leaves(restored4), jax.tree.leaves(reference), jax.tree.leaves(template4)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == tmpl.sharding
    assert restored4.params["experts"]["w1"].addressable_shards[0].data.shape == (2, 4, 16, 32)
    ckpt.save(2, restored4, {"model_fingerprint": "x"}, ROUTING)
    ckpt.wait()

    mesh1 = make_mesh({}, jax.devices()[7:])
    template1 = on_mesh(make_state(2), mesh1)
    step, restored1, _, _ = ckpt.restore_latest(template1)
    assert step == 2
    for got, want in zip(jax.tree.leaves(restored1), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.device_set == {jax.devices()[7]}
    ckpt.close()
