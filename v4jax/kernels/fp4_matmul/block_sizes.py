"""Block sizes of the FP4 kernels: a frozen `BlockConfig`, shape fitting, and the tuned tables per chip.

Tables live in `v4jax/kernels/block_sizes/<chip>.json` (chip = `device_kind` lower-cased, spaces to
underscores, e.g. "nvidia_h200.json"), written from the H200 benchmark (experiments/benchmarks/
fp4_matmul.py) so that no autotuning runs at training or serving time. Each table maps an M range to a
config, per op ("dense", "grouped"); a chip without a file gets `DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parent.parent / "block_sizes"


DECODERS = ("jnp", "asm", "asm_lean", "asm_fused")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One kernel launch's tiling: M/N/K tile sizes, K splits (decode), Triton warps and pipeline stages."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    decode: str = "jnp"  # DECODERS: "jnp" (runs everywhere), "asm" (bf16x2 PTX, GPU only), "asm_lean" (PTX
    # with mosaic_gpu's two-op E8M0 scales; Triton has one scale path and treats it as "asm"), "asm_fused"
    # (mosaic_gpu, planar weights whose scales are all <= 2: one FMA per register; the api falls back to
    # "asm_lean" for other weights)
    swap_ab: bool = False  # compute y.T = W x.T so the decoded weights are the MMA's register operand
    fuse_x: bool = False  # dense: read x's column planes in the kernel (strided) instead of an XLA transpose
    overlap: bool = False  # mosaic_gpu: a K step's wgmmas run under the next step's decode (H200: under 2%)
    window: bool = False  # mosaic_gpu grouped, packed tiles: read x as it is, no padded copy (the H200's decode entry)
    cluster: bool = False  # mosaic_gpu dense split-K: a K split's CTAs form a cluster and add their partials in the
    # first one's shared memory (no XLA sum; GPU only, splits <= 8)

    def __post_init__(self):
        if self.decode not in DECODERS:
            raise ValueError(f"BlockConfig: decode must be one of {DECODERS}, got {self.decode!r}")

    def fit(self, m: int, n: int, k: int) -> BlockConfig:
        """The config shrunk to divide the shape: bn | N and bk | K (powers of two), split | K/bk, bm <= M's pow2."""
        # block_m < 16 means CUDA-core FMAs instead of MMA (decode of a few rows); MMA tiles need 16 rows
        floor = 1 if self.block_m < 16 else 16
        bm = max(floor, min(self.block_m, _next_pow2(m)))
        bn = _largest_pow2_divisor(n, self.block_n)
        bk = _largest_pow2_divisor(k, self.block_k)
        split = max(d for d in range(1, self.split_k + 1) if (k // bk) % d == 0)
        return dataclasses.replace(
            self, block_m=bm, block_n=bn, block_k=bk, split_k=split
        )


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _largest_pow2_divisor(size: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and size % (b * 2) == 0:
        b *= 2
    return b


DEFAULTS = {
    "dense": [
        {
            "max_m": 16,
            "config": {
                "block_m": 16,
                "block_n": 64,
                "block_k": 256,
                "split_k": 4,
                "num_warps": 4,
                "num_stages": 3,
            },
        },
        {
            "max_m": 64,
            "config": {
                "block_m": 64,
                "block_n": 64,
                "block_k": 256,
                "split_k": 2,
                "num_warps": 4,
                "num_stages": 3,
            },
        },
        {
            "max_m": None,
            "config": {
                "block_m": 128,
                "block_n": 128,
                "block_k": 64,
                "split_k": 1,
                "num_warps": 8,
                "num_stages": 3,
            },
        },
    ],
    "grouped": [
        {
            "max_m": 512,
            "config": {
                "block_m": 16,
                "block_n": 64,
                "block_k": 256,
                "num_warps": 4,
                "num_stages": 3,
            },
        },
        {
            "max_m": None,
            "config": {
                "block_m": 128,
                "block_n": 128,
                "block_k": 64,
                "num_warps": 8,
                "num_stages": 3,
            },
        },
    ],
}


DEFAULTS["dequantize"] = [
    {"max_m": None, "config": {"block_m": 16, "block_n": 64, "block_k": 256, "num_warps": 4, "num_stages": 3}},
]

# The Mosaic GPU kernels (mosaic_gpu.py): block_m caps the rows of x per CTA (wgmma N, padded to 8), block_n
# the weight rows per CTA (64, or 128: two 64-row accumulators sharing each x tile, where N % 128 == 0),
# block_k the K per pipeline step, num_stages the TMA pipeline depth, decode "asm" / "asm_lean" (PTX) or "jnp".
# Split-K 2 gives 4096 / 64 * 2 = 128 CTAs for the 132 SMs at decode. These defaults were not measured; the H200 table's
# entries were (its "source"). They decode with "asm": the kernels run on Hopper GPUs only, where the PTX decoder is the
# fast one and the only one that lowers for planar weights (the jnp word decoder's transpose has no Mosaic GPU
# lowering); the interpreter runs "jnp" in its place.
DEFAULTS["dense_mosaic"] = [
    {"max_m": 64, "config": {"block_m": 64, "block_k": 512, "split_k": 2, "num_stages": 4, "decode": "asm"}},
    {"max_m": None, "config": {"block_m": 128, "block_k": 256, "split_k": 1, "num_stages": 2, "decode": "asm"}},
]
DEFAULTS["grouped_mosaic"] = [
    {"max_m": 512, "config": {"block_m": 8, "block_k": 256, "split_k": 4, "num_stages": 4, "decode": "asm"}},
    {"max_m": None, "config": {"block_m": 64, "block_n": 128, "block_k": 256, "split_k": 1, "num_stages": 3,
                               "decode": "asm"}},
]


def chip_name(device_kind: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200' (the table's file stem)."""
    return "_".join(device_kind.lower().split())


@functools.cache
def load_table(chip: str) -> dict:
    """The stored table for `chip`, or DEFAULTS when the repo has none."""
    path = TABLE_DIR / f"{chip}.json"
    if not path.exists():
        return DEFAULTS
    table = json.loads(path.read_text())
    return {**table, **{op: table.get(op) or DEFAULTS[op] for op in DEFAULTS}}


def select(op: str, m: int, chip: str | None = None) -> BlockConfig:
    """The config for `op` ("dense", "dense_mosaic", "grouped", "grouped_mosaic" or "dequantize") at M rows on `chip` (default: the first device's kind)."""
    if chip is None:
        import jax  # lazy: keeps this module importable without a backend

        chip = chip_name(jax.devices()[0].device_kind)
    for entry in load_table(chip)[op]:
        if entry["max_m"] is None or m <= entry["max_m"]:
            return BlockConfig(**entry["config"])
    return BlockConfig(**DEFAULTS[op][-1]["config"])
