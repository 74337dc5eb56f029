"""fake_quant: forward = dequantize(quantize(x)); backward = the straight-through definitions, also
under jit, vmap, scan and remat; stochastic rounding of the gradient is unbiased and lands on the grid."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from quant_reference import reference_quantize

from v4jax import quant


def _x(shape=(4, 128), seed=0, dtype=jnp.float32):
    # Student-t tails so that the OCP floor rule and NVFP4 really saturate some values.
    return jnp.asarray(np.random.default_rng(seed).standard_t(2.0, size=shape), dtype)


def _vjp(f, x, g):
    """(f(x), the VJP of f at x applied to g), compiled as one program."""

    def both(x, g):
        y, pullback = jax.vjp(f, x)
        return y, pullback(g)[0]

    return jax.jit(both)(x, g)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_ocp", "nvfp4", "fp8", "fp8_kv"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_quant_dequant_and_plain_gradient_is_identity(fmt, dtype):
    x, g = _x(dtype=dtype), _x(seed=1, dtype=dtype)
    y, dx = _vjp(jax.jit(functools.partial(quant.fake_quant, fmt=fmt)), x, g)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.dequantize(quant.quantize(x, fmt))))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(g))


def _clip_mask(x: np.ndarray, fmt: str) -> np.ndarray:
    """|x| <= qmax * s per block, with s from the independent reference."""
    bk = {"mxfp4_ocp": 32, "nvfp4": 16, "mxfp4": 32}[fmt]
    _, scales, g, _ = reference_quantize(x, fmt)
    if fmt == "nvfp4":
        eff = scales.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * g
        y = x / np.repeat(eff, bk, axis=1)
        return np.abs(y) <= 6
    s = 2.0 ** (scales.astype(np.float64) - 127)
    return np.abs(x) <= 6 * np.repeat(s, bk, axis=1)


@pytest.mark.parametrize("fmt", ["mxfp4_ocp", "nvfp4", "mxfp4"])
def test_clipped_gradient_is_zero_exactly_where_values_saturate(fmt):
    x, g = _x(), _x(seed=1)
    _, dx = _vjp(lambda v: quant.fake_quant(v, fmt, ste="clipped"), x, g)
    mask = _clip_mask(np.asarray(x), fmt)
    np.testing.assert_array_equal(np.asarray(dx), np.where(mask, np.asarray(g), 0.0))
    if fmt == "mxfp4":
        assert mask.all()  # DeepSeek's ceil rule never clips
    else:
        assert not mask.all()  # the test really exercises the clipped branch


@pytest.mark.parametrize("ste", ["plain", "clipped"])
def test_gradient_under_scan_and_remat(ste):
    xs, gs = _x((3, 4, 64)), _x((3, 4, 64), seed=1)

    def body(carry, x):
        y = jax.checkpoint(lambda v: quant.fake_quant(v, "mxfp4_ocp", ste=ste))(x)
        return carry + jnp.sum(y * 0.0), y

    def f(xs):
        return jax.lax.scan(body, 0.0, xs)[1]

    _, dx = _vjp(jax.jit(f), xs, gs)
    mask = np.stack([_clip_mask(np.asarray(x), "mxfp4_ocp") for x in xs]) if ste == "clipped" else True
    np.testing.assert_array_equal(np.asarray(dx), np.where(mask, np.asarray(gs), 0.0))


def test_gradient_under_vmap_matches_unbatched():
    xs, gs = _x((3, 4, 64)), _x((3, 4, 64), seed=1)
    f = lambda v: quant.fake_quant(v, "mxfp4_ocp", ste="clipped")
    single = jax.jit(lambda x, g: _vjp(f, x, g)[1])
    batched = jax.jit(jax.vmap(single))(xs, gs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single(xs[i], gs[i])))
    y = jax.jit(jax.vmap(f))(xs)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.dequantize(quant.quantize(xs, "mxfp4_ocp"))))


def test_fake_quant_along_another_axis():
    x, g = _x((64, 8)), _x((64, 8), seed=1)
    y, dx = _vjp(lambda v: quant.fake_quant(v, "mxfp4", axis=0), x, g)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.fake_quant(x.T, "mxfp4")).T)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(g))


def test_stochastic_rounding_to_bf16_is_unbiased_and_on_the_grid():
    n = 160 * 128
    lo = np.float32(1.0)
    hi = np.float32(1.0 + 2.0**-7)  # next bf16 after 1
    true = np.float32(1.0 + 0.3 * 2.0**-7)
    x = jnp.zeros((n,))
    g = jnp.full((n,), true)
    _, dx = _vjp(lambda v: quant.fake_quant(v, "fp8", stochastic_rounding_key=jax.random.key(0)), x.reshape(-1, 128), g.reshape(-1, 128))
    dx = np.asarray(dx).ravel()
    assert set(np.unique(dx)) <= {lo, hi}
    p_up = np.mean(dx == hi)
    assert abs(p_up - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    assert np.asarray(dx, ml_dtypes.bfloat16).astype(np.float32).tolist() == dx.tolist()


def test_stochastic_rounding_to_fp4_grid_is_unbiased():
    n_rows = 4000
    # every row: one 6.0 (fixes the block scale to 1) and values between E2M1 grid points
    row = np.array([6.0, 0.2, 1.2, 2.6, -3.3, 4.5, -5.9, 0.7] * 4, np.float32)
    g = jnp.asarray(np.tile(row, (n_rows, 1)))
    key = jax.random.key(1)
    _, dx = _vjp(lambda v: quant.fake_quant(v, "mxfp4", stochastic_rounding_key=key, grad_format="mxfp4"), jnp.zeros_like(g), g)
    dx = np.asarray(dx)
    grid = np.array([0, .5, 1, 1.5, 2, 3, 4, 6])
    for j, v in enumerate(row[:8]):
        col = dx[:, j]
        below, above = grid[grid <= abs(v)].max(), grid[grid >= abs(v)].min()
        assert set(np.unique(np.abs(col))) <= {below, above}
        spread = (above - below) / 2 / np.sqrt(n_rows)
        assert abs(col.mean() - v) <= 4 * spread + 1e-6


def test_stochastic_rounding_keys_are_not_differentiated_and_work_under_jit():
    x, g = _x(), _x(seed=1) * 1e-3
    f = jax.jit(lambda v, k: quant.fake_quant(v, "mxfp4", stochastic_rounding_key=k))
    d1 = jax.vjp(lambda v: f(v, jax.random.key(0)), x)[1](g)[0]
    d2 = jax.vjp(lambda v: f(v, jax.random.key(1)), x)[1](g)[0]
    assert not np.array_equal(np.asarray(d1), np.asarray(d2))
    np.testing.assert_allclose(np.asarray(d1), np.asarray(g), rtol=2.0**-7)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="ste="):
        quant.fake_quant(jnp.ones((2, 32)), "mxfp4", ste="soft")
    with pytest.raises(ValueError, match="needs a stochastic_rounding_key"):
        quant.fake_quant(jnp.ones((2, 32)), "mxfp4", grad_format="mxfp4")
    with pytest.raises(ValueError, match="not a multiple"):
        quant.fake_quant(jnp.ones((2, 40)), "mxfp4")


def test_round_to_dtype_rounds_and_passes_gradient():
    x = jnp.asarray([1.0 + 2.0**-9, 3.0], jnp.float32)
    y, dx = _vjp(quant.round_to_dtype, x, jnp.ones(2))
    assert y.dtype == jnp.float32 and float(y[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(dx), 1.0)
