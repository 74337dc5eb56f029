"""Tokenizers: the dependency-free byte tokenizer and HuggingFace `tokenizer.json` files.

Both expose the same small surface: `name`, `vocab_size`, `eos_id`, `encode(str) -> list[int]`,
`decode(list[int]) -> str`, and `encode_bytes(bytes) -> np.ndarray[int32]`, which the pipeline
uses (corpus documents are stored as UTF-8 bytes).
"""

from __future__ import annotations

import os
from typing import Protocol

import ml_collections
import numpy as np
from jaxtyping import Int

# Tried in this order when a tokenizer.json does not say which token ends a document.
EOS_CANDIDATES = (
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|end_of_text|>",
    "<|end▁of▁sentence|>",
    "[EOS]",
)


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_bytes(self, data: bytes) -> Int[np.ndarray, " n"]: ...


class ByteTokenizer:
    """Ids 0..255 are the raw UTF-8 bytes of the text; vocab_size is 256.

    EOS is id 0 (the NUL byte), which does not occur in text files: the stdlib corpus skips any
    file that contains NUL, and user files with NUL bytes would make EOS ambiguous (documented).
    Decoding uses errors="replace", so a sequence cut inside a multi-byte character still decodes.
    """

    name = "bytes"
    vocab_size = 256

    def __init__(self, eos_id: int = 0):
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_bytes(self, data: bytes) -> Int[np.ndarray, " n"]:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer loaded from a tokenizer.json file.

    `tokenizers` is imported lazily (it is in the `data` extra), so the byte tokenizer works
    without it. Special tokens are not added by `encode`: the pipeline appends EOS itself.
    """

    def __init__(self, path: str, eos_id: int = -1):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "config.data.tokenizer: a tokenizer.json needs the `tokenizers` package "
                "(pip install 'v4jax[data]' or pip install tokenizers)"
            ) from e
        self._tok = tokenizers.Tokenizer.from_file(os.path.expanduser(path))
        self.name = os.path.basename(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        if eos_id >= 0:
            if eos_id >= self.vocab_size:
                raise ValueError(
                    f"config.data.eos_id: {eos_id} >= vocab size {self.vocab_size} of {path}"
                )
            self.eos_id = eos_id
        else:
            found = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
            found = [i for i in found if i is not None]
            # -1 = "no EOS"; the pipeline refuses add_eos=True without one (see build_tokenizer).
            self.eos_id = int(found[0]) if found else -1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_bytes(self, data: bytes) -> Int[np.ndarray, " n"]:
        return np.asarray(
            self.encode(data.decode("utf-8", errors="replace")), dtype=np.int32
        )

    def count_tokens(self, documents: list[bytes]) -> int:
        """Total tokens of many documents, encoded in parallel by the Rust library."""
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        return sum(
            len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)
        )


def build_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """Builds the tokenizer named by `cfg.tokenizer` ("bytes" or a tokenizer.json path)."""
    if cfg.tokenizer == "bytes":
        tok: Tokenizer = ByteTokenizer(eos_id=max(cfg.eos_id, 0))
    else:
        if not os.path.isfile(os.path.expanduser(cfg.tokenizer)):
            raise ValueError(f"config.data.tokenizer: no such file: {cfg.tokenizer}")
        tok = HFTokenizer(cfg.tokenizer, eos_id=cfg.eos_id)
    if cfg.add_eos and tok.eos_id < 0:
        raise ValueError(
            f"config.data.eos_id: tokenizer {tok.name} has no EOS token ({', '.join(EOS_CANDIDATES)}); "
            "set config.data.eos_id or config.data.add_eos=False"
        )
    return tok
