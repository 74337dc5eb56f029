"""Block-scaled low-precision formats: one frozen descriptor per format, and the named presets.

A `QuantFormat` says everything the quantizer needs and nothing else:

* `element`: the value type, "e2m1" (FP4, packed two per uint8) or "e4m3" (FP8 E4M3, stored as
  `float8_e4m3fn`);
* `block`: the block shape `(rows, cols)`. `(1, n)` blocks run along the quantized axis (the `axis=`
  argument, last by default); `(n, n)` 2-D blocks tile the last two axes (weights) and need `axis=-1`;
* `scale`: how a block's scale is stored and rounded:
    - "e8m0": a power of two, stored as a uint8 biased exponent (byte b means 2**(b - 127), 255 = NaN);
    - "e4m3": an FP8 E4M3 number (`float8_e4m3fn`), used by NVFP4 together with an FP32 per-tensor scale;
    - "fp32": a plain float32 `amax / qmax`;
* `scale_rule` (for "e8m0" only): "ceil" = DeepSeek's `2**ceil(log2(amax / qmax))`, which never clips,
  or "floor" = the OCP MX rule `2**(floor(log2(amax)) - emax_elem)`, which may saturate values in
  (6, 8)·X to 6 (spec/dsv4.md 7.2, spec/anchors.md C5);
* `amax_floor`: the smallest block amax used to compute the scale (all-zero blocks get this scale);
* `global_scale`: NVFP4's second level, an FP32 per-tensor scale `global_amax / (448 * 6)` (TE recipe).

Presets (`FORMATS`): "mxfp4" (the DeepSeek expert/indexer format), "mxfp4_ocp", "nvfp4", "nvfp4_2d",
"fp8" (1x128 activations, fp32 scales), "fp8_ue8m0", "fp8_weight" (128x128, fp32 scales),
"fp8_weight_ue8m0" (the released checkpoints' layout) and "fp8_kv" (1x64, ue8m0, the KV cache).
Any other combination is a `QuantFormat(...)` or `get_format("fp8", block=(1, 64))` away.
"""

from __future__ import annotations

import dataclasses

ELEMENTS = ("e2m1", "e4m3")
SCALES = ("e8m0", "e4m3", "fp32")
SCALE_RULES = ("ceil", "floor")

# Largest finite magnitude and the exponent of the largest binade of each element type.
ELEMENT_MAX = {"e2m1": 6.0, "e4m3": 448.0}
ELEMENT_EMAX = {"e2m1": 2, "e4m3": 8}
# Mantissa bits and the minimum normal exponent, which define each element grid (used by stochastic rounding).
ELEMENT_MANTISSA_BITS = {"e2m1": 1, "e4m3": 3}
ELEMENT_EMIN = {"e2m1": 0, "e4m3": -6}

# E8M0 scales are kept at or above 2**-126 (the smallest normal float32) so that no scale, and no
# product with one, is a denormal that the CPU backend would flush to zero.
E8M0_MIN_EXPONENT = -126
E8M0_MAX_EXPONENT = 127


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """Describes one block-scaled format; hashable, so it can be static pytree metadata."""

    name: str
    element: str
    block: tuple[int, int]
    scale: str
    scale_rule: str = "ceil"
    amax_floor: float = 0.0
    global_scale: bool = False

    def __post_init__(self):
        if self.element not in ELEMENTS:
            raise ValueError(f"QuantFormat.element: {self.element!r} is not one of {ELEMENTS}")
        if self.scale not in SCALES:
            raise ValueError(f"QuantFormat.scale: {self.scale!r} is not one of {SCALES}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"QuantFormat.scale_rule: {self.scale_rule!r} is not one of {SCALE_RULES}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"QuantFormat.block: {self.block!r} must be (rows, cols) of positive ints")
        if self.element == "e2m1" and self.block[1] % 2:
            raise ValueError(f"QuantFormat.block: FP4 packs two values per byte, cols {self.block[1]} must be even")
        if self.global_scale and self.scale != "e4m3":
            raise ValueError("QuantFormat.global_scale: only e4m3 block scales take an FP32 per-tensor scale")

    @property
    def qmax(self) -> float:
        """Largest finite element magnitude (6 for FP4, 448 for FP8)."""
        return ELEMENT_MAX[self.element]

    @property
    def is_2d(self) -> bool:
        return self.block[0] > 1

    @property
    def packed(self) -> bool:
        """FP4 values are stored two per uint8 (element 2i in the low nibble)."""
        return self.element == "e2m1"


FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        # DeepSeek FP4: amax floored at 6 * 2**-126, scale 2**ceil(log2(amax / 6)).
        QuantFormat("mxfp4", "e2m1", (1, 32), "e8m0", "ceil", amax_floor=6.0 * 2.0**-126),
        # OCP MX: scale 2**(floor(log2(amax)) - 2); amax floored at 2**-124 so the exponent stays >= -126.
        QuantFormat("mxfp4_ocp", "e2m1", (1, 32), "e8m0", "floor", amax_floor=2.0**-124),
        QuantFormat("nvfp4", "e2m1", (1, 16), "e4m3", global_scale=True),
        QuantFormat("nvfp4_2d", "e2m1", (16, 16), "e4m3", global_scale=True),
        # DeepSeek FP8 (act_quant): amax floored at 1e-4, s = amax / 448 or 2**ceil(log2(amax / 448)).
        QuantFormat("fp8", "e4m3", (1, 128), "fp32", amax_floor=1e-4),
        QuantFormat("fp8_ue8m0", "e4m3", (1, 128), "e8m0", "ceil", amax_floor=1e-4),
        QuantFormat("fp8_weight", "e4m3", (128, 128), "fp32", amax_floor=1e-4),
        QuantFormat("fp8_weight_ue8m0", "e4m3", (128, 128), "e8m0", "ceil", amax_floor=1e-4),
        QuantFormat("fp8_kv", "e4m3", (1, 64), "e8m0", "ceil", amax_floor=1e-4),
    )
}


def get_format(fmt: str | QuantFormat, **overrides) -> QuantFormat:
    """Returns the preset named `fmt` (or `fmt` itself), with any dataclass fields replaced by `overrides`."""
    if isinstance(fmt, QuantFormat):
        base = fmt
    elif fmt in FORMATS:
        base = FORMATS[fmt]
    else:
        raise ValueError(f"quant format: {fmt!r} is not one of {sorted(FORMATS)}")
    return dataclasses.replace(base, **overrides) if overrides else base
