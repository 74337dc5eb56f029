"""Corpora as documents of UTF-8 bytes, and their deterministic train/eval split by file.

Two sources:

* `stdlib` — the `.py` files of the running interpreter's standard library (skipping
  site-packages, test/tests directories, idlelib, lib2to3, files over 200 KB, non-UTF-8 files and
  files containing NUL). It is built at first use and cached under `cache_dir` as one `.npz`
  (concatenated bytes + offsets + relative paths), written to a temporary file and moved into
  place with `os.replace`, so a kill during the build never leaves a half-written cache. The
  stdlib differs slightly between Python patch versions, so the corpus is *deterministic per
  Python version* (the cache key contains the full version).
* `files` — the user's files, directories (recursive) or globs: `.txt`/`.md`/`.py` are one
  document per file, `.jsonl` one document per line (field `jsonl_field`).

Split: each document has a split key (its file's relative path; with a single input file, the
document's index). A key goes to eval when `crc32(key) % 1000 < eval_fraction * 1000`, a rule
that depends on nothing but the key, never on hash randomisation or listing order. If the rule
sends no key to eval although `eval_fraction > 0` and there are two or more keys, the key with
the smallest hash goes to eval, so small user corpora still get an eval split.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
import zipfile
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from jaxtyping import Bool, Int, UInt8

from v4jax.data.config import TEXT_SUFFIXES, path_exists

STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
)
STDLIB_MAX_FILE_BYTES = 200_000
# Bump when the stdlib filter or the cache layout changes: old caches are then ignored.
STDLIB_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents stored as one byte buffer: document i is `data[offsets[i]:offsets[i+1]]`."""

    data: UInt8[np.ndarray, " nbytes"]
    offsets: Int[np.ndarray, " ndocs_plus_1"]
    split_keys: tuple[str, ...]  # per document: what the train/eval split hashes
    file_of_doc: Int[np.ndarray, " ndocs"]  # index into `files`
    files: tuple[
        str, ...
    ]  # file names (relative where possible), for stats and messages

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> bytes:
        return self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()


def default_cache_dir() -> str:
    return os.environ.get("V4JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "v4jax"
    )


def _stable_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def eval_mask(
    split_keys: Sequence[str], eval_fraction: float
) -> Bool[np.ndarray, " ndocs"]:
    """True for documents in the eval split (by key; see the module docstring for the rule)."""
    if eval_fraction <= 0:
        return np.zeros(len(split_keys), dtype=bool)
    unique = sorted(set(split_keys))
    threshold = eval_fraction * 1000
    eval_keys = {k for k in unique if _stable_hash(k) % 1000 < threshold}
    if not eval_keys and len(unique) >= 2:
        eval_keys = {min(unique, key=lambda k: (_stable_hash(k) % 1000, k))}
    return np.array([k in eval_keys for k in split_keys], dtype=bool)


def _from_documents(
    docs: list[bytes], split_keys: list[str], file_of_doc: list[int], files: list[str]
) -> Corpus:
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(docs), dtype=np.uint8)
    return Corpus(
        data,
        offsets,
        tuple(split_keys),
        np.asarray(file_of_doc, dtype=np.int64),
        tuple(files),
    )


# ----------------------------------------------------------------------------- stdlib


def _stdlib_files(root: str) -> list[tuple[str, bytes]]:
    """(relative posix path, bytes) of the stdlib `.py` files that pass the filter, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in STDLIB_SKIP_DIRS and d != "__pycache__"
        ]
        for name in filenames:
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                found.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    found.sort()
    out = []
    for rel, full in found:
        if os.path.getsize(full) > STDLIB_MAX_FILE_BYTES:
            continue
        with open(full, "rb") as f:
            data = f.read()
        if not data or b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append((rel, data))
    return out


def stdlib_cache_path(cache_dir: str) -> str:
    """The cache file for this interpreter's stdlib corpus (keyed by Python version and format)."""
    key = json.dumps(
        {
            "format": STDLIB_FORMAT_VERSION,
            "python": sys.version.split()[0],
            "impl": sys.implementation.name,
            "skip": sorted(STDLIB_SKIP_DIRS),
            "max_bytes": STDLIB_MAX_FILE_BYTES,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(
        cache_dir or default_cache_dir(),
        f"stdlib-py{sys.version.split()[0]}-{digest}.npz",
    )


def build_stdlib_cache(path: str) -> float:
    """Builds the stdlib corpus into `path` atomically; returns the build time in seconds."""
    start = time.perf_counter()
    files = _stdlib_files(sysconfig.get_paths()["stdlib"])
    if not files:
        raise ValueError(
            f"config.data.source: no stdlib .py files found under {sysconfig.get_paths()['stdlib']}"
        )
    lengths = np.array([len(d) for _, d in files], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.frombuffer(b"".join(d for _, d in files), dtype=np.uint8)
    paths = np.array([p for p, _ in files])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, data=data, offsets=offsets, paths=paths)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see either no file or the whole file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return time.perf_counter() - start


def _spread_subset(keys: Sequence[str], n: int) -> list[int]:
    """Indices of `n` keys chosen by a stable hash (a spread-out sample, not the first n by name).

    Uses sha1 with a prefix so the choice is independent of the crc32 used for the split.
    """
    ranked = sorted(
        range(len(keys)),
        key=lambda i: hashlib.sha1(b"select:" + keys[i].encode()).digest(),
    )
    return sorted(ranked[:n])


def _read_stdlib_cache(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with np.load(path, allow_pickle=False) as z:
        return z["data"], z["offsets"], [str(p) for p in z["paths"]]


def load_stdlib_corpus(cache_dir: str = "", max_files: int = 0) -> Corpus:
    """Loads (building at first use) the stdlib corpus; `max_files > 0` keeps a stable subset."""
    path = stdlib_cache_path(cache_dir)
    if not os.path.exists(path):
        build_stdlib_cache(path)
    try:
        data, offsets, paths = _read_stdlib_cache(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        # Damaged by something other than our atomic writer (a disk error, a manual edit): rebuild.
        build_stdlib_cache(path)
        data, offsets, paths = _read_stdlib_cache(path)
    keep = (
        _spread_subset(paths, max_files)
        if 0 < max_files < len(paths)
        else list(range(len(paths)))
    )
    docs = [data[offsets[i] : offsets[i + 1]].tobytes() for i in keep]
    kept_paths = [paths[i] for i in keep]
    return _from_documents(docs, kept_paths, list(range(len(kept_paths))), kept_paths)


# ----------------------------------------------------------------------------- user files


def _expand_path(path: str) -> list[tuple[str, str]]:
    """(full path, split key) of the text files `path` names; the key is relative to its root."""
    path = os.path.expanduser(path)
    if glob.has_magic(path):
        parts = path.replace(os.sep, "/").split("/")
        static = [
            p
            for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
        ]
        root = "/".join(static) or "."
        matches = [m for m in glob.glob(path, recursive=True) if os.path.isfile(m)]
        return [(m, os.path.relpath(m, root).replace(os.sep, "/")) for m in matches]
    if os.path.isdir(path):
        out = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.endswith(TEXT_SUFFIXES):
                    full = os.path.join(dirpath, name)
                    out.append((full, os.path.relpath(full, path).replace(os.sep, "/")))
        return out
    return [(path, os.path.basename(path))]


def _read_jsonl(path: str, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"config.data.paths: {path}:{line_no}: invalid JSON ({e.msg})"
                ) from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(
                    f"config.data.jsonl_field: {path}:{line_no}: no field {field!r}"
                )
            if not isinstance(record[field], str):
                raise ValueError(  # noqa: TRY004 (bad data in a file, not a bad argument)
                    f"config.data.jsonl_field: {path}:{line_no}: field {field!r} is not a string"
                )
            docs.append(record[field])
    return docs


def load_file_corpus(paths: Sequence[str], jsonl_field: str = "text") -> Corpus:
    """Reads the user's files (sorted, deduplicated) into a corpus; errors are one line."""
    entries: dict[str, str] = {}
    for path in paths:
        if not path_exists(path):
            raise ValueError(f"config.data.paths: no such file or directory: {path}")
        for full, key in _expand_path(path):
            entries.setdefault(os.path.abspath(full), key)
    if not entries:
        raise ValueError(
            f"config.data.paths: no {'/'.join(TEXT_SUFFIXES)} files found in {list(paths)}"
        )
    ordered = sorted(entries.items(), key=lambda kv: (kv[1], kv[0]))
    single_file = len(ordered) == 1
    docs: list[bytes] = []
    keys: list[str] = []
    file_of_doc: list[int] = []
    files = [key for _, key in ordered]
    for file_index, (full, key) in enumerate(ordered):
        if full.endswith(".jsonl"):
            texts = _read_jsonl(full, jsonl_field)
        else:
            try:
                with open(full, encoding="utf-8") as f:
                    texts = [f.read()]
            except UnicodeDecodeError:
                raise ValueError(
                    f"config.data.paths: {full} is not UTF-8 text"
                ) from None
        for text in texts:
            if not text:
                continue
            docs.append(text.encode("utf-8"))
            # One input file: split by document index (there is no second file to hold out).
            keys.append(f"{key}#{len(docs) - 1}" if single_file else key)
            file_of_doc.append(file_index)
    if not docs:
        raise ValueError(
            f"config.data.paths: the corpus is empty (no non-empty documents in {list(paths)})"
        )
    return _from_documents(docs, keys, file_of_doc, files)


def load_corpus(cfg: ml_collections.ConfigDict) -> Corpus:
    """The corpus that `cfg` names (`source` = "stdlib" or "files")."""
    if cfg.source == "stdlib":
        return load_stdlib_corpus(cfg.cache_dir, cfg.max_files)
    if cfg.source == "files":
        return load_file_corpus(list(cfg.paths), cfg.jsonl_field)
    raise ValueError(
        f"config.data.source: must be one of ('stdlib', 'files'), got {cfg.source!r}"
    )


def split_indices(
    corpus: Corpus, split: str, eval_fraction: float
) -> Int[np.ndarray, " n"]:
    """Document indices of `split` ("train" or "eval"), in corpus order; empty splits are errors."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: must be 'train' or 'eval', got {split!r}")
    is_eval = eval_mask(corpus.split_keys, eval_fraction)
    indices = np.flatnonzero(is_eval if split == "eval" else ~is_eval)
    if len(indices) == 0:
        if split == "eval":
            raise ValueError(
                f"config.data.eval_fraction: the eval split is empty (eval_fraction={eval_fraction}, "
                f"{len(set(corpus.split_keys))} split units); raise it or add files"
            )
        raise ValueError(
            f"config.data.eval_fraction: the train split is empty (eval_fraction={eval_fraction})"
        )
    return indices
