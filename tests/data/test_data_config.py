"""Bad data configs fail before anything runs, with one line naming `config.data.<field>`."""

import os

import ml_collections
import pytest

from v4jax.data import (
    build_pipeline,
    build_tokenizer,
    default_data_config,
    load_corpus,
    validate_data_config,
)

from .corpus_files import files_config, write_corpus


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_default_config_is_valid():
    validate_data_config(default_data_config())


def test_missing_path_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.txt")
    msg = _one_line_error(
        lambda: validate_data_config(files_config([missing])), "config.data.paths"
    )
    assert msg == f"config.data.paths: no such file or directory: {missing}"
    # The loader says the same when validation was skipped.
    _one_line_error(
        lambda: load_corpus(files_config([missing])), "no such file or directory"
    )
    # A glob that matches nothing is missing too.
    _one_line_error(
        lambda: validate_data_config(files_config([str(tmp_path / "*.txt")])),
        "config.data.paths",
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("source", "web", r"config.data.source: must be one of"),
        ("eval_fraction", 1.0, r"config.data.eval_fraction: must be in \[0, 1\)"),
        ("eval_fraction", -0.1, r"config.data.eval_fraction"),
        ("eval_fraction", "0.1", r"config.data.eval_fraction: expected"),
        ("max_files", -1, r"config.data.max_files"),
        ("shuffle", 1, r"config.data.shuffle: expected bool"),
        ("num_workers", True, r"config.data.num_workers: expected int, got bool"),
        (
            "tokenizer",
            "/no/such/tokenizer.json",
            r"config.data.tokenizer: .*no such file",
        ),
        ("eos_id", 300, r"config.data.eos_id"),
        ("paths", "a.txt", r"config.data.paths: expected a list"),
    ],
)
def test_bad_fields_are_one_line(field, value, match):
    # Built from a dict: ConfigDict would refuse some of these type changes by assignment, but a
    # config loaded from a file or made by hand can hold them.
    cfg = ml_collections.ConfigDict({**default_data_config().to_dict(), field: value})
    _one_line_error(lambda: validate_data_config(cfg), match)


def test_unknown_and_missing_fields():
    cfg = default_data_config()
    cfg.shufle = True
    _one_line_error(
        lambda: validate_data_config(cfg), r"config.data.shufle: unknown field"
    )
    cfg = default_data_config()
    del cfg["add_eos"]
    _one_line_error(lambda: validate_data_config(cfg), r"config.data.add_eos: missing")


def test_files_source_needs_paths():
    _one_line_error(
        lambda: validate_data_config(files_config([])), r"config.data.paths: is empty"
    )


def test_empty_corpus_is_one_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cfg = files_config([str(tmp_path)])
    validate_data_config(cfg)  # the paths exist; emptiness shows when reading
    _one_line_error(lambda: load_corpus(cfg), r"config.data.paths: the corpus is empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "image.png").write_bytes(b"\x89PNG")
    _one_line_error(
        lambda: load_corpus(files_config([str(tmp_path / "other")])),
        r"config.data.paths: no .* files",
    )


def test_bad_jsonl_is_one_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    _one_line_error(
        lambda: load_corpus(files_config([str(tmp_path / "x.jsonl")])),
        r"config.data.jsonl_field: .*x.jsonl:2",
    )
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\nnot json\n')
    _one_line_error(
        lambda: load_corpus(files_config([str(tmp_path / "y.jsonl")])),
        r"config.data.paths: .*y.jsonl:2: invalid JSON",
    )


def test_empty_eval_split_and_bad_pipeline_args(tmp_path):
    write_corpus(str(tmp_path))
    cfg = files_config([str(tmp_path)], eval_fraction=0.0)
    tok = build_tokenizer(cfg)
    _one_line_error(
        lambda: build_pipeline(
            cfg, tokenizer=tok, split="eval", seq_len=8, batch_size=2
        ),
        r"config.data.eval_fraction: the eval split is empty",
    )
    _one_line_error(
        lambda: build_pipeline(
            cfg, tokenizer=tok, split="test", seq_len=8, batch_size=2
        ),
        r"split: must be",
    )
    _one_line_error(
        lambda: build_pipeline(
            cfg, tokenizer=tok, split="train", seq_len=0, batch_size=2
        ),
        r"seq_len must be",
    )
    assert os.path.isdir(tmp_path)
