"""QArray is a pytree that survives jit, device_put with a NamedSharding (8 CPU devices) and orbax."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from v4jax import quant


def _assert_same(a: quant.QArray, b: quant.QArray):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert la.dtype == lb.dtype and la.shape == lb.shape
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(la)).view(np.uint8), np.atleast_1d(np.asarray(lb)).view(np.uint8))


def test_qarray_is_a_pytree_with_static_metadata():
    q = quant.quantize(jnp.ones((4, 64), jnp.bfloat16), "nvfp4")
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3  # values, scales, global scale
    q2 = jax.tree.unflatten(treedef, leaves)
    assert (q2.fmt, q2.shape, q2.dtype, q2.axis) == (quant.FORMATS["nvfp4"], (4, 64), jnp.bfloat16, 1)
    assert len(jax.tree.leaves(quant.quantize(jnp.ones((4, 64)), "mxfp4"))) == 2  # no per-tensor scale


def test_qarray_passes_through_jit():
    x = jax.random.normal(jax.random.key(0), (8, 64))
    q = quant.quantize(x, "mxfp4")

    @jax.jit
    def double_scales(q):  # takes and returns a QArray: x2 in every block
        return q.replace(scales=q.scales + 1)

    q2 = double_scales(q)
    assert isinstance(q2, quant.QArray) and q2.fmt == q.fmt
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q2)), 2 * np.asarray(quant.dequantize(q)))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8_weight_ue8m0", "fp8"])
def test_orbax_round_trip(tmp_path, fmt):
    x = jax.random.normal(jax.random.key(1), (128, 256), jnp.bfloat16)
    q = quant.quantize(x, fmt)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, q)
        ckptr.wait_until_finished()
        restored = ckptr.restore(path, quant.abstract_like(q))
    _assert_same(q, restored)
    assert restored.fmt == q.fmt and restored.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(quant.dequantize(restored), np.float32), np.asarray(quant.dequantize(q), np.float32))


SHARDING_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from v4jax import quant

    mesh = jax.make_mesh((8,), ("n",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.random.normal(jax.random.key(0), (64, 128))
    for fmt in ("mxfp4", "nvfp4", "fp8_kv"):
        q = quant.quantize(x, fmt)
        shardings = q.shardings_like(mesh, P("n", None))
        qs = jax.device_put(q, shardings)
        assert len(qs.values.sharding.device_set) == 8, fmt
        assert qs.values.addressable_shards[0].data.shape[0] == 8, fmt
        assert qs.scales.addressable_shards[0].data.shape[0] == 8, fmt
        # quantize a sharded input under jit and ask for sharded outputs
        xs = jax.device_put(x, jax.NamedSharding(mesh, P("n", None)))
        q2 = jax.jit(lambda v: quant.quantize(v, fmt), out_shardings=shardings)(xs)
        assert q2.values.sharding.spec == P("n", None), fmt
        y = jax.jit(quant.dequantize)(q2)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.dequantize(q)))
    print("SHARDING_OK")
    """
)


def test_sharded_qarray_on_8_cpu_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert "SHARDING_OK" in out.stdout, out.stderr[-3000:]
