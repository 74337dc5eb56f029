"""QAT policy: config defaults and validation, the start/ramp schedule, and apply_qat's forward/backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant
from v4jax.model.config import ConfigError


def _cfg(**overrides):
    c = quant.default_qat_config()
    c.enabled = True
    for k, v in overrides.items():
        c[k] = v
    return c


def test_defaults_are_off_and_valid():
    c = quant.default_qat_config()
    quant.validate_qat_config(c)
    p = quant.QATPolicy.from_config(c)
    assert not p.enabled
    assert all(p.format_for(t) is None for t in quant.TENSORS)
    assert float(quant.qat_active(10**6, 10**6, p)) == 0.0
    x = jnp.ones((2, 32))
    assert quant.apply_qat(x, "experts", p, 1.0) is x


def test_enabled_policy_formats():
    p = quant.QATPolicy.from_config(_cfg(kv_format="fp8_kv"))
    assert p.format_for("experts").name == "mxfp4"
    assert p.format_for("indexer_q").name == p.format_for("indexer_k").name == "mxfp4"
    assert p.format_for("kv").name == "fp8_kv"
    with pytest.raises(ValueError, match="not one of"):
        p.format_for("router")


@pytest.mark.parametrize(
    "field, value",
    [
        ("experts_format", "int4"),
        ("grad_format", "mxfp4"),  # without stochastic_rounding
        ("ste", "soft"),
        ("ramp_steps", -1),
        ("start_step", -5),
        ("start_fraction", 1.5),
        ("enabled", 1),
        ("bogus", 3),
    ],
)
def test_bad_fields_are_one_line_errors_naming_the_field(field, value):
    d = quant.default_qat_config().to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=rf"^config\.qat\.{field}: ") as e:
        quant.validate_qat_config(d)
    assert "\n" not in str(e.value)


def test_start_step_and_fraction_are_exclusive():
    with pytest.raises(ConfigError, match=r"config\.qat\.start_step: .*not both"):
        quant.validate_qat_config(_cfg(start_step=10, start_fraction=0.5))


@pytest.mark.parametrize(
    "overrides, total, expected",
    [
        ({"start_step": 50}, 100, {0: 0.0, 49: 0.0, 50: 1.0, 99: 1.0}),
        ({"start_fraction": 0.9}, 1000, {899: 0.0, 900: 1.0}),
        ({"start_step": 10, "ramp_steps": 4}, 100, {9: 0.0, 10: 0.25, 11: 0.5, 13: 1.0, 50: 1.0}),
        ({}, 100, {0: 1.0}),
    ],
)
def test_schedule(overrides, total, expected):
    p = quant.QATPolicy.from_config(_cfg(**overrides))
    for step, want in expected.items():
        assert float(quant.qat_active(step, total, p)) == want
    steps = jnp.arange(total)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda s: quant.qat_active(s, total, p))(steps)),
        [float(quant.qat_active(int(s), total, p)) for s in steps],
    )


def test_apply_qat_blends_forward_and_keeps_the_straight_through_gradient():
    p = quant.QATPolicy.from_config(_cfg())
    x = jax.random.normal(jax.random.key(0), (4, 64))
    g = jax.random.normal(jax.random.key(1), (4, 64))
    fq = quant.fake_quant(x, "mxfp4")
    for a in (0.0, 0.25, 1.0):
        y, pull = jax.vjp(lambda v, a=a: quant.apply_qat(v, "experts", p, a), x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x + a * (fq - x)), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(pull(g)[0]), np.asarray(g), rtol=1e-6)
        if a in (0.0, 1.0):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(fq if a else x))


def test_apply_qat_with_stochastic_rounding_needs_a_key():
    p = quant.QATPolicy.from_config(_cfg(stochastic_rounding=True, grad_format="mxfp4"))
    x = jnp.ones((2, 32))
    with pytest.raises(ValueError, match="needs a key"):
        quant.apply_qat(x, "experts", p, 1.0)
    y = quant.apply_qat(x, "experts", p, 1.0, key=jax.random.key(0))
    assert y.shape == x.shape


def test_cast_index_scores():
    s = jnp.asarray([1.0 + 2.0**-10, 2.0], jnp.float32)
    on = quant.QATPolicy.from_config(_cfg())
    off = quant.QATPolicy.from_config(_cfg(index_scores_bf16=False))
    assert float(quant.cast_index_scores(s, on)[0]) == 1.0
    assert quant.cast_index_scores(s, off) is s


def test_full_config_accepts_the_qat_block():
    config_mod = pytest.importorskip("v4jax.config")
    cfg = config_mod.default_config()
    assert cfg.qat.to_dict() == quant.default_qat_config().to_dict()
