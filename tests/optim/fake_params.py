"""A small parameter tree with the model's parameter paths (the model lands separately)."""

import numpy as np


def _block(rng, repeat=None):
    d, h, e, inner, n = 8, 2, 4, 6, 2
    lead = () if repeat is None else (repeat,)
    r = lambda *shape: rng.standard_normal(lead + shape).astype(np.float32)
    compressor = {
        "wkv": {"kernel": r(d, 6)},
        "wgate": {"kernel": r(d, 6)},
        "ape": r(4, 6),
        "norm": {"scale": r(6)},
    }
    return {
        "attn_hc": {"fn": r((2 + n) * n, n * d), "base": r((2 + n) * n), "scale": r(3)},
        "ffn_hc": {"fn": r((2 + n) * n, n * d), "base": r((2 + n) * n), "scale": r(3)},
        "attn_norm": {"scale": r(d)},
        "ffn_norm": {"scale": r(d)},
        "attn": {
            "wq_a": {"kernel": r(d, 4)},
            "q_norm": {"scale": r(4)},
            "wq_b": {"kernel": r(4, h * 6)},
            "wkv": {"kernel": r(d, 6)},
            "kv_norm": {"scale": r(6)},
            "wo_a": r(
                2, h * 6 // 2, 4
            ),  # grouped output projection: a raw param, as in the model
            "wo_b": {"kernel": r(8, d)},
            "sink": r(h),
            "compressor": compressor,
            "indexer": {
                "wq_b": {"kernel": r(4, 8)},
                "weights_proj": {"kernel": r(d, 2)},
                "compressor": {k: v for k, v in compressor.items()},
            },
        },
        "moe": {
            "router": {"kernel": r(d, e)},
            "experts": {
                "w1": r(e, d, inner),
                "w3": r(e, d, inner),
                "w2": r(e, inner, d),
            },
            "shared": {
                "w1": {"kernel": r(d, inner)},
                "w3": {"kernel": r(d, inner)},
                "w2": {"kernel": r(inner, d)},
            },
        },
    }


def fake_params(seed=0):
    """Two scanned layers (leading repeat axis 2) plus one MTP block, the model's naming."""
    rng = np.random.default_rng(seed)
    d, v, n = 8, 16, 2
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    hc_head = {"fn": r(n, n * d), "base": r(n), "scale": r(1)}
    return {
        "embed": {"embedding": r(v, d)},
        "head": {"kernel": r(d, v)},
        "norm": {"scale": r(d)},
        "hc_head": hc_head,
        "seg0": {"layer0": _block(rng, repeat=2)},
        "mtp0": {
            "e_proj": {"kernel": r(d, d)},
            "h_proj": {"kernel": r(d, d)},
            "enorm": {"scale": r(d)},
            "hnorm": {"scale": r(d)},
            "norm": {"scale": r(d)},
            "hc_head": dict(hc_head),
            "block": _block(rng),
        },
    }
