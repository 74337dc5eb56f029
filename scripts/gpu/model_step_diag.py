"""Where the tiny model's first forward + gradient step spends its time on this machine's first device:
`python3 scripts/gpu/model_step_diag.py INDEXER_IMPL [STACK_EVERY_S]` (INDEXER_IMPL: auto, xla, triton, ...).
Prints init / trace+compile / run seconds; if a stage runs past STACK_EVERY_S (default 40) the Python stacks are
printed every STACK_EVERY_S seconds (faulthandler), which says whether it is XLA's compiler, Triton's or a
kernel that does not return. Written after the session-11 two-GPU bench stalled silently before its first row."""

import faulthandler
import sys
import time

impl = sys.argv[1] if len(sys.argv) > 1 else "auto"
faulthandler.dump_traceback_later(float(sys.argv[2]) if len(sys.argv) > 2 else 40.0, repeat=True)

import jax
import jax.numpy as jnp

from v4jax.model import ModelConfig, Transformer, presets
from v4jax.parallel.bench import _loss_fn

c = presets.tiny()
c.indexer_impl = impl
cfg = ModelConfig.from_config(c)
model = Transformer(cfg)
tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, cfg.vocab_size)
t = time.time()
variables = jax.block_until_ready(model.init_variables(jax.random.key(0), tokens))
print(f"[{impl}] init {time.time() - t:.1f} s on {jax.devices()[0]}", flush=True)
step = jax.jit(jax.value_and_grad(_loss_fn(model), has_aux=True))
t = time.time()
compiled = step.lower(variables["params"], variables["buffers"], tokens).compile()
print(f"[{impl}] trace + compile {time.time() - t:.1f} s", flush=True)
t = time.time()
(loss, logits), grads = jax.block_until_ready(compiled(variables["params"], variables["buffers"], tokens))
print(f"[{impl}] first run {time.time() - t:.2f} s, loss {float(loss):.4f}, finite grads "
      f"{all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))}", flush=True)
faulthandler.cancel_dump_traceback_later()
