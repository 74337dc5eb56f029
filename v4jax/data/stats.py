"""Corpus statistics per split (files, documents, bytes, tokens), for the README and logging."""

from __future__ import annotations

import ml_collections
import numpy as np

from v4jax.data.corpus import Corpus, eval_mask, load_corpus
from v4jax.data.tokenizer import ByteTokenizer, Tokenizer


def count_tokens(tok: Tokenizer, documents: list[bytes]) -> int:
    """Tokens in `documents` (without EOS), using a batched encoder when the tokenizer has one."""
    if hasattr(tok, "count_tokens"):
        return tok.count_tokens(documents)
    return sum(len(tok.encode_bytes(d)) for d in documents)


def corpus_stats(
    cfg: ml_collections.ConfigDict, tok: Tokenizer, corpus: Corpus | None = None
) -> dict[str, dict[str, int]]:
    """{"train": {...}, "eval": {...}} with files, documents, bytes and tokens (EOS included).

    The byte tokenizer's token count is the byte count; other tokenizers encode every document
    (a few seconds for the stdlib corpus).
    """
    corpus = load_corpus(cfg) if corpus is None else corpus
    is_eval = eval_mask(corpus.split_keys, cfg.eval_fraction)
    lengths = np.diff(corpus.offsets)
    out = {}
    for split, mask in (("train", ~is_eval), ("eval", is_eval)):
        docs = np.flatnonzero(mask)
        if isinstance(tok, ByteTokenizer):
            tokens = int(lengths[docs].sum())
        else:
            tokens = count_tokens(tok, [corpus.document(int(i)) for i in docs])
        if cfg.add_eos:
            tokens += len(docs)
        out[split] = {
            "files": len(set(corpus.file_of_doc[docs].tolist())),
            "documents": len(docs),
            "bytes": int(lengths[docs].sum()),
            "tokens": tokens,
        }
    return out
