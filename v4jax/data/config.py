"""The `config.data` schema: defaults and a validator that fails with one line per bad field.

Every error names the field as `config.data.<field>` so that a user who typed a wrong value on the
command line (`--config.data.paths=...`) sees at once which flag to fix, before any corpus is read
or any jit compiles.
"""

from __future__ import annotations

import glob
import os

import ml_collections

SOURCES = ("stdlib", "files")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the default data config: the embedded stdlib corpus with the byte tokenizer."""
    cfg = ml_collections.ConfigDict()
    # "stdlib": text files of the running interpreter's standard library (built at first use).
    # "files": the user's `paths` (.txt/.md/.py one document per file, .jsonl one per line).
    cfg.source = "stdlib"
    cfg.paths = []  # files, directories (recursive) or globs; used when source == "files"
    cfg.jsonl_field = "text"  # the field of each .jsonl line that holds the document
    cfg.tokenizer = "bytes"  # "bytes" (ids 0..255 = UTF-8 bytes, EOS = 0) or a path to a tokenizer.json
    cfg.eos_id = -1  # -1: the tokenizer's own EOS (bytes: 0; tokenizer.json: </s>, <|endoftext|>, ...)
    cfg.eval_fraction = (
        0.05  # fraction of files (by a stable hash of their path) held out for eval
    )
    cfg.cache_dir = ""  # "" -> $V4JAX_CACHE or ~/.cache/v4jax
    cfg.max_files = (
        0  # 0 = all; otherwise a stable, spread-out subset of this many files
    )
    cfg.add_eos = True  # append EOS to every document before packing
    cfg.shuffle = (
        True  # train split: global shuffle of document order, reshuffled every epoch
    )
    # Train split, with shuffle: also shuffle packed rows in a window of this many rows (0 = off). Packing cuts a
    # long document into consecutive rows; the window mixes them with rows of other documents so a
    # batch is not one file. Restoring a state replays at most one window (cheap for in-memory data).
    cfg.shuffle_buffer = 1024
    cfg.num_workers = (
        0  # grain worker processes; 0 = in-process (deterministic and enough on CPU)
    )
    return cfg


def _fail(field: str, message: str) -> None:
    raise ValueError(f"config.data.{field}: {message}")


def _check_type(
    cfg: ml_collections.ConfigDict, field: str, kind: type | tuple[type, ...]
) -> None:
    value = cfg[field]
    # bool is an int subclass; an int field given True is almost surely a typo.
    if isinstance(value, bool) and kind is not bool:
        _fail(field, f"expected {getattr(kind, '__name__', kind)}, got bool {value!r}")
    if not isinstance(value, kind):
        _fail(
            field,
            f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}",
        )


def path_exists(path: str) -> bool:
    """True if `path` is an existing file or directory, or a glob that matches at least one file."""
    path = os.path.expanduser(path)
    if glob.has_magic(path):
        return any(os.path.isfile(p) for p in glob.iglob(path, recursive=True))
    return os.path.exists(path)


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError naming `config.data.<field>` for the first bad field.

    Checks types and ranges, that every user path exists (a glob must match a file), and that a
    tokenizer.json path exists. Reading the files themselves (e.g. an empty corpus) is checked
    when the corpus is loaded, again with a one-line error.
    """
    defaults = default_data_config()
    for field in cfg:
        if field not in defaults:
            _fail(field, f"unknown field (known: {', '.join(sorted(defaults.keys()))})")
    for field in defaults:
        if field not in cfg:
            _fail(field, "missing (start from v4jax.data.default_data_config())")

    _check_type(cfg, "source", str)
    if cfg.source not in SOURCES:
        _fail("source", f"must be one of {SOURCES}, got {cfg.source!r}")
    if not isinstance(cfg.paths, (list, tuple)) or not all(
        isinstance(p, str) for p in cfg.paths
    ):
        _fail("paths", f"expected a list of strings, got {cfg.paths!r}")
    if cfg.source == "files":
        if not cfg.paths:
            _fail(
                "paths",
                "is empty but source is 'files' (give files, directories or globs)",
            )
        for path in cfg.paths:
            if not path_exists(path):
                _fail("paths", f"no such file or directory: {path}")
    _check_type(cfg, "jsonl_field", str)
    if not cfg.jsonl_field:
        _fail("jsonl_field", "must be a non-empty string")
    _check_type(cfg, "tokenizer", str)
    if cfg.tokenizer != "bytes" and not os.path.isfile(
        os.path.expanduser(cfg.tokenizer)
    ):
        _fail(
            "tokenizer",
            f"must be 'bytes' or a tokenizer.json file; no such file: {cfg.tokenizer}",
        )
    _check_type(cfg, "eos_id", int)
    if cfg.eos_id < -1:
        _fail(
            "eos_id",
            f"must be -1 (the tokenizer's own EOS) or a token id >= 0, got {cfg.eos_id}",
        )
    if cfg.tokenizer == "bytes" and cfg.eos_id > 255:
        _fail("eos_id", f"must be < 256 for the bytes tokenizer, got {cfg.eos_id}")
    _check_type(cfg, "eval_fraction", (int, float))
    if not 0.0 <= cfg.eval_fraction < 1.0:
        _fail("eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    _check_type(cfg, "cache_dir", str)
    _check_type(cfg, "max_files", int)
    if cfg.max_files < 0:
        _fail("max_files", f"must be >= 0 (0 = all files), got {cfg.max_files}")
    _check_type(cfg, "add_eos", bool)
    _check_type(cfg, "shuffle", bool)
    _check_type(cfg, "shuffle_buffer", int)
    if cfg.shuffle_buffer < 0:
        _fail(
            "shuffle_buffer",
            f"must be >= 0 (0 = no row shuffle), got {cfg.shuffle_buffer}",
        )
    _check_type(cfg, "num_workers", int)
    if cfg.num_workers < 0:
        _fail("num_workers", f"must be >= 0, got {cfg.num_workers}")
