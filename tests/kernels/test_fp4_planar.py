"""`PlanarMXFP4`, the Hopper kernel's load-time weight layout: the byte order it promises, the round trip, the
Mosaic GPU kernels reading it (interpreter, and lowered for CUDA with the PTX decoder), the api with it on
every backend, and the MoE's planar expert leaves."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
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
from v4jax.infer.fp4 import pack_experts, planar_max_scale, planarize_experts
from v4jax.kernels import fp4_matmul
from v4jax.kernels.fp4_matmul import block_sizes, mosaic_gpu, planar, reference
from v4jax.kernels.grouped_matmul import grouped_matmul
from v4jax.model import ModelConfig, presets
from v4jax.model.moe import Experts


def _key():
    return jax.random.key(np.random.randint(1 << 30))


def _rotl(w: np.ndarray, r: int) -> np.ndarray:
    return ((w << r) | (w >> (32 - r))) & 0xFFFFFFFF if r else w


def _thread_words(values: np.ndarray) -> np.ndarray:
    """The layout's promise, read back as the kernel's loads read it: values [.., N, K/2] -> each thread's words
    [.., N/64 tiles, chunks, 128 threads, 4 segments, 4 words]: word i of segment j of thread t is bytes
    2048j + 16t + 4i .. + 3 (little-endian) of the tile's [64, 128] box, row-major."""
    *lead, n, kh = values.shape
    box = values.reshape(*lead, n // 64, 64, kh // 128, 128).swapaxes(-3, -2).reshape(*lead, n // 64, kh // 128, 8192)
    b = box.reshape(*lead, n // 64, kh // 128, 4, 128, 4, 4).astype(np.uint64)  # [.., T, C, j, t, i, byte]
    w = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return np.swapaxes(w, -3, -2)  # [.., T, C, t, j, i]


def test_planar_words_decode_by_the_kernels_rotations_to_each_element():
    """The layout's promise, checked the way the kernel reads it: in each [64 rows, 128 bytes] box, thread
    t = 32w + 4r + q holds in segment j = 2hr + half, word i the 8 elements of weight row 16w + 8hr + r, k-step
    s = 4half + i, lane q; rotating and masking it as `planar.ROTATIONS` says gives bf16 pairs that, times 2**126,
    are the E2M1 values of plane p's columns 16s + 8h + 2q + (0, 1). Each [8, 64] box of the scales holds the
    scale of block g of row 16w + 8hr + r at byte 16 (8w + r) + 8hr + g. `to_qarray` gives back the QArray."""
    w = _weight(_key(), (2, 128, 768))
    p = fp4_matmul.to_planar(w)
    assert p.values.shape == (2, 128, 384) and p.scales.shape == (2, 24, 128) and p.shape == w.shape
    v = np.asarray(w.values)
    codes = np.stack([v & 15, v >> 4], -1).reshape(2, 2, 4, 2, 8, 3, 2, 8, 2, 4, 2)  # [.., T, w, hr, r, C, p, s, h, q, e]
    words = _thread_words(np.asarray(p.values)).reshape(2, 2, 3, 4, 8, 4, 2, 2, 4)  # [.., T, C, w, r, q, hr, half, i]
    words = words.transpose(0, 1, 3, 6, 4, 2, 7, 8, 5).reshape(2, 2, 4, 2, 8, 3, 8, 4)  # [.., T, w, hr, r, C, s, q]
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    for (pl, h), rots in planar.ROTATIONS.items():
        reg = np.zeros_like(words)
        for rot, bits in rots:
            mask = sum(1 << (planar.TARGET_BITS[b] + 16 * e) for b in bits for e in (0, 1))
            reg |= _rotl(words, rot) & mask
        for e in range(2):
            half = (reg >> (16 * e)) & 0xFFFF
            bf16 = (half << 16).astype(np.uint32).view(np.float32).astype(np.float64) * 2.0**126
            c = codes[..., pl, :, h, :, e]  # [.., T, w, hr, r, C, s, q]
            want = np.where(c & 8, -1.0, 1.0) * e2m1[c & 7]
            np.testing.assert_array_equal(bf16, want)
            np.testing.assert_array_equal(np.signbit(bf16), (c & 8) > 0)  # -0 keeps its sign
    sc = np.asarray(p.scales).reshape(2, 3, 8, 2, 64).swapaxes(2, 3).reshape(2, 3, 2, 4, 8, 2, 8)  # [.., C, T, w, r, hr, g]
    want = np.asarray(w.scales).reshape(2, 2, 4, 2, 8, 3, 8)  # [.., T, w, hr, r, C, g]
    np.testing.assert_array_equal(sc, want.transpose(0, 5, 1, 2, 4, 3, 6))
    back = p.to_qarray()
    np.testing.assert_array_equal(np.asarray(back.values), v)
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(w.scales))
    assert (back.shape, back.axis, back.fmt) == (w.shape, w.axis, w.fmt)


def _run_ptx(text: str, regs: dict) -> dict:
    """Interpret the integer part of a `mosaic_gpu.word_decode_ptx` or `scale_ptx` asm (mov/shf/and/or/prmt/shl/
    add/max.u16x2 on b32 registers held in uint64 arrays; `regs` gives $1, ...); stops at the first FMA."""
    regs = dict(regs)
    val = lambda a: regs[a] if a in regs else np.uint64(int(a, 16) if a.startswith("0x") else int(a))
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, *args = line.replace(",", " ").split()
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "shf.l.wrap.b32":
            d, a, _, n = args
            regs[d] = _rotl(regs[a], int(n))
        elif op in ("and.b32", "or.b32"):
            d, a, b = args
            regs[d] = (regs[a] & val(b)) if op == "and.b32" else (regs[a] | val(b))
        elif op == "prmt.b32":
            d, a, b, sel = args
            src = [(val(a) >> (8 * k)) & 0xFF for k in range(4)] + [(val(b) >> (8 * k)) & 0xFF for k in range(4)]
            sel = int(sel, 16)
            regs[d] = sum(src[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << int(args[2])) & 0xFFFFFFFF
        elif op == "add.u32":
            regs[args[0]] = (val(args[1]) + val(args[2])) & 0xFFFFFFFF
        elif op == "max.u16x2":
            a, b = val(args[1]), val(args[2])
            regs[args[0]] = sum(np.maximum((a >> s) & 0xFFFF, (b >> s) & 0xFFFF) << s for s in (0, 16))
        elif op.startswith("fma"):
            break
        else:
            raise AssertionError(f"unexpected PTX op {op}")
    return regs


def test_generated_ptx_decodes_the_registers_a_thread_holds():
    """End to end on the kernel's own asm text: thread t's word (hr, s) (`_thread_words`), through each
    `word_decode_ptx` asm (interpreted here), must give the registers the kernel files under column group
    2s + h, row half hr of the WGMMA layout (`fragmented_array.WGMMA_LAYOUT`: registers [.., 16 column groups,
    .., 2 row halves, ..]; thread t = 32w + 4r + q holds rows 16w + r + 8hr, columns 8g + 2q + (0, 1)); and
    `scale_ptx` must turn byte b of a thread's scale register into the bf16x2 pair of the QArray path's
    `_e8m0_to_bf16` ("asm_lean"), or of 2**(b - 1) ("asm_fused", every b <= 128)."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    shape = fa.WGMMA_LAYOUT.registers_shape((64, 128))
    assert (shape[1], shape[4], np.prod(shape)) == (16, 2, 32)  # the indices the decoder fills
    w = _weight(_key(), (64, 256))
    words = _thread_words(np.asarray(fp4_matmul.to_planar(w).values))[0, 0]  # [128 threads, 4 segments, 4 words]
    v = np.asarray(w.values)
    codes = np.stack([v & 15, v >> 4], -1).reshape(64, 2, 128)  # [row, plane, column]
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    t = np.arange(128)
    wp, r, q = t // 32, (t % 32) // 4, t % 4
    for hr in range(2):
        for s_ in range(8):
            word = words[:, 2 * hr + s_ // 4, s_ % 4]
            for (p, h), rots in planar.ROTATIONS.items():
                u = _run_ptx(mosaic_gpu.word_decode_ptx(rots), {"$1": word})["u"]
                for e in range(2):
                    half = (u >> (16 * e)) & 0xFFFF
                    got = (half << 16).astype(np.uint32).view(np.float32).astype(np.float64) * 2.0**126
                    c = codes[16 * wp + 8 * hr + r, p, 8 * (2 * s_ + h) + 2 * q + e]
                    np.testing.assert_array_equal(got, np.where(c & 8, -1.0, 1.0) * e2m1[c & 7])
    b = np.arange(256, dtype=np.uint64)
    lean = np.asarray(jax.lax.bitcast_convert_type(mosaic_gpu._e8m0_to_bf16(jnp.asarray(b, jnp.uint8), "asm_lean"),
                                                   jnp.uint16)).astype(np.uint64)  # the QArray path's bits
    fused = np.asarray(jnp.asarray(2.0 ** (b[:129].astype(np.float64) - 1), jnp.bfloat16).view(jnp.uint16))
    for how, want in (("asm_lean", lean), ("asm_fused", fused.astype(np.uint64))):  # fused: 2**(b - 1), b <= 128
        for byte in range(4):
            reg = _run_ptx(mosaic_gpu.scale_ptx(how, byte), {"$1": b << (8 * byte) | (b ^ 0x5A) << (8 * ((byte + 1) % 4))})
            np.testing.assert_array_equal(reg["$0"][: len(want)], want | want << 16)


@pytest.mark.parametrize("chunks, wn, h, c", [(1, 64, 0, 0), (2, 128, 1, 1)])
def test_kernel_loads_and_places_each_threads_registers(chunks, wn, h, c):
    """The GPU decode path's own arithmetic, run on the CPU: for every thread of the warpgroup,
    `mosaic_gpu.tile_load_offsets` (the kernel's offsets) reads 16-byte segments and scale groups from a step's
    shared-memory images (values [wn, 128 * chunks], scales [8 * chunks, wn], row-major, as TMA lands them) at
    16-byte aligned offsets; `tile_registers` with the kernel's `scale_ptx` / `word_decode_ptx` text (interpreted
    here) must file under (plane p, column group g, row half hr) the E2M1 codes and scale of weight row
    16w + 8hr + r, plane columns 8g + 2q + (0, 1) of tile h, chunk c (thread t = 32w + 4r + q)."""
    w = _weight(_key(), (wn, 256 * chunks))
    p = fp4_matmul.to_planar(w)
    v_img = np.asarray(p.values).astype(np.uint64).reshape(-1)  # the step's values tile [wn, kb]
    s_img = np.asarray(p.scales).astype(np.uint64).reshape(-1)  # the step's scales tile [8 * chunks, wn]
    t = np.arange(128)
    v_off, s_off = mosaic_gpu.tile_load_offsets(t, h, c, 128 * chunks, wn)
    assert all((o % 16 == 0).all() for o in (*v_off, s_off))  # ld.shared.v4 needs 16-byte alignment
    word = lambda img, o: img[o] | img[o + 1] << 8 | img[o + 2] << 16 | img[o + 3] << 24
    segs = [[word(v_img, o + 4 * i) for i in range(4)] for o in v_off]
    sregs = [word(s_img, s_off + 4 * i) for i in range(4)]
    scale = lambda reg, b: _run_ptx(mosaic_gpu.scale_ptx("asm_fused", b), {"$1": reg})["$0"]
    decode = lambda wd, sc, rots: (_run_ptx(mosaic_gpu.word_decode_ptx(rots, True), {"$1": wd})["u"], sc)
    regs = mosaic_gpu.tile_registers(segs, sregs, scale, decode)
    assert sorted(regs) == [(pp, g, hr) for pp in range(2) for g in range(16) for hr in range(2)]
    v = np.asarray(w.values)
    codes = np.stack([v & 15, v >> 4], -1).reshape(wn, chunks, 2, 128)  # [row, chunk, plane, plane column]
    scales = np.asarray(w.scales).reshape(wn, chunks, 2, 4)  # [row, chunk, plane, block of the plane]
    e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    row = 64 * h + 16 * (t // 32) + (t % 32) // 4
    q = t % 4
    for (pp, g, hr), (u, sc) in regs.items():
        rr = row + 8 * hr
        want_sc = (scales[rr, c, pp, g // 4].astype(np.uint64) + 126) << 7  # the fused bf16 scale bits
        np.testing.assert_array_equal(sc, want_sc | want_sc << 16)
        for e in range(2):
            got = (((u >> (16 * e)) & 0xFFFF) << 16).astype(np.uint32).view(np.float32).astype(np.float64) * 2.0**126
            cc = codes[rr, c, pp, 8 * g + 2 * q + e]
            np.testing.assert_array_equal(got, np.where(cc & 8, -1.0, 1.0) * e2m1[cc & 7])


def test_fused_decoder_gives_the_two_fma_numbers_for_scales_up_to_2():
    """"asm_fused": the same integer ops as the two-FMA decoder, then one FMA by 2**126 * scale, the bf16
    `scale_ptx("asm_fused", ...)` gives for every scale byte up to 128 (scale 2); on every code and each of those
    bytes the product is the exact value (the numbers the two FMAs give). The api takes it only for planar
    weights whose largest scale byte, read by `to_planar`, is <= 128."""
    for rots in planar.ROTATIONS.values():
        two, one = mosaic_gpu.word_decode_ptx(rots), mosaic_gpu.word_decode_ptx(rots, fused=True)
        assert two.count("fma.rn.bf16x2") == 2 and one.count("fma.rn.bf16x2") == 1 and "c126" not in one
        assert "fma.rn.bf16x2 $0, u, $2, nz;" in one
        words = np.random.default_rng(0).integers(0, 1 << 32, 4096, dtype=np.uint64)
        np.testing.assert_array_equal(_run_ptx(one, {"$1": words})["u"], _run_ptx(two, {"$1": words})["u"])
    b = np.arange(planar.FUSED_MAX_SCALE + 1, dtype=np.uint64)  # the fused scale, as the kernel's `scale_ptx` gives it
    bits = _run_ptx(mosaic_gpu.scale_ptx("asm_fused", 0), {"$1": b})["$0"] & 0xFFFF
    fused = (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    np.testing.assert_array_equal(fused, 2.0 ** (np.arange(planar.FUSED_MAX_SCALE + 1) - 1.0))
    # u = E2M1 * 2**-126 as bf16 bits (sign, exponent 0..3, mantissa bit 6): every code times every fused scale
    codes = np.arange(16)
    u = ((codes & 8) << 12) | ((codes & 7) << 6)  # low half of the register, as `planar.TARGET_BITS` places it
    u_val = (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    e2m1 = np.where(codes & 8, -1.0, 1.0) * np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7]
    exact = e2m1[:, None] * 2.0 ** (np.arange(planar.FUSED_MAX_SCALE + 1) - 127.0)  # [code, byte]
    prod = u_val[:, None] * fused[None, :]  # the FMA's exact product (float64), which it rounds once to bf16
    np.testing.assert_array_equal(prod, exact)
    # ... and bf16 holds it (down to 2**-128, a bf16 subnormal: the GPU's bf16x2 FMA keeps subnormals; numpy's
    # software bf16 here does too, where XLA on CPU would flush them), so that rounding changes nothing
    np.testing.assert_array_equal(prod.astype(jnp.bfloat16).astype(np.float64), exact)
    # to_planar reads the largest scale byte when the scales are concrete; under a trace it is unknown
    small = quant.quantize(jax.random.normal(_key(), (64, 256)), "mxfp4")  # |w| < 8: scale bytes <= 127
    big = quant.quantize(64 * jax.random.normal(_key(), (64, 256)), "mxfp4")  # scales of 2**5 and more
    p, pb = fp4_matmul.to_planar(small), fp4_matmul.to_planar(big)
    assert p.max_scale == int(jnp.max(small.scales)) <= 128 and planar.fused_scales_ok(p)
    assert pb.max_scale == int(jnp.max(big.scales)) > 128 and not planar.fused_scales_ok(pb)
    inside = []  # closed-over (concrete) scales give the maximum inside a trace too
    jax.jit(lambda v: inside.append(fp4_matmul.to_planar(small.replace(values=v))) or v)(small.values)
    assert inside[0].max_scale == p.max_scale
    traced = []
    jax.jit(lambda sc: traced.append(fp4_matmul.to_planar(small.replace(scales=sc))) or sc)(small.scales)
    assert traced[0].max_scale is None and not planar.fused_scales_ok(traced[0])
    from v4jax.kernels.fp4_matmul import api

    cfg = block_sizes.BlockConfig(decode="asm_fused")
    assert api._decoder_for(cfg, p).decode == "asm_fused" and api._decoder_for(cfg, pb).decode == "asm_lean"
    assert api._decoder_for(cfg, p.replace(max_scale=129)).decode == "asm_lean"  # a scale above 2
    assert p.replace(scales=p.scales).max_scale is None and p.replace(values=p.values).max_scale == p.max_scale
    assert api._decoder_for(cfg, traced[0]).decode == "asm_lean" and api._decoder_for(cfg, small).decode == "asm_lean"


def test_to_planar_rejects_what_it_cannot_hold():
    with pytest.raises(ValueError, match="K % 256 == 0"):
        fp4_matmul.to_planar(quant.quantize(jnp.ones((64, 96)), "mxfp4"))
    with pytest.raises(ValueError, match=r"N % 64 == 0 .*got N=32"):
        fp4_matmul.to_planar(quant.quantize(jnp.ones((32, 256)), "mxfp4"))
    with pytest.raises(ValueError, match="mxfp4"):
        fp4_matmul.to_planar(quant.quantize(jnp.ones((64, 256)), "nvfp4"))
    with pytest.raises(ValueError, match="QArray"):
        fp4_matmul.to_planar(jnp.ones((64, 256)))
    with pytest.raises(ValueError, match="rank 2"):
        fp4_matmul.fp4_matmul(jnp.ones((4, 256)), fp4_matmul.to_planar(_weight(_key(), (2, 64, 256))))
    p = fp4_matmul.to_planar(_weight(_key(), (64, 256)))
    with pytest.raises(ValueError, match=r"w.scales must be uint8 \(8, 64\)"):  # QArray-layout scales
        fp4_matmul.fp4_matmul(jnp.ones((4, 256)), p.replace(scales=jnp.swapaxes(p.scales, 0, 1)))
    with pytest.raises(ValueError, match=r"w.values must be uint8 \(64, 128\)"):
        fp4_matmul.fp4_matmul(jnp.ones((4, 256)), p.replace(values=p.values[:, :64]), "mosaic_gpu", True)
    w = _weight(_key(), (64, 256))  # the QArray fields are checked the same way (a kernel would read past them)
    with pytest.raises(ValueError, match=r"w.values must be uint8 \(64, 128\)"):
        fp4_matmul.fp4_matmul(jnp.ones((4, 256)), w.replace(values=w.values[:, :64]), "mosaic_gpu", True)


@pytest.mark.parametrize("dtype, m, tol", [(jnp.bfloat16, 5, 1e-2), (jnp.float32, 13, 1e-5)])
def test_dense_kernel_reads_planar_weights(dtype, m, tol):
    """mosaic_gpu.dense on the planar fields: K = 1024 in two 512-wide K steps of two 256-element chunks each
    (chunk c = 1 of a step reads scale blocks 8..15 of the step's tile and x columns 256..511)."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (m, 1024), dtype)
    w = _weight(kw, (128, 1024))
    p = fp4_matmul.to_planar(w)
    cfg = block_sizes.BlockConfig(block_m=16, block_n=64, block_k=512, split_k=1, num_stages=2)
    assert mosaic_gpu.tiles(cfg, m, 1024, False).bk == 512
    y = mosaic_gpu.dense(x, p.values, p.scales, cfg, interpret=True, planar=True)
    assert y.dtype == dtype and _rel(y, _ref_dense(x, w)) < tol
    with pytest.raises(ValueError, match="planar"):  # QArray-shaped scales handed in as planar ones
        mosaic_gpu.dense(x, w.values, w.scales, cfg, interpret=True, planar=True)


@pytest.mark.parametrize("packed, block_n, k, block_k", [(True, 64, 512, 256), (False, 128, 512, 256),
                                                          (True, 128, 2048, 1024)])
def test_grouped_kernel_reads_planar_weights(packed, block_n, k, block_k):
    """Packed and grid tiles, 64 and 128 weight rows per CTA, split K, an empty expert, rows past the sum;
    K = 2048 with block_k 1024: planar steps stop at 512 (`PLANAR_MAX_BK`: a values box without a swizzle is at
    most 256 bytes wide), chunks c = 0, 1 of a step; the call lowers for CUDA."""
    kx, kw = jax.random.split(_key())
    w = _weight(kw, (3, 128, k))
    p = fp4_matmul.to_planar(w)
    sizes = jnp.array([7, 0, 9], jnp.int32)
    x = jax.random.normal(kx, (20, k), jnp.bfloat16)
    cfg = block_sizes.BlockConfig(block_m=8, block_n=block_n, block_k=block_k, split_k=2, num_stages=2)
    assert mosaic_gpu.tiles(cfg, 8, k, False, 128).bk == block_k
    assert mosaic_gpu.tiles(cfg, 8, k, False, 128, max_bk=mosaic_gpu.PLANAR_MAX_BK).bk == min(block_k, 512)
    y = mosaic_gpu.grouped(x, p.values, p.scales, sizes, cfg, interpret=True, packed=packed, planar=True)
    gpu = dataclasses.replace(cfg, decode="asm_lean")
    f = lambda xx, gs: mosaic_gpu.grouped(xx, p.values, p.scales, gs, cfg=gpu, packed=packed, planar=True)
    assert jax.jit(f).trace(x, sizes).lower(lowering_platforms=("cuda",)).as_text().count("mosaic_gpu_v2") == 1
    ref = _ref_grouped(x, w, sizes)
    assert _rel(y[:16], ref[:16]) < 1e-2
    np.testing.assert_array_equal(np.asarray(y[16:], np.float32), 0.0)


def test_planar_kernels_lower_for_cuda_with_the_ptx_decoder():
    """The GPU variant (A in registers, the word decoder's PTX) lowers to one Mosaic GPU call; a dense call
    reads x as it is where TMA allows it, M = 1 included (the TMA zero-fills the tile's rows past M)."""
    p = fp4_matmul.to_planar(_weight(jax.random.key(0), (4, 128, 512)))
    x = jnp.ones((40, 512), jnp.bfloat16)
    sizes = jnp.array([5, 0, 21, 9], jnp.int32)
    cfg = block_sizes.BlockConfig(block_m=8, block_n=128, block_k=512, split_k=1, num_stages=2, decode="asm")
    f = lambda xx, v, s, gs: mosaic_gpu.grouped(xx, v, s, gs, cfg=cfg, planar=True)
    text = jax.jit(f).trace(x, p.values, p.scales, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1
    assert "fma.rn.bf16x2" in text and "max.u16x2" in text  # the word decoder and the lean scale conversion
    assert "0x5410" not in text  # words come whole from 16-byte loads: no prmt merging 16-bit registers
    for rot in (4, 10, 6, 14):  # the rotations of the four registers of a word (planar.ROTATIONS)
        assert f"shf.l.wrap.b32 r, $1, $1, {rot};" in text
    assert "stablehlo.transpose" not in text  # the point of the layout: no x plane split, no scale transpose
    assert "stablehlo.while" not in text  # tile tables without a binary-search loop (common.SEARCH)
    fused = dataclasses.replace(cfg, decode="asm_fused")
    f = lambda xx, v, s, gs: mosaic_gpu.grouped(xx, v, s, gs, cfg=fused, planar=True)
    text = jax.jit(f).trace(x, p.values, p.scales, sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1 and "c126" not in text  # one FMA per register
    assert "0x3F003F00" in text  # the fused scale: (byte + 126) << 7 in both halves
    # dense: x as it is at M = 1 (TMA zero-fills the tile's rows past M) or a multiple of 8; M = 13 is padded to
    # 16 rows (a TMA tile of 8 rows needs M < 8 or M % 8 == 0: without the pad the call does not lower)
    pd = fp4_matmul.to_planar(_weight(jax.random.key(1), (128, 512)))
    for m, pad in ((1, False), (13, True), (16, False)):
        for f in (lambda xx: mosaic_gpu.dense(xx, pd.values, pd.scales, cfg=fused, planar=True),
                  lambda xx: mosaic_gpu.dense_wgs(xx, pd.values, pd.scales, wgs=2, bm=16)):
            text = jax.jit(f).trace(jnp.ones((m, 512), jnp.bfloat16)).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("custom_call @mosaic_gpu_v2") == 1 and ("stablehlo.pad" in text) == pad


@pytest.mark.parametrize("wgs, m, bm, stages", [(2, 13, 8, 2), (4, 5, 16, 2), (1, 1, 8, 3)])
def test_dense_wgs_splits_k_across_warpgroups(wgs, m, bm, stages):
    """`mosaic_gpu.dense_wgs` in the interpreter: K = 1024 split across `wgs` warpgroups (each streams its own 4 /
    wgs chunks through its own pipeline: fewer chunks than stages, as many, and more, where slots are refilled),
    two 64-row tiles of N, M rows in tiles of bm (the last one partial): the reference's numbers in one kernel;
    lowered for CUDA (PTX decoder) it is one Mosaic GPU call and no XLA sum; bad shapes raise."""
    kx, kw = jax.random.split(_key())
    x = jax.random.normal(kx, (m, 1024), jnp.bfloat16)
    w = _weight(kw, (128, 1024))
    p = fp4_matmul.to_planar(w)
    y = jax.block_until_ready(mosaic_gpu.dense_wgs(x, p.values, p.scales, wgs=wgs, bm=bm, stages=stages,
                                                    interpret=True))
    assert y.shape == (m, 128) and y.dtype == jnp.bfloat16 and _rel(y, _ref_dense(x, w)) < 1e-2
    f = lambda xx: mosaic_gpu.dense_wgs(xx, p.values, p.scales, wgs=wgs, bm=bm)
    text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1 and "stablehlo.add" not in text and "0x3F003F00" in text
    with pytest.raises(ValueError, match=f"K % {256 * 4} == 0"):
        mosaic_gpu.dense_wgs(x[:, :512], p.values[:, :256], p.scales[:16], wgs=4)
    with pytest.raises(ValueError, match="bf16 x"):
        mosaic_gpu.dense_wgs(x.astype(jnp.float32), p.values, p.scales)
    with pytest.raises(ValueError, match="decode must be asm, asm_lean or asm_fused, got 'jnp'"):
        mosaic_gpu.dense_wgs(x, p.values, p.scales, decode="jnp")  # no Mosaic GPU lowering for planar weights
    with pytest.raises(ValueError, match="shared memory"):  # 2 stages of 64 rows of x x 1024 K: past the budget
        mosaic_gpu.dense_wgs(x, p.values, p.scales, wgs=4, bm=64)


def test_api_routes_wide_dense_decode_to_the_warpgroup_split(monkeypatch):
    """The stored H200 table's `dense_mosaic_wgs` entry: a dense decode call on planar weights takes
    `mosaic_gpu.dense_wgs` (one kernel) only where N has >= 0.75 x 64-row tiles per SM, M <= 16 and x is bf16
    (H200: N = 7168 yes, 4096 no); lowered for CUDA the call is that one kernel and no XLA sum."""
    from v4jax.kernels.fp4_matmul import api

    wide = fp4_matmul.to_planar(_weight(_key(), (7168, 1024)))
    narrow = fp4_matmul.to_planar(_weight(_key(), (4096, 1024)))
    x = jnp.ones((16, 1024), jnp.bfloat16)
    monkeypatch.setattr(jax, "devices", lambda *a: [type("H200", (), {"device_kind": "NVIDIA H200", "core_count": 132})])
    entry = api._warpgroup_split(x, wide, "mosaic_gpu", False)
    assert entry == {"max_m": 16, "min_tiles_per_sm": 0.75, "warpgroups": 4, "num_stages": 2}
    for args in ((x, narrow, "mosaic_gpu", False), (jnp.ones((17, 1024), jnp.bfloat16), wide, "mosaic_gpu", False),
                 (x.astype(jnp.float32), wide, "mosaic_gpu", False), (x, planar.as_qarray(wide), "mosaic_gpu", False),
                 (x, wide, "mosaic_gpu", True), (x, wide, "triton", False)):
        assert api._warpgroup_split(*args) is None
    text = jax.jit(lambda xx: api._dense_forward(xx, wide, "mosaic_gpu", False)).trace(x[:1]).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu_v2") == 1 and "fp4_matmul_mosaic_gpu_wgs" in text
    assert "stablehlo.reduce" not in text
    monkeypatch.setattr(jax, "devices", lambda *a: [type("GPU", (), {"device_kind": "NVIDIA H200"})])
    assert api._warpgroup_split(x, wide, "mosaic_gpu", False) is None  # SM count unknown: the split-K kernel


def test_cluster_split_k_is_one_kernel():
    """`BlockConfig.cluster`: lowered for CUDA, a split-K dense decode is one Mosaic GPU kernel (the splits add in
    a cluster's shared memory) where the plain split-K call adds an XLA reduction; the interpreter, which has no
    cluster stores, runs the plain split-K kernel with the same numbers."""
    kx, kw = jax.random.split(_key())
    w = _weight(kw, (128, 2048))
    p = fp4_matmul.to_planar(w)
    x = jax.random.normal(kx, (5, 2048), jnp.bfloat16)
    base = block_sizes.BlockConfig(block_m=64, block_k=256, split_k=8, num_stages=4, decode="asm_fused")
    for cluster in (False, True):
        cfg = dataclasses.replace(base, cluster=cluster)
        text = jax.jit(lambda xx, cfg=cfg: mosaic_gpu.dense(xx, p.values, p.scales, cfg=cfg, planar=True)).trace(
            x).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu_v2") == 1 and ("stablehlo.reduce" in text) != cluster
        y = mosaic_gpu.dense(x, p.values, p.scales, cfg=dataclasses.replace(cfg, decode="jnp"), planar=True,
                             interpret=True)
        assert _rel(y, _ref_dense(x, w)) < 1e-2


@pytest.mark.parametrize("implementation", ["mosaic_gpu", "triton", "xla"])
def test_api_takes_planar_weights_on_every_backend(implementation):
    """Value and dL/dx of fp4_grouped_matmul with planar weights equal the QArray reference (other backends
    convert the layout back), and dense likewise."""
    kx, kw, kd = jax.random.split(_key(), 3)
    w = _weight(kw, (3, 64, 256))
    p = fp4_matmul.to_planar(w)
    sizes = jnp.array([7, 12, 0], jnp.int32)
    x = jax.random.normal(kx, (20, 256), jnp.float32)
    dy = jax.random.normal(kd, (20, 64), jnp.float32)
    interpret = implementation != "xla"
    f = lambda xx: jnp.sum(fp4_matmul.fp4_grouped_matmul(xx, p, sizes, implementation, interpret) * dy)
    g = lambda xx: jnp.sum(reference.fp4_grouped_matmul_reference(xx, w, sizes) * dy)
    (v, dx) = jax.block_until_ready(jax.jit(jax.value_and_grad(f))(x))  # the interpreter's calls done
    v_ref, dx_ref = jax.value_and_grad(g)(x)
    assert _sum_err(v, v_ref, _ref_grouped(x, w, sizes) * np.asarray(dy)) < 1e-6 and _rel(dx, dx_ref) < 1e-5
    y = fp4_matmul.fp4_matmul(x[:6], jax.tree.map(lambda a: a[1], p).replace(shape=(64, 256)), implementation,
                              interpret)
    assert _rel(y, _ref_dense(x[:6], jax.tree.map(lambda a: a[1], w).replace(shape=(64, 256), axis=1))) < 1e-5


def _tiny_experts(fp4_impl: str, dtype):
    """A tiny model's Experts config (d = I = 256) with `fp4_impl`, 8 tokens of `dtype` routed to it, and the
    layer's float weights (w1, w3 [E, d, I], w2 [E, I, d])."""
    m = presets.tiny()
    m.update(hidden_size=256, moe_intermediate_size=256)
    cfg = dataclasses.replace(ModelConfig.from_config(m), fp4_impl=fp4_impl)
    x = jax.random.normal(jax.random.key(2), (8, 256), dtype)
    idx = jax.random.randint(jax.random.key(3), (8, cfg.num_experts_per_tok), 0, cfg.n_routed_experts)
    wts = jnp.full(idx.shape, 0.5, jnp.float32)
    floats = nn.unbox(Experts(cfg).init(jax.random.key(0), x, idx, wts)["params"])
    return cfg, x, idx, wts, floats


def test_moe_experts_take_planar_leaves():
    """`planarize_experts` turns packed expert leaves planar; an Experts layer on them gives the packed leaves'
    output bit for bit (XLA backend) and runs the Mosaic GPU kernel on them (interpreter, bf16) with the XLA
    numbers; an input size that is not a multiple of 256, or an output size not a multiple of 64, is refused."""
    cfg, x, idx, wts, floats = _tiny_experts("xla", jnp.float32)
    packed = pack_experts({"moe": {"experts": floats}})["moe"]["experts"]
    planar = planarize_experts({"moe": {"experts": packed}})["moe"]["experts"]
    assert sorted(planar) == sorted(f"w{i}_fp4_planar{s}" for i in (1, 2, 3) for s in ("", "_scale"))
    assert planar["w1_fp4_planar_scale"].shape == (cfg.n_routed_experts, 256 // 32, 256)  # [E, in/32, out]
    # jitted, and each result fetched before the next call: eager ops queued behind a Mosaic GPU interpreter
    # call (its host callbacks) deadlocked XLA:CPU once in CI
    fwd = jax.jit(lambda c, p: Experts(c).apply({"params": p}, x, idx, wts), static_argnums=0)
    want = np.asarray(fwd(cfg, packed))
    np.testing.assert_array_equal(np.asarray(fwd(cfg, planar)), want)
    kernel = dataclasses.replace(cfg, fp4_impl="mosaic_gpu", fp4_interpret=True)
    assert "fp4_grouped_mosaic_gpu" in str(jax.make_jaxpr(fwd, static_argnums=0)(kernel, planar))
    assert _rel(np.asarray(fwd(kernel, planar), np.float32), want.astype(np.float32)) < 2e-2

    narrow = {"w1_fp4": packed["w1_fp4"][..., :32], "w1_fp4_scale": packed["w1_fp4_scale"][..., :2]}  # in = 64
    with pytest.raises(ValueError, match="multiple of 256"):
        planarize_experts({"moe": {"experts": narrow}})
    few = {"w1_fp4": packed["w1_fp4"][..., :32, :], "w1_fp4_scale": packed["w1_fp4_scale"][..., :32, :]}  # out = 32
    with pytest.raises(ValueError, match="32 outputs, not a multiple of 64"):
        planarize_experts({"moe": {"experts": few}})


def test_moe_fused_decode_follows_the_config(monkeypatch):
    """`planar_max_scale` reads the planar experts' largest scale byte; `ModelConfig.fp4_fused_decode` hands the
    kernels that bound (the scales are traced inside the layer), so with the H200 table (asm_fused entries) the
    lowered expert GEMMs decode with one FMA only when the config says so, and fall back to asm_lean without."""
    cfg, x, idx, wts, floats = _tiny_experts("mosaic_gpu", jnp.bfloat16)
    params = planarize_experts(pack_experts({"moe": {"experts": floats}}))
    assert planar_max_scale(params) <= planar.FUSED_MAX_SCALE  # trained-scale weights sit far below scale 2
    assert planar_max_scale({"moe": {"experts": floats}}) is None
    select = block_sizes.select
    monkeypatch.setattr(block_sizes, "select", lambda op, mm, chip=None: select(op, mm, "nvidia_h200"))
    for fused in (True, False):
        c = dataclasses.replace(cfg, fp4_fused_decode=fused)
        fwd = lambda p, c=c: Experts(c).apply({"params": p}, x, idx, wts)
        text = jax.jit(fwd).trace(params["moe"]["experts"]).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu_v2") == 3  # w1, w3, w2
        assert ("0x3F003F00" in text) == fused and ("max.u16x2" in text) == (not fused)


def test_grouped_matmul_passes_planar_weights_through():
    kx, kw = jax.random.split(_key())
    w = _weight(kw, (2, 64, 256))
    sizes = jnp.array([3, 5], jnp.int32)
    x = jax.random.normal(kx, (8, 256), jnp.float32)
    y = grouped_matmul(x, fp4_matmul.to_planar(w), sizes, implementation="xla")
    assert _rel(y, _ref_grouped(x, w, sizes)) < 1e-5
