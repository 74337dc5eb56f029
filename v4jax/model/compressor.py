"""Token compressors: CSA (overlapping windows of 2m tokens, stride m) and HCA (disjoint windows of m').

A compressed entry pools one window of tokens with a per-channel softmax over the window's slots
(spec 4.4-4.5, hf_reference 3.5-3.6). Packed documents are compressed independently: windows restart at
each document start and a document's incomplete tail is dropped (spec 4.9). Entries are therefore found
where a window ends (`(doc_position + 1) % m == 0`) and compacted into `S // m` slots, the most any
packing can produce; unused slots are marked invalid. For a single document this is exactly the
reshape-by-m of the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from v4jax.model.layers import Dense, RMSNorm, declare, rope_tail


class Entries(NamedTuple):
    """Compressed entries of one layer, compacted to `N = S // ratio` slots per row."""

    values: Float[Array, "b n c"]
    end: Int[Array, "b n"]        # token index of the window's last token (the entry is visible from there on)
    segment: Int[Array, "b n"]    # document id of the window
    valid: Bool[Array, "b n"]     # False for unused slots


def doc_positions(segment_ids: Int[Array, "b s"]) -> Int[Array, "b s"]:
    """Position of each token within its document (restarts at 0 at each change of segment id)."""
    t = jnp.arange(segment_ids.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - first


def window_ends(segment_ids: Int[Array, "b s"], doc_pos: Int[Array, "b s"], ratio: int):
    """Token indices where complete windows end, compacted to `S // ratio` slots: (end [B,N], valid [B,N])."""
    n = segment_ids.shape[1] // ratio
    is_end = ((doc_pos + 1) % ratio == 0) & (segment_ids != 0)

    def one_row(row):
        (idx,) = jnp.nonzero(row, size=n, fill_value=0)
        return idx, jnp.arange(n) < jnp.sum(row)

    end, valid = jax.vmap(one_row)(is_end)
    return end.astype(jnp.int32), valid


class Compressor(nn.Module):
    """Pools windows of `ratio` tokens (with `overlap`, also the previous window through a second series)."""

    width: int            # c: the entry width (head_dim for attention, index_head_dim for the indexer)
    ratio: int
    overlap: bool
    rope_dim: int
    eps: float
    std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b s d"], segment_ids, doc_pos, rope_positions, inv_freq) -> Entries:
        m, c = self.ratio, self.width
        coff = 2 if self.overlap else 1
        # projections in float32, as the reference does
        kv = Dense(coff * c, ("embed", "compress"), self.std, jnp.float32, self.param_dtype, name="wkv")(x)
        score = Dense(coff * c, ("embed", "compress"), self.std, jnp.float32, self.param_dtype, name="wgate")(x)
        ape = declare(self, "ape", nn.initializers.normal(self.std), (m, coff * c), ("window", "compress"), jnp.float32)

        end, valid = window_ends(segment_ids, doc_pos, m)  # [B, N]
        slot = jnp.arange(m)
        gather = jax.vmap(lambda a, i: a[i])  # per row: a [S, C], i [N, m] -> [N, m, C]

        cur = jnp.maximum(end[..., None] - m + 1 + slot, 0)  # [B, N, m] token indices of the window
        kv_cur, sc_cur = gather(kv[..., (coff - 1) * c:], cur), gather(score[..., (coff - 1) * c:], cur)
        sc_cur = sc_cur + ape[:, (coff - 1) * c:]
        if self.overlap:
            # previous window of the same document through the first series (paper's b-series), else empty
            prev = jnp.maximum(cur - m, 0)
            has_prev = (jnp.take_along_axis(doc_pos, end, 1) >= 2 * m - 1)[..., None, None]  # [B, N, 1, 1]
            kv_prev = jnp.where(has_prev, gather(kv[..., :c], prev), 0.0)
            sc_prev = jnp.where(has_prev, gather(score[..., :c], prev) + ape[:, :c], -jnp.inf)
            kv_cur, sc_cur = jnp.concatenate([kv_prev, kv_cur], 2), jnp.concatenate([sc_prev, sc_cur], 2)
        weights = jax.nn.softmax(sc_cur, axis=2)  # [B, N, slots, c]: a softmax per channel over the slots
        pooled = jnp.sum(weights * kv_cur, axis=2)  # [B, N, c]

        pooled = RMSNorm(self.eps, self.param_dtype, name="norm")(pooled.astype(x.dtype))
        start = jnp.maximum(end - m + 1, 0)
        entry_pos = jnp.take_along_axis(rope_positions, start, 1)  # rope at the window's first token
        values = rope_tail(pooled, entry_pos, inv_freq, self.rope_dim)
        segment = jnp.take_along_axis(segment_ids, end, 1)
        return Entries(values, end, segment, valid)


def entry_visibility(entries: Entries, segment_ids: Int[Array, "b s"]) -> Bool[Array, "b s n"]:
    """Query t sees entry i iff the entry's window ended at or before t, in t's document."""
    t = jnp.arange(segment_ids.shape[1])[None, :, None]
    return (entries.valid[:, None, :] & (entries.end[:, None, :] <= t)
            & (entries.segment[:, None, :] == segment_ids[:, :, None]))
