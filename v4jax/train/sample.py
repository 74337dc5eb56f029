"""Text sampling for the end-of-run sample: greedy or temperature, recomputing the full forward per token.

Recomputing the whole prefix each token is O(n^2) but needs no decode cache, and for the tiny model
and ~100 tokens it takes a second or two. The sequence is a fixed-length buffer (one compilation);
positions past the current end are padding (segment id 0), which causal attention never reads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.parallel.distributed import compile_in_step


def sample_text(model: Any, variables: dict[str, Any], tokenizer: Any, prompt: str, num_tokens: int, *,
                temperature: float = 0.0, seed: int = 0, max_len: int | None = None) -> str:
    """Continues `prompt` by `num_tokens` tokens; returns the decoded continuation (prompt excluded)."""
    prompt_ids = list(tokenizer.encode(prompt)) or [getattr(tokenizer, "eos_id", 0)]
    total = len(prompt_ids) + num_tokens
    length = max_len or total
    if length < total:  # keep only the tail of the prompt that fits
        prompt_ids = prompt_ids[total - length:]
    buffer = np.zeros((1, length), np.int32)
    buffer[0, :len(prompt_ids)] = prompt_ids

    # the variables, tokens and key go in as arguments, the host values as numpy: in a multi-process run the
    # variables are global arrays spanning other processes' devices, which a jitted function may not close
    # over, and numpy arguments are taken as the same on every process
    @jax.jit
    def next_token(variables, tokens, cur, key_data):
        rng = jax.random.wrap_key_data(key_data)
        segment_ids = (jnp.arange(length)[None, :] < cur).astype(jnp.int32)  # [1, L]
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, L]
        logits = model.apply(variables, tokens, segment_ids=segment_ids, positions=positions).logits  # [1, L, V]
        last = jax.lax.dynamic_index_in_dim(logits[0], cur - 1, keepdims=False).astype(jnp.float32)  # [V]
        if temperature > 0:
            return jax.random.categorical(rng, last / temperature)
        return jnp.argmax(last)

    next_token = compile_in_step(next_token, "sample")  # multi-process: compile, then start together
    rng = jax.random.PRNGKey(seed)
    cur = len(prompt_ids)
    out: list[int] = []
    for _ in range(num_tokens):
        rng, key = jax.random.split(rng)
        token = int(next_token(variables, buffer.copy(), np.int32(cur), np.asarray(jax.random.key_data(key))))
        buffer[0, cur] = token
        out.append(token)
        cur += 1
    return tokenizer.decode(out)
