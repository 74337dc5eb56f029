"""MXFP4 -> FP8 (128x128 blocks): the spec 7.3 rule implies an exact conversion, and fails where it should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant
from v4jax.quant import e8m0


def _fp8_dequant(r: quant.Fp8Blocks) -> np.ndarray:
    s = np.asarray(e8m0.e8m0_to_float(r.scales))
    return np.asarray(r.values.astype(jnp.float32)) * np.kron(s, np.ones((128, 128), np.float32))


def _weight_with_block_gaps(gaps: dict, seed=0) -> np.ndarray:
    """[256, 256] weight of values in [1, 2); sub-block (row 0, cols 32j..) of FP8 block b is scaled by 2**-gap."""
    w = np.random.default_rng(seed).uniform(1.0, 2.0, size=(256, 256)).astype(np.float32) * 0.02
    for (bi, bj), gap in gaps.items():
        w[bi * 128, bj * 128: bj * 128 + 32] *= 2.0**-gap
    return w


def test_gaussian_weight_is_lossless_and_converts_exactly():
    w = jax.random.normal(jax.random.key(0), (256, 512)) * 0.02
    q = quant.quantize(w, "mxfp4")
    assert float(quant.lossless_fraction(q)) == 1.0
    r = quant.mxfp4_to_fp8(q)
    assert r.values.dtype == jnp.float8_e4m3fn and r.scales.shape == (2, 4)
    assert bool(r.exact.all())
    np.testing.assert_array_equal(_fp8_dequant(r), np.asarray(quant.dequantize(q)))


def test_rule_thresholds_14_and_11():
    # gaps of 10, 12, 16 octaves between the largest and the smallest 1x32 scale of three blocks
    w = _weight_with_block_gaps({(0, 0): 10, (0, 1): 12, (1, 0): 16})
    q = quant.quantize(jnp.asarray(w), "mxfp4")
    sub = np.asarray(quant.lossless_blocks(q))
    normal_only = np.asarray(quant.lossless_blocks(q, allow_subnormals=False))
    np.testing.assert_array_equal(sub, [[True, True], [False, True]])
    np.testing.assert_array_equal(normal_only, [[True, False], [False, True]])
    r = quant.mxfp4_to_fp8(q)
    np.testing.assert_array_equal(np.asarray(r.exact), [[True, True], [False, True]])
    deq, fp8 = np.asarray(quant.dequantize(q)), _fp8_dequant(r)
    np.testing.assert_array_equal(fp8[:128], deq[:128])
    assert not np.array_equal(fp8[128:, :128], deq[128:, :128])
    assert float(quant.lossless_fraction(q)) == 0.75


def test_rule_implies_exact_on_heavy_tailed_weights():
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, size=(512, 512)).astype(np.float32)
    # each 128x128 block gets its own spread of 1x32 sub-block scales, 2**-6 .. 2**-20 wide
    widths = rng.integers(6, 21, size=(4, 1, 4, 1))
    exps = np.floor(-rng.uniform(size=(4, 128, 4, 4)) * widths).reshape(512, 16)
    w *= (2.0**exps).repeat(32, axis=1).astype(np.float32)
    q = quant.quantize(jnp.asarray(w), "mxfp4")
    rule, exact = np.asarray(quant.lossless_blocks(q)), np.asarray(quant.mxfp4_to_fp8(q).exact)
    assert np.all(exact[rule]) and 0 < rule.mean()
    assert not rule.all()


def test_all_zero_sub_blocks_do_not_count():
    w = np.full((128, 128), 0.02, np.float32)
    w[5, 64:96] = 0.0
    q = quant.quantize(jnp.asarray(w), "mxfp4")
    assert bool(quant.lossless_blocks(q)[0, 0])
    assert bool(quant.mxfp4_to_fp8(q).exact[0, 0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="needs an MXFP4"):
        quant.lossless_fraction(quant.quantize(jnp.ones((128, 128)), "nvfp4"))
    with pytest.raises(ValueError, match="multiples of 128"):
        quant.lossless_fraction(quant.quantize(jnp.ones((64, 128)), "mxfp4"))
