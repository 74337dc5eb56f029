"""FP4 matmul kernels in interpret mode vs the dequantize-then-dot reference, on fresh random inputs.

Both Pallas interpreters (Triton's and Mosaic TPU's) fill output buffers with NaN before the kernel runs,
so "no NaN in the result" checks that every element was written (the poisoned-buffer check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fp4_reference import ref_dense as _ref_dense
from fp4_reference import ref_grouped as _ref_grouped
from fp4_reference import rel as _rel
from fp4_reference import sum_err as _sum_err
from fp4_reference import weight as _weight

from v4jax import quant
from v4jax.kernels import fp4_matmul
from v4jax.kernels.fp4_matmul import block_sizes, common, reference
from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.quant import e2m1, e8m0

KERNELS = ("triton", "mosaic_tpu")


def test_decoders_match_quant():
    codes = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(
        common.e2m1_to_f32(codes), e2m1.decode_e2m1(codes.astype(jnp.uint8))
    )
    byte = jnp.arange(256, dtype=jnp.int32)
    np.testing.assert_array_equal(
        common.e8m0_to_f32(byte), e8m0.e8m0_to_float(byte.astype(jnp.uint8))
    )
    lo, hi = common.decode_bytes(jnp.array([0x72, 0xA1], jnp.uint8))
    np.testing.assert_array_equal(lo, [1.0, 0.5])
    np.testing.assert_array_equal(hi, [6.0, -1.0])


@pytest.mark.parametrize("implementation", KERNELS)
def test_dense_matches_reference(implementation):
    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(
        kx, (5, 512), jnp.bfloat16
    )  # M not a multiple of the 16-row tile
    w = _weight(kw, (128, 512))
    y = fp4_matmul.fp4_matmul(x, w, implementation=implementation, interpret=True)
    assert y.shape == (5, 128) and y.dtype == jnp.bfloat16
    assert _rel(y, _ref_dense(x, w)) < 1e-2


def test_dense_split_k_and_xla_path():
    from v4jax.kernels.fp4_matmul import triton

    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(kx, (20, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    ref = _ref_dense(x, w)
    cfg = block_sizes.BlockConfig(block_m=16, block_n=32, block_k=64, split_k=4)
    assert (
        _rel(triton.dense(x, w.values, w.scales, cfg=cfg, interpret=True), ref) < 1e-5
    )
    assert _rel(fp4_matmul.fp4_matmul(x, w), ref) < 1e-5  # CPU default is the XLA path


@pytest.mark.parametrize("cfg", [
    dict(block_m=16, block_n=32, block_k=64, split_k=1),  # 4 K steps
    dict(block_m=16, block_n=32, block_k=256, split_k=1),  # one K step
    dict(block_m=16, block_n=32, block_k=64, split_k=2, fuse_x=True),  # 2 steps per split, x planes in the kernel
    dict(block_m=4, block_n=16, block_k=64, split_k=2),  # the CUDA-core (FMA) path
])
def test_dense_tilings_match_reference(cfg):
    """Several K-step counts, splits, fuse_x and the FMA path compute the same product."""
    from v4jax.kernels.fp4_matmul import triton

    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(kx, (20, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    ref = _ref_dense(x, w)
    y = triton.dense(x, w.values, w.scales, cfg=block_sizes.BlockConfig(**cfg), interpret=True)
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("implementation", KERNELS)
def test_grouped_matches_reference(implementation):
    key = jax.random.key(np.random.randint(1 << 30))
    kx, kw, kg = jax.random.split(key, 3)
    sizes = np.array(jax.random.randint(kg, (5,), 0, 14))
    sizes[1] = 0  # an empty group
    sizes[0] = max(sizes[0], 1)  # and at least one row (an all-zero reference has no relative error)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    m = int(sizes.sum()) + 3  # 3 trailing rows belong to no group: they must be zero
    x = jax.random.normal(kx, (m, 256), jnp.bfloat16)
    w = _weight(kw, (5, 128, 256))
    y = fp4_matmul.fp4_grouped_matmul(
        x, w, group_sizes, implementation=implementation, interpret=True
    )
    ref = _ref_grouped(x, w, sizes)
    assert _rel(y, ref) < 1e-2
    np.testing.assert_array_equal(np.asarray(y[m - 3 :]), 0)


@pytest.mark.parametrize("swap_ab", [False, True])
def test_grouped_k_steps_match_reference(swap_ab):
    """The grouped kernel with 4 K steps per tile equals the float reference, empty groups too."""
    from v4jax.kernels.fp4_matmul import triton

    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    sizes = np.array([5, 0, 19, 3])
    x = jax.random.normal(kx, (int(sizes.sum()), 256), jnp.float32)
    w = _weight(kw, (4, 64, 256))
    cfg = block_sizes.BlockConfig(block_m=16, block_n=32, block_k=64, swap_ab=swap_ab)
    y = triton.grouped(x, w.values, w.scales, jnp.asarray(sizes, jnp.int32), cfg=cfg, interpret=True)
    assert _rel(y, _ref_grouped(x, w, sizes)) < 1e-5


def test_dense_vjp_matches_reference():
    kx, kw, kd = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    x = jax.random.normal(kx, (7, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    dy = jax.random.normal(kd, (7, 64), jnp.float32)
    f = lambda xx: jnp.sum(
        fp4_matmul.fp4_matmul(xx, w, implementation="triton", interpret=True) * dy
    )
    g = lambda xx: jnp.sum(reference.fp4_matmul_reference(xx, w) * dy)
    v, dx = jax.value_and_grad(f)(x)
    v_ref, dx_ref = jax.value_and_grad(g)(x)
    assert _sum_err(v, v_ref, _ref_dense(x, w) * np.asarray(dy)) < 1e-6
    assert _rel(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("implementation", [None, "triton"])
def test_moe_grouped_api_value_and_vjp(implementation):
    """The MoE path: grouped_matmul with a QArray of [G, K, N] weights quantized along K (axis 1)."""
    kx, kw, kd = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    group_sizes = jnp.array([4, 0, 9, 3], jnp.int32)
    x = jax.random.normal(kx, (16, 256), jnp.float32)
    w_kn = _weight(kw, (4, 256, 64), axis=1)  # [G, K, N], the "x @ w" layout
    dy = jax.random.normal(kd, (16, 64), jnp.float32)
    wd = quant.dequantize(w_kn)  # [G, K, N]

    def f(xx):
        if implementation is None:
            return jnp.sum(grouped_matmul(xx, w_kn, group_sizes) * dy)
        w_nk = fp4_matmul.transpose_kn_to_nk(w_kn)
        return jnp.sum(
            fp4_matmul.fp4_grouped_matmul(
                xx, w_nk, group_sizes, implementation, interpret=True
            )
            * dy
        )

    v, dx = jax.value_and_grad(f)(x)
    v_ref, dx_ref = jax.value_and_grad(
        lambda xx: jnp.sum(jax.lax.ragged_dot(xx, wd, group_sizes) * dy)
    )(x)
    assert _sum_err(v, v_ref, jax.lax.ragged_dot(x, wd, group_sizes) * dy) < 1e-6
    assert _rel(dx, dx_ref) < 1e-5


def test_tile_schedule_covers_each_grouped_row_once():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        sizes = rng.integers(0, 40, size=rng.integers(1, 9))
        m, bm = int(sizes.sum()) + int(rng.integers(0, 20)), 16
        s = common.tile_schedule(jnp.asarray(sizes), m, bm)
        assert s.group.shape[0] == common.num_tiles(m, bm, len(sizes))
        owner = np.full(m, -1)
        for g, b, lo, hi in zip(*map(np.asarray, s)):
            assert lo == hi or (b * bm <= lo < hi <= (b + 1) * bm)
            assert np.all(owner[lo:hi] == -1)
            owner[lo:hi] = g
        expected = np.repeat(np.arange(len(sizes)), sizes)
        np.testing.assert_array_equal(owner[: len(expected)], expected)
        assert np.all(owner[len(expected) :] == -1)


def test_block_config_fit_and_tables():
    cfg = block_sizes.BlockConfig(block_m=128, block_n=128, block_k=512, split_k=8).fit(
        3, 96, 7168
    )
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 32, 512) and (
        7168 // 512
    ) % cfg.split_k == 0
    table = block_sizes.load_table("nvidia_h200")
    assert block_sizes.select(
        "dense", 1, chip="nvidia_h200"
    ) == block_sizes.BlockConfig(**table["dense"][0]["config"])
    assert block_sizes.select(
        "grouped", 10**6, chip="no_such_chip"
    ) == block_sizes.BlockConfig(**block_sizes.DEFAULTS["grouped"][-1]["config"])


def test_bad_inputs_raise_one_line_errors():
    w = _weight(jax.random.key(0), (64, 256))
    x = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="implementation"):
        fp4_matmul.fp4_matmul(x, w, implementation="cuda")
    with pytest.raises(ValueError, match="N % 64"):  # mosaic_gpu's wgmma tiles: 64 weight rows
        fp4_matmul.fp4_grouped_matmul(
            x, _weight(jax.random.key(1), (3, 96, 256)), jnp.ones((3,), jnp.int32), "mosaic_gpu"
        )
    with pytest.raises(ValueError, match="K=256"):
        fp4_matmul.fp4_matmul(jnp.ones((4, 128)), w)
    with pytest.raises(ValueError, match="mxfp4"):
        fp4_matmul.fp4_matmul(x, quant.quantize(jnp.ones((64, 256)), "nvfp4"))
    with pytest.raises(ValueError, match="last axis"):
        fp4_matmul.fp4_matmul(x, quant.quantize(jnp.ones((256, 64)), "mxfp4", axis=0))
    with pytest.raises(ValueError, match="group_sizes"):
        fp4_matmul.fp4_grouped_matmul(
            x, _weight(jax.random.key(1), (3, 64, 256)), jnp.ones((2,), jnp.int32)
        )


def test_word_plane_decode_is_exact_for_every_byte_and_scale():
    """The GPU kernels' decode (uint32 words, 8 nibble planes, float16 detour) equals quant.dequantize
    for all 256 byte values under all 256 E8M0 scales (255 = NaN)."""
    from v4jax.quant.qarray import QArray

    values = jnp.tile(jnp.arange(256, dtype=jnp.uint8), (256, 1))  # [256 rows, 256 bytes]: K = 512
    scales = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[:, None], (1, 16))  # row r: scale byte r
    w = QArray(values=values, scales=scales, global_scale=None, fmt=quant.get_format("mxfp4"),
               shape=(256, 512), dtype=jnp.float32, axis=1)
    ref = np.asarray(quant.dequantize(w), np.float32)
    words = common.as_words(values)  # [256, 64]
    s = common.scale_per_word(scales)
    planes = np.stack([np.asarray(common.decode_plane(words, j, s)) for j in range(common.PLANES)], -1)
    np.testing.assert_array_equal(planes.reshape(256, 512), ref)  # NaN rows compare equal as NaN


@pytest.mark.parametrize(
    "m, cfg",
    [
        (1, block_sizes.BlockConfig(1, 32, 256, 1, fuse_x=True)),  # CUDA-core FMA path, one row
        (5, block_sizes.BlockConfig(8, 32, 128, 2)),  # FMA, padded rows, split-K
        (16, block_sizes.BlockConfig(16, 32, 256, 2, fuse_x=True)),  # MMA, strided x planes, split-K
        (32, block_sizes.BlockConfig(32, 32, 128, 1, swap_ab=True)),  # y.T = W x.T with bm == bn
        (20, block_sizes.BlockConfig(16, 64, 256, 1, swap_ab=True, fuse_x=True)),
    ],
)
def test_dense_kernel_variants(m, cfg):
    from v4jax.kernels.fp4_matmul import triton

    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(kx, (m, 512), jnp.float32)
    w = _weight(kw, (64, 512))
    y = triton.dense(x, w.values, w.scales, cfg=cfg, interpret=True)
    assert y.shape == (m, 64)
    assert _rel(y, _ref_dense(x, w)) < 1e-5


@pytest.mark.parametrize("transpose", [False, True])
def test_dequantize_kernel_is_exact(transpose):
    from v4jax.kernels.fp4_matmul import triton

    w = _weight(jax.random.key(np.random.randint(1 << 30)), (3, 64, 512))  # [G, N, K]
    cfg = block_sizes.BlockConfig(16, 32, 256)
    got = triton.dequantize(w.values, w.scales, cfg=cfg, dtype=jnp.float32, transpose=transpose,
                            interpret=True)
    ref = quant.dequantize(w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.swapaxes(ref, 1, 2) if transpose else ref))
    w2 = _weight(jax.random.key(3), (64, 256))  # 2-D weights keep their rank
    got2 = triton.dequantize(w2.values, w2.scales, cfg=cfg, dtype=jnp.bfloat16, interpret=True)
    np.testing.assert_array_equal(np.asarray(got2, np.float32),
                                  np.asarray(quant.dequantize(w2).astype(jnp.bfloat16), np.float32))


def test_dequantize_routes_value_and_grad():
    """The prefill routes (dequantize kernel, then the bf16 GEMM) against the references, with gradients."""
    from v4jax.kernels.fp4_matmul import api

    kx, kw, kg = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 3)
    x = jax.random.normal(kx, (24, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    f = lambda xx: jnp.sum(api._dequantize_then_dot(xx, w, True) ** 2)
    g = lambda xx: jnp.sum(reference.fp4_matmul_reference(xx, w) ** 2)
    (v, dx), (v_ref, dx_ref) = jax.value_and_grad(f)(x), jax.value_and_grad(g)(x)
    assert abs(float(v) - float(v_ref)) <= 1e-5 * abs(float(v_ref)) and _rel(dx, dx_ref) < 1e-5
    wg = _weight(kg, (3, 64, 256))
    sizes = jnp.array([7, 0, 12], jnp.int32)
    y = api._dequantize_then_grouped(x, wg, sizes, True)
    assert _rel(y, _ref_grouped(x, wg, np.asarray(sizes))) < 1e-5
    np.testing.assert_array_equal(np.asarray(y[19:]), 0)


def test_stored_h200_table_routes():
    table = block_sizes.load_table("nvidia_h200")
    assert table["dense_dequant_min_m"] == 1024 and table["grouped_dequant_min_m"] == 4096
    for op in ("dense", "grouped", "dequantize", "dense_mosaic", "grouped_mosaic"):
        for entry in table[op]:
            block_sizes.BlockConfig(**entry["config"])  # every stored config is a valid BlockConfig
