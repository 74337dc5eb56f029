"""Check a checkpoint conversion: run v4jax on a DeepSeek-V4 checkpoint and write the logits.

    python -m v4jax.tools.hf_forward --checkpoint DIR --tokens TOKENS.npy --out LOGITS.npy [--dtype float32]

DIR holds config.json and *.safetensors in any supported layout (HF, upstream, save_pretrained, FP8/FP4).
TOKENS is an integer array [B, S]; LOGITS is written as float32 [B, S, V] (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4jax.tools.hf_forward", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if not os.path.isdir(args.checkpoint):
        return fail(f"--checkpoint: no such directory: {args.checkpoint}")
    try:
        tokens = np.load(args.tokens)
    except (OSError, ValueError) as e:
        return fail(f"--tokens: cannot read {args.tokens} ({e.__class__.__name__})")
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        return fail(f"--tokens: expected an integer array [B, S], got {tokens.dtype} {tokens.shape}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        return fail(f"--out: directory does not exist: {out_dir}")

    import jax
    import jax.numpy as jnp

    from v4jax.interop import CheckpointError, load_checkpoint
    from v4jax.model import Transformer

    try:
        cfg, variables = load_checkpoint(args.checkpoint, dtype=args.dtype)
    except CheckpointError as e:
        return fail(str(e))
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        return fail(f"--tokens: ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    with jax.default_matmul_precision("highest" if args.dtype == "float32" else "default"):
        out = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens, jnp.int32))
    logits = np.asarray(out.logits, np.float32)
    tmp = args.out + ".tmp.npy"
    np.save(tmp, logits)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: float32 {logits.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
