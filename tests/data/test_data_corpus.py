"""Corpora: the stdlib corpus builds once into an atomic cache; user files; the split by file."""

import os
import zlib

import numpy as np

from v4jax.data import build_tokenizer, corpus_stats, default_data_config, load_corpus
from v4jax.data.corpus import (
    eval_mask,
    load_stdlib_corpus,
    split_indices,
    stdlib_cache_path,
)

from .corpus_files import DOCS, JSONL, files_config, write_corpus


def test_stdlib_corpus_builds_once_and_caches_atomically(tmp_path):
    cache = str(tmp_path / "cache")
    corpus = load_stdlib_corpus(cache, max_files=40)
    path = stdlib_cache_path(cache)
    assert os.listdir(cache) == [
        os.path.basename(path)
    ]  # no temporary file left behind
    mtime = os.path.getmtime(path)
    again = load_stdlib_corpus(cache, max_files=40)
    assert os.path.getmtime(path) == mtime  # read from the cache, not rebuilt
    assert len(corpus) == 40
    assert corpus.split_keys == again.split_keys and np.array_equal(
        corpus.data, again.data
    )
    keys = list(corpus.split_keys)
    assert keys == sorted(keys)
    assert not any(
        part in ("test", "tests", "idlelib", "lib2to3", "site-packages")
        for k in keys
        for part in k.split("/")[:-1]
    )
    # Each document is the file's bytes.
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    for i in (0, 17, 39):
        with open(os.path.join(root, keys[i]), "rb") as f:
            assert corpus.document(i) == f.read()
    # A larger max_files is a superset: the subset is chosen by a stable per-file hash.
    bigger = load_stdlib_corpus(cache, max_files=80)
    assert set(keys) <= set(bigger.split_keys)


def test_stdlib_split_is_by_file_and_disjoint(tmp_path):
    cfg = default_data_config()
    cfg.cache_dir = str(tmp_path)
    cfg.max_files = 200
    cfg.eval_fraction = 0.1
    corpus = load_corpus(cfg)
    train = split_indices(corpus, "train", 0.1)
    evals = split_indices(corpus, "eval", 0.1)
    train_files = {corpus.split_keys[i] for i in train}
    eval_files = {corpus.split_keys[i] for i in evals}
    assert train_files.isdisjoint(eval_files) and len(train) + len(evals) == len(corpus)
    # The rule is the documented stable hash, independent of anything but the path.
    assert eval_files == {
        k for k in corpus.split_keys if zlib.crc32(k.encode()) % 1000 < 100
    }
    assert 0.03 < len(evals) / len(corpus) < 0.2
    stats = corpus_stats(cfg, build_tokenizer(cfg), corpus)
    assert stats["train"]["files"] == len(train) and stats["eval"]["files"] == len(
        evals
    )
    assert stats["train"]["tokens"] == stats["train"]["bytes"] + len(
        train
    )  # bytes + one EOS each


def test_user_files_txt_md_py_jsonl_dirs_and_globs(tmp_path):
    write_corpus(str(tmp_path))
    corpus = load_corpus(files_config([str(tmp_path)]))
    texts = [corpus.document(i).decode() for i in range(len(corpus))]
    # Sorted by relative path: a.txt, d.py, e.jsonl (3 lines), notes/b.md, notes/deep/c.txt.
    assert texts == [
        DOCS["a.txt"],
        DOCS["d.py"],
        *JSONL,
        DOCS["notes/b.md"],
        DOCS["notes/deep/c.txt"],
    ]
    assert (
        corpus.split_keys[2:5] == ("e.jsonl",) * 3
    )  # a jsonl file's lines split together
    # Globs, explicit files and overlapping inputs are deduplicated.
    glob_corpus = load_corpus(
        files_config([str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")])
    )
    assert [glob_corpus.document(i).decode() for i in range(len(glob_corpus))] == [
        DOCS["a.txt"],
        DOCS["notes/deep/c.txt"],
    ]
    assert glob_corpus.split_keys == ("a.txt", "notes/deep/c.txt")
    # Another field name for jsonl.
    (tmp_path / "f.jsonl").write_text('{"body": "b1"}\n{"body": "b2"}\n')
    field = load_corpus(files_config([str(tmp_path / "f.jsonl")], jsonl_field="body"))
    assert [field.document(i) for i in range(len(field))] == [b"b1", b"b2"]


def test_user_files_eval_split_by_file_and_by_document_for_one_file(tmp_path):
    write_corpus(str(tmp_path))
    corpus = load_corpus(files_config([str(tmp_path)]))
    is_eval = eval_mask(corpus.split_keys, 0.05)
    assert is_eval.any() and not is_eval.all()  # a small corpus still gets an eval file
    by_file = {}
    for key, e in zip(corpus.split_keys, is_eval):
        by_file.setdefault(key, set()).add(bool(e))
    assert all(len(v) == 1 for v in by_file.values())  # never half a file in each split
    # A single jsonl file is split by document.
    lines = [f'{{"text": "document number {i}"}}' for i in range(200)]
    (tmp_path / "one.jsonl").write_text("\n".join(lines))
    single = load_corpus(files_config([str(tmp_path / "one.jsonl")]))
    evals = split_indices(single, "eval", 0.1)
    assert 5 <= len(evals) <= 40
    assert set(evals).isdisjoint(split_indices(single, "train", 0.1))


def test_damaged_cache_is_rebuilt(tmp_path):
    cache = str(tmp_path)
    first = load_stdlib_corpus(cache, max_files=5)
    with open(stdlib_cache_path(cache), "wb") as f:
        f.write(b"not an npz")
    again = load_stdlib_corpus(cache, max_files=5)
    assert again.split_keys == first.split_keys and np.array_equal(
        again.data, first.data
    )


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    from v4jax.data import corpus as corpus_module

    def savez_then_die(f, **arrays):
        f.write(b"PK\x03\x04 half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module.np, "savez", savez_then_die)
    path = stdlib_cache_path(str(tmp_path))
    try:
        corpus_module.build_stdlib_cache(path)
    except KeyboardInterrupt:
        pass
    assert os.listdir(tmp_path) == []  # neither the cache nor a temporary file
