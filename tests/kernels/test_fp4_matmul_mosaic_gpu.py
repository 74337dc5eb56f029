"""The Mosaic GPU (Hopper) FP4 kernels, dense and grouped: in the Mosaic GPU interpreter vs the reference, the
tile table, the api's routing, and lowered for CUDA.

The interpreter (jax 0.11.2) simulates TMA copies, barriers and wgmma on CPU, filling output buffers with
NaN first, so "no NaN in the result" checks that every element was written. It runs wgmma with A in shared
memory only, so the GPU's register-A variant is checked here by lowering (both variants lower to the
Mosaic GPU custom call with TMA and wgmma instructions); its numbers need a GPU run.
"""

from __future__ import annotations

import dataclasses

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
from v4jax.kernels.fp4_matmul import block_sizes, common, mosaic_gpu, reference
from v4jax.quant.qarray import QArray


def _key():
    return jax.random.key(np.random.randint(1 << 30))


def test_byte_plane_decode_is_exact_for_every_byte_and_scale():
    """The kernel's decode (packed bytes zero-extended to uint16, 2 nibble planes, float16 detour) equals
    quant.dequantize for all 256 byte values under all 256 E8M0 scales (255 = NaN)."""
    values = jnp.tile(jnp.arange(256, dtype=jnp.uint8), (256, 1))  # [256 rows, 256 bytes]: K = 512
    scales = jnp.tile(jnp.arange(256, dtype=jnp.uint8)[:, None], (1, 16))  # row r: scale byte r
    w = QArray(values=values, scales=scales, global_scale=None, fmt=quant.get_format("mxfp4"),
               shape=(256, 512), dtype=jnp.float32, axis=1)
    ref = np.asarray(quant.dequantize(w), np.float32)  # [256, 512]
    s = jnp.repeat(common.e8m0_to_f32(scales), common.BYTES_PER_SCALE, axis=1)  # [256, 256]: one per byte
    planes = [np.asarray(mosaic_gpu.decode_plane16(values.astype(jnp.uint16), p, s), np.float32) for p in (0, 1)]
    got = np.stack(planes, -1).reshape(256, 512)  # element 2b + p = plane p, byte b
    np.testing.assert_array_equal(got, ref.astype(jnp.bfloat16).astype(np.float32))  # NaN rows equal as NaN


def test_e8m0_scales_to_bf16_exact_and_lean():
    """The PTX decoders' bf16 scales: 2**(b - 127) for every E8M0 byte (0 -> the bf16 subnormal 2**-127,
    255 -> NaN); the "asm_lean" conversion gives the same but +inf for the NaN byte."""
    b = jnp.arange(256, dtype=jnp.uint8)
    want = np.asarray(common.e8m0_to_f32(b), np.float32)  # exact powers of two, in bf16's range
    exact = np.asarray(mosaic_gpu._e8m0_to_bf16(b), np.float32)
    lean = np.asarray(mosaic_gpu._e8m0_to_bf16(b, "asm_lean"), np.float32)
    np.testing.assert_array_equal(exact, want)  # NaN at 255 equal as NaN
    np.testing.assert_array_equal(lean[:255], want[:255])
    assert lean[255] == np.inf


@pytest.mark.parametrize("dtype, m, tol", [(jnp.bfloat16, 5, 1e-2), (jnp.float32, 13, 1e-5), (jnp.bfloat16, 130, 1e-2)])
def test_dense_api_matches_reference(dtype, m, tol):
    """Through fp4_matmul: M not a multiple of the 8-row tile; f32 x runs as its three bf16 terms stacked along
    M in one launch, whose float32 sums leave as three bf16 terms each. K = 512 is one pipeline step of two 128-byte decode chunks; M = 130: the
    large-M table entry, 128-row tiles (wgmma N = 128), two of them."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (m, 512), dtype)
    w = _weight(kw, (128, 512))
    y = fp4_matmul.fp4_matmul(x, w, implementation="mosaic_gpu", interpret=True)
    assert y.shape == (m, 128) and y.dtype == dtype
    assert _rel(y, _ref_dense(x, w)) < tol


def test_dense_pipeline_split_k_and_m_tiles_race_free():
    """4 K steps split in 2 (2-deep TMA pipeline each), 8 tiles of 8 rows over M = 20 float32 rows (their three
    bf16 terms stacked: 60 rows, the last tile 4 of them), 2 N tiles, with the interpreter's race detector on."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (20, 1024), jnp.float32)
    w = _weight(kw, (128, 1024))
    cfg = block_sizes.BlockConfig(block_m=8, block_k=256, split_k=2, num_stages=2)
    t = mosaic_gpu.tiles(cfg, 60, 1024, a_in_registers=False)
    assert (t.bm, t.bk, t.split, t.stages) == (8, 256, 2, 2)
    y = mosaic_gpu.dense(x, w.values, w.scales, cfg=cfg, interpret=True, detect_races=True)
    assert _rel(y, _ref_dense(x, w)) < 1e-5
    from jax._src.pallas.mosaic_gpu.interpret import (
        interpret_pallas_call,  # the detector's record (private)
    )

    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("planar", [True, False])
def test_overlapped_steps_are_race_free_and_lower_with_a_partial_wait(planar):
    """`overlap`: each K step leaves its wgmmas in flight (waits for the previous step's: 2 groups here) and its x
    buffer is released a step late; race-free in the interpreter, same numbers; lowered for CUDA, the step's
    wait keeps 2 groups in flight and a full wait follows the pipeline."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (16, 1024), jnp.bfloat16)
    w = _weight(kw, (128, 1024))
    ww = fp4_matmul.to_planar(w) if planar else w
    cfg = block_sizes.BlockConfig(block_m=16, block_k=256, split_k=1, num_stages=3, overlap=True)
    assert mosaic_gpu.tiles(cfg, 16, 1024, True).overlap
    y = mosaic_gpu.dense(x, ww.values, ww.scales, cfg, interpret=True, planar=planar, detect_races=True)
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    assert not interpret_pallas_call.get_races().races_found
    assert _rel(y, _ref_dense(x, w)) < 1e-2
    gpu = dataclasses.replace(cfg, decode="asm")
    f = lambda xx, v, s: mosaic_gpu.dense(xx, v, s, cfg=gpu, planar=planar)
    text = jax.jit(f).trace(x, ww.values, ww.scales).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma.wait_group.sync.aligned 2" in text and "wgmma.wait_group.sync.aligned 0" in text


def test_dense_vjp_matches_reference():
    kx, kw, kd = jax.random.split(_key(), 3)
    x = jax.random.normal(kx, (6, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    dy = jax.random.normal(kd, (6, 64), jnp.float32)
    f = lambda xx: jnp.sum(fp4_matmul.fp4_matmul(xx, w, implementation="mosaic_gpu", interpret=True) * dy)
    g = lambda xx: jnp.sum(reference.fp4_matmul_reference(xx, w) * dy)
    (v, dx) = jax.block_until_ready(jax.jit(jax.value_and_grad(f))(x))  # the interpreter's calls done
    v_ref, dx_ref = jax.value_and_grad(g)(x)
    assert _sum_err(v, v_ref, _ref_dense(x, w) * np.asarray(dy)) < 1e-6 and _rel(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("a_in_registers, m", [(True, 16), (False, 16), (True, 300)])
def test_dense_lowers_for_cuda_without_a_gpu(a_in_registers, m):
    """Pallas lowers the kernel to the Mosaic GPU dialect at lowering time: the CUDA module holds one
    mosaic_gpu custom call whose serialized kernel has TMA loads, mbarrier waits and wgmma instructions
    (decode-sized M, and M = 300 with the large-M tiles: 128 rows of x per CTA)."""
    x = jnp.ones((m, 1024), jnp.bfloat16)
    w = _weight(jax.random.key(0), (256, 1024))
    cfg = block_sizes.select("dense_mosaic", m, chip="interpret")
    f = lambda xx, v, s: mosaic_gpu.dense(xx, v, s, cfg=cfg, a_in_registers=a_in_registers)
    text = jax.jit(f).trace(x, w.values, w.scales).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1
    for op in ("cp.async.bulk.tensor.shared.cluster.global", "mbarrier.try_wait", "wgmma.mma_async"):
        assert op in text, op
    api_text = jax.jit(lambda xx: fp4_matmul.fp4_matmul(xx, w, implementation="mosaic_gpu")).trace(
        x).lower(lowering_platforms=("cuda",)).as_text()
    assert api_text.count("custom_call @mosaic_gpu_v2") == 1


def test_api_lowers_planar_weights_on_a_chip_without_a_table():
    """A Hopper GPU without a stored table (e.g. an H100) gets `DEFAULTS`, which must decode with the PTX decoder:
    the jnp word decoder for planar weights has no Mosaic GPU lowering (this CPU has no table either)."""
    assert block_sizes.load_table("cpu") is block_sizes.DEFAULTS
    for op in ("dense_mosaic", "grouped_mosaic"):
        assert all(e["config"]["decode"] == "asm" for e in block_sizes.DEFAULTS[op])
    w = fp4_matmul.to_planar(_weight(jax.random.key(0), (256, 1024)))
    wg = fp4_matmul.to_planar(_weight(jax.random.key(1), (4, 128, 1024)))
    sizes = jnp.array([5, 0, 21, 6], jnp.int32)
    for m in (16, 32):
        x = jnp.ones((m, 1024), jnp.bfloat16)
        for f in (lambda xx: fp4_matmul.fp4_matmul(xx, w, implementation="mosaic_gpu"),
                  lambda xx: fp4_matmul.fp4_grouped_matmul(xx, wg, sizes, implementation="mosaic_gpu")):
            text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("custom_call @mosaic_gpu_v2") == 1


def test_tiles_fit_shared_memory_and_bad_shapes_raise():
    for m in (1, 8, 16, 64, 300, 4096):
        for a_regs in (True, False):
            cfg = block_sizes.select("dense_mosaic", m, chip="interpret")
            t = mosaic_gpu.tiles(cfg, m, 7168, a_regs)
            assert t.bm % 8 == 0 and t.bm >= min(m, 128) and 7168 % (t.bk * t.split) == 0
            assert t.bk >= 256 and t.stages >= 1
            assert mosaic_gpu.smem_bytes(t.bm, t.bk, t.stages, a_regs) <= mosaic_gpu.SMEM_BUDGET
    w = _weight(jax.random.key(1), (96, 256))  # N = 96: not a multiple of 64
    with pytest.raises(ValueError, match="N % 64"):
        fp4_matmul.fp4_matmul(jnp.ones((4, 256), jnp.bfloat16), w, implementation="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="bfloat16 or float32"):  # wgmma multiplies bf16 terms
        fp4_matmul.fp4_matmul(jnp.ones((4, 256), jnp.float16), _weight(jax.random.key(3), (64, 256)),
                              implementation="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match="shared memory"):  # one stage of 256 x rows x 512 K does not fit
        mosaic_gpu.tiles(block_sizes.BlockConfig(block_m=256, block_n=128, block_k=512), 4096, 4096, True, 256)
    with pytest.raises(ValueError, match="A in shared memory"):
        w64 = _weight(jax.random.key(2), (64, 256))
        mosaic_gpu.dense(jnp.ones((4, 256)), w64.values, w64.scales, cfg=block_sizes.BlockConfig(),
                         interpret=True, a_in_registers=True)


def test_gpu_default_routes_dense_decode_and_grouped_to_mosaic_gpu(monkeypatch):
    """On a Hopper GPU, implementation=None sends dense M <= 16 and every grouped call (shapes and dtype
    permitting) to mosaic_gpu, the faster kernel on the H200 (RESULTS.md, session 5); other dense sizes, float16
    x, other shapes and other GPUs (no wgmma) stay on Triton."""
    from v4jax.kernels.fp4_matmul import api

    seen = []
    hopper = [True]
    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(api, "_is_hopper", lambda: hopper[0])
    monkeypatch.setattr(api, "_prefers_dequantize", lambda op, m: False)
    monkeypatch.setattr(api, "_dense_vjp", lambda x, w, impl, interpret: seen.append(("dense", impl)))
    monkeypatch.setattr(api, "_grouped_vjp", lambda x, w, gs, impl, interpret: seen.append(("grouped", impl)))
    w = _weight(jax.random.key(0), (128, 512))
    fp4_matmul.fp4_matmul(jnp.ones((16, 512), jnp.bfloat16), w)
    fp4_matmul.fp4_matmul(jnp.ones((64, 512), jnp.bfloat16), w)
    wg = _weight(jax.random.key(1), (2, 128, 512))
    fp4_matmul.fp4_grouped_matmul(jnp.ones((300, 512), jnp.bfloat16), wg, jnp.array([100, 200]))
    wodd = _weight(jax.random.key(2), (2, 96, 512))  # N % 64 != 0: Triton
    fp4_matmul.fp4_grouped_matmul(jnp.ones((8, 512), jnp.bfloat16), wodd, jnp.array([4, 4]))
    fp4_matmul.fp4_grouped_matmul(jnp.ones((300, 512), jnp.float16), wg, jnp.array([100, 200]))  # float16: Triton
    hopper[0] = False  # e.g. an A100: no wgmma / TMA
    fp4_matmul.fp4_grouped_matmul(jnp.ones((300, 512), jnp.bfloat16), wg, jnp.array([100, 200]))
    fp4_matmul.fp4_matmul(jnp.ones((16, 512), jnp.bfloat16), w)
    assert seen == [("dense", "mosaic_gpu"), ("dense", "triton"), ("grouped", "mosaic_gpu"), ("grouped", "triton"),
                    ("grouped", "triton"), ("grouped", "triton"), ("dense", "triton")]
    assert api._backend_module("mosaic_gpu") is mosaic_gpu

    # planar weights reach mosaic_gpu as they are; a route to another backend gets them back as a QArray
    seen.clear()
    monkeypatch.setattr(api, "_dense_vjp", lambda x, w, impl, interpret: seen.append((impl, type(w).__name__)))
    monkeypatch.setattr(api, "_grouped_vjp", lambda x, w, gs, impl, interpret: seen.append((impl, type(w).__name__)))
    hopper[0] = True
    fp4_matmul.fp4_matmul(jnp.ones((16, 512), jnp.bfloat16), fp4_matmul.to_planar(w))
    fp4_matmul.fp4_matmul(jnp.ones((64, 512), jnp.bfloat16), fp4_matmul.to_planar(w))
    fp4_matmul.fp4_grouped_matmul(jnp.ones((300, 512), jnp.bfloat16), fp4_matmul.to_planar(wg), jnp.array([100, 200]))
    hopper[0] = False
    fp4_matmul.fp4_grouped_matmul(jnp.ones((300, 512), jnp.bfloat16), fp4_matmul.to_planar(wg), jnp.array([100, 200]))
    assert seen == [("mosaic_gpu", "PlanarMXFP4"), ("triton", "QArray"), ("mosaic_gpu", "PlanarMXFP4"),
                    ("triton", "QArray")]


@pytest.mark.parametrize("bm, block_n, n, split, packed, dtype, sizes, tol", [
    (8, 64, 128, 1, True, jnp.bfloat16, (5, 0, 21, 9), 1e-2),  # decode tiles: groups from aligned rows of a copy
    (8, 128, 128, 2, True, jnp.bfloat16, (5, 0, 21, 9), 1e-2),  # two accumulators per CTA, split-K hi + lo terms
    (16, 128, 128, 1, False, jnp.bfloat16, (5, 0, 21, 9), 1e-2),  # grid tiles: a block spanning groups, own rows
    (16, 64, 128, 2, False, jnp.float32, (5, 0, 21, 9), 1e-5),  # float32 x: three bf16 terms, float32 outputs
    (24, 128, 192, 1, False, jnp.bfloat16, (5, 0, 21, 9), 1e-2),  # bm 24: a 16 + 8 store ladder; N % 128: wn 64
    (16, 64, 128, 1, False, jnp.bfloat16, (30, 0, 30, 9), 1e-2),  # sum(sizes) > M: groups end at row M
    (16, 64, 128, 1, True, jnp.bfloat16, (30, 0, 30, 9), 1e-2),
])
def test_grouped_matches_reference(bm, block_n, n, split, packed, dtype, sizes, tol):
    """Fresh random inputs; an empty group, a group longer than a tile, groups not aligned to 8 rows, and rows
    past sum(group_sizes) (they must read zero). Outputs start as NaN in the interpreter: no NaN = all written."""
    kx, kw = jax.random.split(_key())
    w = _weight(kw, (4, n, 512))
    m = 40
    x = jax.random.normal(kx, (m, 512), dtype)
    cfg = block_sizes.BlockConfig(block_m=bm, block_n=block_n, block_k=256, split_k=split, num_stages=2)
    assert mosaic_gpu.tiles(cfg, m, 512, False, n).wn == (128 if block_n == 128 and n % 128 == 0 else 64)
    y = mosaic_gpu.grouped(x, w.values, w.scales, jnp.array(sizes, jnp.int32), cfg=cfg, interpret=True,
                           packed=packed)
    assert y.shape == (m, n) and y.dtype == dtype
    used = min(sum(sizes), m)
    clipped = np.diff(np.minimum(np.cumsum((0, *sizes)), m))
    ref = _ref_grouped(x, w, clipped)
    assert _rel(y[:used], ref[:used]) < tol
    np.testing.assert_array_equal(np.asarray(y[used:], np.float32), 0.0)


def test_grouped_api_value_and_vjp():
    """fp4_grouped_matmul(implementation="mosaic_gpu"): value and dL/dx against the XLA reference."""
    kx, kw, kd = jax.random.split(_key(), 3)
    w = _weight(kw, (3, 64, 256))
    sizes = jnp.array([7, 12, 0], jnp.int32)
    x = jax.random.normal(kx, (20, 256), jnp.float32)
    dy = jax.random.normal(kd, (20, 64), jnp.float32)
    f = lambda xx: jnp.sum(fp4_matmul.fp4_grouped_matmul(xx, w, sizes, implementation="mosaic_gpu", interpret=True) * dy)
    g = lambda xx: jnp.sum(reference.fp4_grouped_matmul_reference(xx, w, sizes) * dy)
    (v, dx) = jax.block_until_ready(jax.jit(jax.value_and_grad(f))(x))  # the interpreter's calls done
    v_ref, dx_ref = jax.value_and_grad(g)(x)
    assert _sum_err(v, v_ref, _ref_grouped(x, w, sizes) * np.asarray(dy)) < 1e-6 and _rel(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("m", [70, 40])
def test_tile_table_covers_every_row_once(packed, m):
    """Each row below M is stored by exactly one tile, from its own group's expert (or the zero pseudo-group
    past sum(group_sizes)); x tiles start on 8-row boundaries; a packed group of <= bm rows is one tile.
    M = 70: rows 59..69 belong to no group; M = 40: the groups run past M and are cut there."""
    sizes = np.array([3, 0, 17, 8, 1, 30], np.int32)
    bm, g = 16, 6
    tt = mosaic_gpu.tile_table(jnp.asarray(sizes), m, bm, packed)
    group, x_row0, out_row0, lead, rows = np.asarray(tt.table)
    owner = np.full(m, -1)
    for t in np.nonzero(rows)[0]:
        assert x_row0[t] % 8 == 0 and 0 <= lead[t] and lead[t] + rows[t] <= bm
        for r in range(out_row0[t], out_row0[t] + rows[t]):
            assert owner[r] == -1
            owner[r] = group[t]
    expect = np.concatenate([np.repeat(np.arange(g), sizes), np.full(max(m - sizes.sum(), 0), g)])[:m]
    np.testing.assert_array_equal(owner, expect)
    if packed:  # the padded copy holds row r at x_row0 + (r - out_row0) of its tile
        src = np.asarray(tt.x_source)
        for t in np.nonzero(rows)[0]:
            np.testing.assert_array_equal(src[x_row0[t] : x_row0[t] + rows[t]],
                                          np.arange(out_row0[t], out_row0[t] + rows[t]))
        per_group = [1, 0, 2, 1, 1, 2] if m == 70 else [1, 0, 2, 1, 1, 1]  # M = 40: group 5 keeps 11 rows
        assert [int(np.sum((rows > 0) & (group == q))) for q in range(g)] == per_group


def test_prefix_sum_is_cumsum():
    """The tile tables' compare-and-sum prefix sums equal jnp.cumsum (zeros, negatives clipped upstream)."""
    v = jnp.array(np.random.default_rng(0).integers(0, 40, 129), jnp.int32).at[5:9].set(0)
    np.testing.assert_array_equal(np.asarray(common.prefix_sum(v)), np.cumsum(np.asarray(v)))
    assert common.prefix_sum(v).dtype == jnp.int32


@pytest.mark.parametrize("m", [70, 40, 44])
def test_window_tiles_cover_every_row_once_from_x_as_it_is(m):
    """Window tiles: each row below M stored once, by its group's expert; every x tile starts on an 8-row
    boundary and lies inside the rows x is read with (M rounded up to 8: no out-of-bounds TMA read); a group
    whose rows fit one window from its aligned start is one tile (its expert's weights stream once)."""
    sizes = np.array([3, 0, 17, 8, 1, 30], np.int32)
    bm, g = 16, 6
    tt = mosaic_gpu.tile_table(jnp.asarray(sizes), m, bm, True, window=True)
    assert tt.x_source is None  # no padded copy
    group, x_row0, out_row0, lead, rows = np.asarray(tt.table)
    owner = np.full(m, -1)
    for t in np.nonzero(rows)[0]:
        assert x_row0[t] % 8 == 0 and x_row0[t] + bm <= mosaic_gpu.window_rows(m, bm)
        assert 0 <= lead[t] and lead[t] + rows[t] <= bm and out_row0[t] == x_row0[t] + lead[t]
        for r in range(out_row0[t], out_row0[t] + rows[t]):
            assert owner[r] == -1
            owner[r] = group[t]
    expect = np.concatenate([np.repeat(np.arange(g), sizes), np.full(max(m - sizes.sum(), 0), g)])[:m]
    np.testing.assert_array_equal(owner, expect)
    # starts 0, 3, 3, 20, 28, 29 (aligned 0, 0, 0, 16, 24, 24): ceil((end - aligned start) / 16) tiles
    per_group = {70: [1, 0, 2, 1, 1, 3], 40: [1, 0, 2, 1, 1, 1], 44: [1, 0, 2, 1, 1, 2]}[m]  # M = 44: 24..43
    assert [int(np.sum((rows > 0) & (group == q))) for q in range(g)] == per_group


@pytest.mark.parametrize("m, sizes", [(20, [7, 0, 9]), (46, [5, 13, 0, 6, 1])])
def test_grouped_window_tiles_match_packed_tiles(m, sizes):
    """The kernel with window tiles (x as it is, M = 20 and 46: padded to a multiple of 8) gives the packed
    tiles' output bit for bit, both layouts."""
    g = len(sizes)
    w = _weight(jax.random.key(m), (g, 128, 512))
    x = jax.random.normal(jax.random.key(1), (m, 512), jnp.bfloat16)
    gs = jnp.array(sizes, jnp.int32)
    cfg = block_sizes.BlockConfig(block_m=16, block_n=64, block_k=256, split_k=2, num_stages=2)
    for wt, planar in ((w, False), (fp4_matmul.to_planar(w), True)):
        run = jax.jit(lambda xx, ss, window, wt=wt, planar=planar: mosaic_gpu.grouped(
            xx, wt.values, wt.scales, ss, cfg, interpret=True, packed=True, planar=planar, window=window),
            static_argnums=2)
        want = np.asarray(jax.block_until_ready(run(x, gs, False)), np.float32)
        got = np.asarray(jax.block_until_ready(run(x, gs, True)), np.float32)
        np.testing.assert_array_equal(got, want)
        from_cfg = mosaic_gpu.grouped(x, wt.values, wt.scales, gs, dataclasses.replace(cfg, window=True),
                                      interpret=True, packed=True, planar=planar)  # a table entry's `window`
        np.testing.assert_array_equal(np.asarray(from_cfg, np.float32), want)
        assert _rel(got[: sum(sizes)], _ref_grouped(x, w, gs)[: sum(sizes)]) < 1e-2


def test_stored_h200_decode_entry_runs_window_tiles():
    """The H200 table's grouped decode entry (window tiles, bm 16, 512-wide K steps, 2 stages: session 8), called
    as the api calls it (tile kind picked by M, `window` from the entry): it takes the window tiles (no gather of
    x), matches the reference, and gives the packed tiles' output bit for bit."""
    cfg = block_sizes.select("grouped_mosaic", 48, chip="nvidia_h200")
    assert cfg.window and (cfg.block_m, cfg.block_k, cfg.split_k, cfg.num_stages) == (16, 512, 1, 2)
    sizes = [9, 0, 17, 6, 7, 9]  # M = 48 <= 8 rows per expert: packed tiles; the 17-row group spans two windows
    wq = _weight(jax.random.key(3), (len(sizes), 64, 1024))
    w = fp4_matmul.to_planar(wq)
    x = jax.random.normal(_key(), (48, 1024), jnp.bfloat16)
    gs = jnp.array(sizes, jnp.int32)
    cfg = dataclasses.replace(cfg, decode="jnp")  # what the interpreter runs in place of the PTX decoder
    run = lambda xx, window: mosaic_gpu.grouped(xx, w.values, w.scales, gs, cfg, interpret=True, planar=True,
                                                window=window)  # window None: the entry's own
    x_gathers = lambda window: [ln for ln in str(jax.make_jaxpr(run, static_argnums=1)(x, window)).splitlines()
                                if "gather" in ln and "bf16[" in ln]  # a gather of x's rows (the table's: int32)
    assert not x_gathers(None) and x_gathers(False)  # window tiles read x as it is; packed tiles a padded copy
    got = np.asarray(jax.block_until_ready(run(x, None)), np.float32)
    np.testing.assert_array_equal(got, np.asarray(jax.block_until_ready(run(x, False)), np.float32))
    assert _rel(got, _ref_grouped(x, wq, gs)) < 1e-2


@pytest.mark.parametrize("packed, block_n, window", [(True, 64, False), (False, 128, False), (True, 64, True)])
def test_grouped_lowers_for_cuda_without_a_gpu(packed, block_n, window):
    """The GPU variant (PTX decode, A in registers) lowers to one Mosaic GPU custom call."""
    w = _weight(jax.random.key(0), (4, 128, 512))
    x = jnp.ones((40, 512), jnp.bfloat16)
    sizes = jnp.array([5, 0, 21, 9], jnp.int32)
    cfg = block_sizes.BlockConfig(block_m=8, block_n=block_n, block_k=256, split_k=2, num_stages=2, decode="asm")
    f = lambda xx, v, s, gs: mosaic_gpu.grouped(xx, v, s, gs, cfg=cfg, packed=packed, window=window)
    text = jax.jit(f).trace(x, w.values, w.scales, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1
    assert "prmt.b32" in text and "fma.rn.bf16x2" in text  # the PTX decoder is in the kernel
