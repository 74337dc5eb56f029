"""quantize / dequantize are bit-exact against the independent numpy + ml_dtypes reference."""

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from quant_reference import HF_LUT, reference_quantize

from v4jax import quant
from v4jax.quant import e2m1

FORMATS_1D = ["mxfp4", "mxfp4_ocp", "nvfp4", "fp8", "fp8_ue8m0", "fp8_kv"]
FORMATS_2D = ["nvfp4_2d", "fp8_weight", "fp8_weight_ue8m0"]


def _inputs(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m, k = shape
    if kind == "gaussian":
        return rng.standard_normal(shape).astype(np.float32) * 0.02
    if kind == "heavy":
        return rng.standard_t(1.5, size=shape).astype(np.float32)
    if kind == "zero_blocks":
        x = rng.standard_normal(shape).astype(np.float32)
        x[: m // 2, : k // 2] = 0.0
        x[m // 2:, k // 2:] = -0.0
        return x
    if kind == "extreme":  # every 16-column strip of each row gets its own magnitude in 1e-30 .. 1e30
        mags = 10.0 ** rng.uniform(-30, 30, size=(m, k // 16, 1))
        return (rng.standard_normal((m, k // 16, 16)) * mags).reshape(shape).astype(np.float32)
    if kind == "ties":  # exact E2M1 / E4M3 midpoints times powers of two
        mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.25, -5.0, 0.1, -0.1])
        return (rng.choice(mids, size=shape) * 2.0 ** rng.integers(-3, 4, size=(m, 1))).astype(np.float32)
    raise ValueError(kind)


def _check_exact(x: np.ndarray, fmt: str, q: quant.QArray):
    values, scales, g, deq = reference_quantize(x, fmt)
    got_values = np.asarray(q.values)
    if got_values.dtype == np.uint8:
        np.testing.assert_array_equal(got_values, values)
    else:
        np.testing.assert_array_equal(got_values.view(np.uint8), values.view(np.uint8))
    got_scales = np.asarray(q.scales)
    if got_scales.dtype == ml_dtypes.float8_e4m3fn:
        np.testing.assert_array_equal(got_scales.view(np.uint8), scales.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    else:
        np.testing.assert_array_equal(got_scales, scales.astype(got_scales.dtype))
    if g is not None:
        assert np.float32(q.global_scale) == g
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), deq)


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "zero_blocks", "extreme", "ties"])
@pytest.mark.parametrize("fmt", FORMATS_1D)
def test_quantize_1d_blocks_bit_exact(fmt, kind):
    x = _inputs(kind, (8, 256), seed=_seed(fmt, kind))
    _check_exact(x, fmt, jax.jit(quant.quantize, static_argnums=1)(jnp.asarray(x), fmt))


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "zero_blocks"])
@pytest.mark.parametrize("fmt", FORMATS_2D)
def test_quantize_2d_blocks_bit_exact(fmt, kind):
    x = _inputs(kind, (256, 256), seed=_seed(fmt, kind))
    _check_exact(x, fmt, quant.quantize(jnp.asarray(x), fmt))


def test_nvfp4_block_scale_is_two_rounded_divisions():
    """Seed 1282: a block whose amax / 6 / g is 336 exactly (E4M3: a tie, to even 320); XLA's rewrite of the
    two divisions into amax / (6 g) gave 336.00003 (and 352) before the barrier in compute_block_scales."""
    x = _inputs("gaussian", (256, 256), seed=1282)
    _check_exact(x, "nvfp4_2d", quant.quantize(jnp.asarray(x), "nvfp4_2d"))


def _seed(fmt, kind) -> int:
    """A per-case seed that is the same in every process (Python's str hash is salted per process)."""
    return zlib.crc32(f"{fmt}/{kind}".encode())


def test_all_zero_block_gets_floor_scale():
    q = quant.quantize(jnp.zeros((2, 64)), "mxfp4")
    assert np.all(np.asarray(q.scales) == 1)  # 2**-126: amax floored at 6 * 2**-126
    assert np.all(np.asarray(quant.dequantize(q)) == 0)
    q8 = quant.quantize(jnp.zeros((1, 128)), "fp8")
    np.testing.assert_array_equal(np.asarray(q8.scales), np.float32(1e-4) / np.float32(448))


def test_ceil_rule_differs_from_e8m0_cast():
    # amax = 6 * 3 -> ceil rule 2**2 = 4; a cast of 3.0 to float8_e8m0fnu would round to 4 as well, but
    # amax = 6 * 1.4 -> ceil gives 2 while the nearest power of two is 1.
    x = jnp.zeros((1, 32)).at[0, 0].set(6 * 1.4)
    q = quant.quantize(x, "mxfp4")
    assert int(q.scales[0, 0]) == 127 + 1
    assert float(ml_dtypes.float8_e8m0fnu(1.4)) == 1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dequantize_returns_input_dtype_and_shape(dtype):
    x = jax.random.normal(jax.random.key(0), (3, 5, 64), dtype)
    for fmt in ("mxfp4", "nvfp4", "fp8_kv"):
        q = quant.quantize(x, fmt)
        y = quant.dequantize(q)
        assert y.shape == x.shape and y.dtype == x.dtype
        _, _, _, deq = reference_quantize(np.asarray(x, np.float32).reshape(15, 64), fmt)
        np.testing.assert_array_equal(np.asarray(y), deq.reshape(3, 5, 64).astype(dtype))


def test_axis_argument_matches_transposed_input():
    x = jax.random.normal(jax.random.key(1), (64, 6))
    q0 = quant.quantize(x, "mxfp4", axis=0)
    qt = quant.quantize(x.T, "mxfp4")
    assert q0.values.shape == (32, 6) and q0.scales.shape == (2, 6)
    np.testing.assert_array_equal(np.asarray(q0.values), np.asarray(qt.values).T)
    np.testing.assert_array_equal(np.asarray(q0.scales), np.asarray(qt.scales).T)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q0)), np.asarray(quant.dequantize(qt)).T)


def test_one_dimensional_input():
    x = jax.random.normal(jax.random.key(2), (96,))
    q = quant.quantize(x, "mxfp4")
    assert q.values.shape == (48,) and q.scales.shape == (3,)
    _, _, _, deq = reference_quantize(np.asarray(x)[None], "mxfp4")
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), deq[0])


@pytest.mark.parametrize(
    "shape, fmt, kwargs, match",
    [
        ((4, 48), "mxfp4", {}, "not a multiple of the mxfp4 block 32"),
        ((40, 128), "fp8_weight", {}, "not a multiple of the fp8_weight block 128"),
        ((32, 32), "nvfp4_2d", {"axis": 0}, "axis must be -1"),
        ((4, 32), "mxfp4", {"axis": 2}, "out of range"),
        ((4, 32), "int3", {}, "is not one of"),
    ],
)
def test_bad_input_is_a_one_line_error(shape, fmt, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        quant.quantize(jnp.ones(shape), fmt, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8", "fp8_ue8m0"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_block_dequantizes_to_nan_and_spares_the_others(fmt, bad):
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    x[1, 3] = bad
    y = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), fmt)))
    block = quant.get_format(fmt).block[1]
    assert np.all(np.isnan(y[1, :block]))
    assert np.all(np.isfinite(y[0])) and np.all(np.isfinite(y[1, block:]))
    np.testing.assert_array_equal(y[1, block:], reference_quantize(x[1:, block:], fmt)[3][0])


def test_nvfp4_non_finite_tensor_is_all_nan():
    x = jnp.ones((2, 32)).at[0, 0].set(jnp.inf)
    assert np.all(np.isnan(np.asarray(quant.dequantize(quant.quantize(x, "nvfp4")))))


def test_packing_round_trip_and_nibble_order():
    codes = jax.random.randint(jax.random.key(3), (5, 64), 0, 16).astype(jnp.uint8)
    packed = e2m1.pack_nibbles(codes)
    np.testing.assert_array_equal(np.asarray(packed) & 0xF, np.asarray(codes)[:, 0::2])
    np.testing.assert_array_equal(np.asarray(packed) >> 4, np.asarray(codes)[:, 1::2])
    np.testing.assert_array_equal(np.asarray(e2m1.unpack_nibbles(packed)), np.asarray(codes))
    every_byte = jnp.arange(256, dtype=jnp.uint8)[None]
    np.testing.assert_array_equal(np.asarray(e2m1.pack_nibbles(e2m1.unpack_nibbles(every_byte))), np.asarray(every_byte))


def test_e2m1_decode_matches_checkpoint_lut_and_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    got = np.asarray(e2m1.decode_e2m1(jnp.asarray(codes)))
    np.testing.assert_array_equal(got, HF_LUT)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(HF_LUT))
    np.testing.assert_array_equal(got, codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))


def _upstream_fp4_expert(rng, out=64, inp=128):
    packed = rng.integers(-128, 128, size=(out, inp // 2), dtype=np.int8)
    scale = rng.integers(110, 135, size=(out, inp // 32)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    return packed, scale


def _numpy_decode_upstream(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    b = packed.view(np.uint8)
    vals = np.empty((b.shape[0], b.shape[1] * 2), np.float32)
    vals[:, 0::2], vals[:, 1::2] = HF_LUT[b & 0xF], HF_LUT[b >> 4]
    s = scale.astype(np.float32)  # ml_dtypes decodes E8M0 exactly
    return vals * np.repeat(s, 32, axis=1)


def test_upstream_fp4_expert_decodes_like_hf():
    packed, scale = _upstream_fp4_expert(np.random.default_rng(4))
    q = quant.qarray_from_mxfp4_checkpoint(packed, scale, dtype=jnp.float32)
    assert q.shape == (64, 128)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), _numpy_decode_upstream(packed, scale))


def test_upstream_fp4_expert_through_the_checkpoint_reader(tmp_path):
    io = pytest.importorskip("v4jax.interop.safetensors_io")
    packed, scale = _upstream_fp4_expert(np.random.default_rng(5))
    path = str(tmp_path / "experts.safetensors")
    io.write_safetensors(path, {"w1.weight": packed, "w1.scale": scale})
    refs = io.read_header(path)
    q = quant.qarray_from_mxfp4_checkpoint(refs["w1.weight"].read(), refs["w1.scale"].read(), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), _numpy_decode_upstream(packed, scale))


def test_quantize_writes_what_the_checkpoint_decoder_reads():
    x = jax.random.normal(jax.random.key(6), (32, 128)) * 0.02
    q = quant.quantize(x, "mxfp4")
    packed = np.asarray(q.values).view(np.int8)
    scale = np.asarray(q.scales).view(ml_dtypes.float8_e8m0fnu)
    np.testing.assert_array_equal(_numpy_decode_upstream(packed, scale), np.asarray(quant.dequantize(q)))
