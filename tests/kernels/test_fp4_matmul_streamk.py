"""`mosaic_gpu_streamk`: the stream-K split covers every (tile, K chunk) step once and pairs every partial with its
finisher; the kernel, in the Mosaic GPU interpreter, gives the reference's numbers with finishers that read 0, 1,
2 and 3 partials; lowered for CUDA it is one kernel with its semaphores and proxy fences; bad sizes raise."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fp4_reference import ref_dense as _ref_dense
from fp4_reference import rel as _rel
from fp4_reference import weight as _weight

from v4jax.kernels import fp4_matmul
from v4jax.kernels.fp4_matmul import mosaic_gpu_streamk as sk


def _simulate(tiles: int, chunks: int, ctas: int, wgs: int):
    """Every warpgroup's steps (each once, each inside the tile its segment names) and, per tile, its finisher
    and the CTAs that send it a partial."""
    covered = np.zeros(tiles * chunks, int)
    senders, finisher = {t: [] for t in range(tiles)}, {}
    for c, w in itertools.product(range(ctas), range(wgs)):
        p = sk.plan(c, w, tiles=tiles, chunks=chunks, ctas=ctas, wgs=wgs)
        lo, mid, hi, tile = int(p.lo), int(p.mid), int(p.hi), int(p.tile)
        assert lo < hi and lo <= mid <= hi
        assert all(s // chunks == tile for s in range(lo, mid)) and all(s // chunks == tile + 1 for s in range(mid, hi))
        covered[lo:hi] += 1
        if w == 0:
            if bool(p.sends):
                senders[int(p.send_tile)].append(c)
            if bool(p.finishes):
                assert tile not in finisher
                finisher[tile] = (c, int(p.waits_for))
    return covered, senders, finisher


@pytest.mark.parametrize("tiles, chunks, ctas, wgs", [(112, 28, 132, 4), (64, 16, 132, 4), (64, 16, 264, 2),
                                                      (112, 28, 112, 4)])
def test_plan_covers_each_step_once_and_pairs_partials_with_finishers(tiles, chunks, ctas, wgs):
    """The H200 sizes of the probe (K = N = 7168 and 4096 over 132 / 264 CTAs, and one CTA per tile, where no CTA
    sends), then every small size the plan allows: each step once; each tile finished by one CTA that waits for
    exactly the CTAs before it that send it their partial."""
    sizes = [(tiles, chunks, ctas, wgs)] + [
        s for s in itertools.product(range(1, 7), range(1, 7), range(1, 10), range(1, 4))
        if s[0] * s[1] >= s[2] * s[3] and -(-s[0] * s[1] // s[2]) <= s[1]]
    for t, c, p, w in sizes:
        covered, senders, finisher = _simulate(t, c, p, w)
        assert (covered == 1).all() and sorted(finisher) == list(range(t))
        for tile, (cta, waits) in finisher.items():
            assert senders[tile] == list(range(cta - waits, cta))
    if ctas == tiles:
        assert sk.max_waits(tiles, chunks, ctas, wgs) == 0


@pytest.mark.parametrize("n, m, ctas, wgs, stages", [(320, 5, 7, 2, 2), (192, 16, 8, 1, 3), (128, 1, 8, 1, 1)])
def test_streamk_matches_the_reference_in_the_interpreter(n, m, ctas, wgs, stages):
    """K = 1024 (4 chunks per tile); finishers read up to max_waits partials (1, 2, 3 for these sizes), rows of x
    below the tile's 8 / 16 (zero-filled by the TMA copy), pipelines shorter and longer than `stages`."""
    kx, kw = jax.random.split(jax.random.key(np.random.randint(1 << 30)))
    x = jax.random.normal(kx, (m, 1024), jnp.bfloat16)
    w = _weight(kw, (n, 1024))
    p = fp4_matmul.to_planar(w)
    assert sk.max_waits(n // 64, 4, ctas, wgs) == {320: 1, 192: 2, 128: 3}[n]
    y = jax.block_until_ready(sk.dense_streamk(x, p.values, p.scales, ctas=ctas, wgs=wgs, stages=stages,
                                               interpret=True))
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16 and _rel(y, _ref_dense(x, w)) < 1e-2


def test_streamk_lowers_to_one_kernel_with_semaphores_and_rejects_bad_sizes():
    """For CUDA (PTX decoder): one Mosaic GPU call, no XLA sum; the partials' release / acquire and the proxy
    fences are in it. Sizes the plan cannot split and bad inputs raise before anything runs."""
    p = fp4_matmul.to_planar(_weight(jax.random.key(0), (320, 1024)))
    x = jnp.ones((8, 1024), jnp.bfloat16)
    f = lambda xx: sk.dense_streamk(xx, p.values, p.scales, ctas=7, wgs=2)
    text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1 and "fp4_matmul_mosaic_gpu_streamk" in text
    assert "stablehlo.reduce" not in text and "stablehlo.add" not in text
    for ptx in ("red.release.gpu.global.add.u32", "fence.acquire.gpu", "fence.proxy.async.global", "0x3F003F00"):
        assert ptx in text
    with pytest.raises(ValueError, match=r"ctas in 5\.\.10"):  # 5 tiles of 4 chunks, 2 warpgroups per CTA
        sk.dense_streamk(x, p.values, p.scales, ctas=4, wgs=2)
    with pytest.raises(ValueError, match=r"ctas in 5\.\.10"):
        sk.dense_streamk(x, p.values, p.scales, ctas=11, wgs=2)
    for ctas in (0, -1):
        with pytest.raises(ValueError, match=r"ctas in 5\.\.10"):
            sk.dense_streamk(x, p.values, p.scales, ctas=ctas, wgs=2)
    with pytest.raises(ValueError, match="lower wgs"):  # 5 tiles x 4 chunks: no CTA count gives 8 warpgroups a step
        sk.dense_streamk(x, p.values, p.scales, ctas=5, wgs=8)
    with pytest.raises(ValueError, match="at most 64 rows"):
        sk.dense_streamk(jnp.ones((65, 1024), jnp.bfloat16), p.values, p.scales, ctas=7, wgs=2)
    with pytest.raises(ValueError, match="bf16 x"):
        sk.dense_streamk(x.astype(jnp.float32), p.values, p.scales, ctas=7, wgs=2)
    with pytest.raises(ValueError, match="decode must be"):
        sk.dense_streamk(x, p.values, p.scales, ctas=7, wgs=2, decode="jnp")
    with pytest.raises(ValueError, match="shared memory"):
        sk.dense_streamk(jnp.ones((64, 1024), jnp.bfloat16), p.values, p.scales, ctas=5, wgs=4, stages=4)
