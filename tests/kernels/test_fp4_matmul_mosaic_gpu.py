"""The Mosaic GPU (Hopper) FP4 dense kernel: in the Mosaic GPU interpreter vs the reference, and lowered for CUDA.

The interpreter (jax 0.11.2) simulates TMA copies, barriers and wgmma on CPU, filling output buffers with
NaN first, so "no NaN in the result" checks that every element was written. It runs wgmma with A in shared
memory only, so the GPU's register-A variant is checked here by lowering (both variants lower to the
Mosaic GPU custom call with TMA and wgmma instructions); its numbers need a GPU run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fp4_reference import ref_dense as _ref_dense
from fp4_reference import rel as _rel
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


@pytest.mark.parametrize("dtype, m, tol", [(jnp.bfloat16, 5, 1e-2), (jnp.float32, 13, 1e-5), (jnp.bfloat16, 130, 1e-2)])
def test_dense_api_matches_reference(dtype, m, tol):
    """Through fp4_matmul: M not a multiple of the 8-row tile; f32 x runs as three bf16 terms. bf16: K = 512 is
    one pipeline step of two 128-byte decode chunks; f32 (39 rows): bk = 256 in two K splits; M = 130: the
    large-M table entry, 128-row tiles (wgmma N = 128), two of them."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (m, 512), dtype)
    w = _weight(kw, (128, 512))
    y = fp4_matmul.fp4_matmul(x, w, implementation="mosaic_gpu", interpret=True)
    assert y.shape == (m, 128) and y.dtype == dtype
    assert _rel(y, _ref_dense(x, w)) < tol


def test_dense_pipeline_split_k_and_m_tiles_race_free():
    """4 K steps split in 2 (2-deep TMA pipeline each), 3 tiles of 8 rows over M = 20 (x3 terms: 60 rows),
    2 N tiles, with the interpreter's shared-memory race detector on."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (20, 1024), jnp.float32)
    w = _weight(kw, (128, 1024))
    cfg = block_sizes.BlockConfig(block_m=24, block_k=256, split_k=2, num_stages=2)
    t = mosaic_gpu.tiles(cfg, 60, 1024, a_in_registers=False)
    assert (t.bm, t.bk, t.split, t.stages) == (24, 256, 2, 2)
    y = mosaic_gpu.dense(x, w.values, w.scales, cfg=cfg, interpret=True, detect_races=True)
    assert _rel(y, _ref_dense(x, w)) < 1e-5
    from jax._src.pallas.mosaic_gpu.interpret import (
        interpret_pallas_call,  # the detector's record (private)
    )

    assert not interpret_pallas_call.get_races().races_found


def test_dense_vjp_matches_reference():
    kx, kw, kd = jax.random.split(_key(), 3)
    x = jax.random.normal(kx, (6, 256), jnp.float32)
    w = _weight(kw, (64, 256))
    dy = jax.random.normal(kd, (6, 64), jnp.float32)
    f = lambda xx: jnp.sum(fp4_matmul.fp4_matmul(xx, w, implementation="mosaic_gpu", interpret=True) * dy)
    g = lambda xx: jnp.sum(reference.fp4_matmul_reference(xx, w) * dy)
    (v, dx), (v_ref, dx_ref) = jax.value_and_grad(f)(x), jax.value_and_grad(g)(x)
    assert abs(float(v) - float(v_ref)) <= 1e-5 * abs(float(v_ref)) and _rel(dx, dx_ref) < 1e-5


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
    with pytest.raises(ValueError, match="A in shared memory"):
        w64 = _weight(jax.random.key(2), (64, 256))
        mosaic_gpu.dense(jnp.ones((4, 256)), w64.values, w64.scales, cfg=block_sizes.BlockConfig(),
                         interpret=True, a_in_registers=True)


def test_mosaic_gpu_is_opt_in(monkeypatch):
    """On GPU, implementation=None keeps picking Triton until the Mosaic kernel is measured there."""
    from v4jax.kernels.fp4_matmul import api

    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    assert api._pick(None, "fp4_matmul") == "triton"
    assert api._pick("mosaic_gpu", "fp4_matmul") == "mosaic_gpu"
    assert api._backend_module("mosaic_gpu") is mosaic_gpu
